"""Reading scans: a file cut anywhere is named, and an intact one reads back exactly."""
import gzip
import re
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

import main as entry
from conftest import TINY, synthetic_case, write_task
from utils.data.scans import ScanError, read_scan

SHAPE = (11, 17, 9)
ODD_AFFINE = np.array([[0, -1.2, 0, 30.5], [0.9, 0, 0, -12.0], [0, 0, 1.5, 7.25], [0, 0, 0, 1]])


def write_scan(path, kind, seed=0):
    """A synthetic image (float32) or label (uint8) at `path`; returns the data written."""
    image, label = synthetic_case(np.random.default_rng(seed), SHAPE, as_uint8=False)
    data = image if kind == "image" else label
    nib.save(nib.Nifti1Image(data, ODD_AFFINE), path)
    return data


def gzip_prefix_holding(compressed: bytes, n: int) -> int:
    """Length of the shortest start of a gzip file that decompresses to at least `n` bytes."""
    stream, produced = zlib.decompressobj(wbits=31), 0
    for length in range(1, len(compressed) + 1):
        produced += len(stream.decompress(compressed[length - 1:length]))
        if produced >= n:
            return length
    raise ValueError(f"the file decompresses to fewer than {n} bytes")


CUTS = ["inside the header", "just after the header", "in the middle", "4 bytes before the end",
        "1 byte before the end"]


def cut_point(path, where: str) -> int:
    """Where to cut `path`; for a .nii.gz, the header cuts are where the compressed bytes run out
    at that point of the uncompressed file (100 bytes, or vox_offset)."""
    raw = path.read_bytes()
    header_cut = {"inside the header": 100, "just after the header": nib.load(path).dataobj.offset}
    if where in header_cut:
        n = header_cut[where]
        return gzip_prefix_holding(raw, n) if path.name.endswith(".gz") else n
    return {"in the middle": len(raw) // 2, "4 bytes before the end": len(raw) - 4,
            "1 byte before the end": len(raw) - 1}[where]


def cut(path, where: str) -> None:
    path.write_bytes(path.read_bytes()[:cut_point(path, where)])


@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize("kind", ["image", "label"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_file_cut_short_is_named_as_truncated(tmp_path, suffix, kind, where):
    path = tmp_path / f"scan{suffix}"
    write_scan(path, kind)
    cut(path, where)
    with pytest.raises(ScanError, match=re.escape(str(path)) + " is truncated"):
        read_scan(path, kind)


def test_the_truncation_message_says_how_many_bytes_are_missing(tmp_path):
    path = tmp_path / "scan.nii"
    write_scan(path, "label")
    path.write_bytes(path.read_bytes()[:352 + 100])
    voxels = int(np.prod(SHAPE))       # uint8
    with pytest.raises(ScanError, match=f"the header promises {voxels} bytes of voxels but the file holds 100"):
        read_scan(path, "label")


def test_a_gzip_file_whose_checksum_fails_is_named_as_corrupt(tmp_path):
    path = tmp_path / "scan.nii.gz"
    write_scan(path, "image")
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF                    # the CRC-32 of the gzip trailer
    path.write_bytes(bytes(raw))
    with pytest.raises(ScanError, match=re.escape(str(path)) + r" is corrupt \(gzip: CRC check failed"):
        read_scan(path)


def test_a_file_that_is_not_nifti_is_named(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"not an image, " * 40))
    with pytest.raises(ScanError, match=re.escape(str(path)) + " is not a NIfTI file"):
        read_scan(path)


@pytest.mark.parametrize("kind", ["image", "label"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_an_intact_file_reads_back_exactly(tmp_path, suffix, kind):
    path = tmp_path / f"scan{suffix}"
    data = write_scan(path, kind)
    scan = read_scan(path, kind)
    assert isinstance(scan, tio.ScalarImage if kind == "image" else tio.LabelMap)
    assert scan.data.dtype == (torch.float32 if kind == "image" else torch.uint8)
    assert torch.equal(scan.data, torch.from_numpy(data)[None])
    assert np.array_equal(scan.affine, nib.load(path).affine)      # as stored (float32), exactly


def test_image_scaling_is_applied_and_label_values_are_kept(tmp_path):
    stored = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    nifti = nib.Nifti1Image(stored, np.eye(4))
    nifti.header.set_slope_inter(0.5, 10)
    nib.save(nifti, tmp_path / "scaled.nii.gz")
    assert torch.equal(read_scan(tmp_path / "scaled.nii.gz", "image").data[0],
                       torch.from_numpy(stored * np.float32(0.5) + np.float32(10)))
    nib.save(nib.Nifti1Image(stored, np.eye(4)), tmp_path / "label.nii.gz")
    label = read_scan(tmp_path / "label.nii.gz", "label").data[0]
    assert label.dtype == torch.int16 and torch.equal(label, torch.from_numpy(stored))


def test_a_4d_channels_last_file_becomes_channels_first(tmp_path):
    data = np.random.default_rng(0).normal(size=(*SHAPE, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, ODD_AFFINE), tmp_path / "two_channels.nii.gz")
    scan = read_scan(tmp_path / "two_channels.nii.gz")
    assert scan.data.shape == (2, *SHAPE)
    assert torch.equal(scan.data, torch.from_numpy(np.moveaxis(data, 3, 0)))
    assert np.array_equal(scan.affine, nib.load(tmp_path / "two_channels.nii.gz").affine)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("where", ["just after the header", "in the middle"])
def test_training_stops_naming_a_cut_image(task_dir, tmp_path, capsys, where):
    image = task_dir / "imagesTr" / "hippocampus_003.nii.gz"
    cut(image, where)
    assert entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in err
    assert f"Cannot read {image}: it is truncated" in error_lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    assert entry.main(["-data_dir", str(write_task(root / "data")), "-best_models_dir", str(root / "run"),
                       *TINY]) == 0
    return root / "run" / "best.pt"


@pytest.mark.parametrize("where", ["just after the header", "4 bytes before the end"])
def test_predict_skips_a_cut_file_naming_why(checkpoint, tmp_path, capsys, where):
    folder = tmp_path / "in"
    folder.mkdir()
    write_scan(folder / "good.nii.gz", "image")
    write_scan(folder / "cut.nii.gz", "image")
    cut(folder / "cut.nii.gz", where)
    assert entry.main(["-predict", str(folder), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out")]) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.nii.gz"]
    out = capsys.readouterr().out
    assert f"skipped {folder / 'cut.nii.gz'}: cannot be read: it is truncated" in out
    assert "Predicted 1 of 2 volumes" in out
