"""The data set's fingerprint (utils/data/fingerprint.py): spacings, shapes, foreground intensities and
nnU-Net's target spacing, computed as load_cases reads the data and saved with the run."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import main as entry
from conftest import TINY, write_task
from utils.training.checkpoint import load_checkpoint
from utils.data.cache import load_cases
from utils.data.fingerprint import target_spacing
from utils.data.layouts import read_task

IN_PLANE = [0.8, 0.8]


def test_target_spacing_of_isotropic_data_is_the_median():
    spacings = [[1.0, 1.0, 1.0], [1.2, 1.2, 1.2], [2.0, 2.0, 2.0]]
    assert target_spacing(spacings, [[100, 100, 100]] * 3) == pytest.approx([1.2, 1.2, 1.2])


def test_target_spacing_of_a_very_coarse_axis_is_its_10th_percentile():
    # Median 5 mm slices, more than 3x the in-plane 0.8 mm, and 40 slices, fewer than 512 / 3.
    z = [2.0, 3.0] + [5.0] * 8
    spacings = [IN_PLANE + [s] for s in z]
    expected_z = np.percentile(z, 10)                   # 2.9, between the two finest cases
    assert expected_z == pytest.approx(2.9)
    assert target_spacing(spacings, [[512, 512, 40]] * 10) == pytest.approx(IN_PLANE + [expected_z])


def test_target_spacing_of_a_very_coarse_axis_is_never_finer_than_the_others():
    spacings = [IN_PLANE + [0.5]] * 3 + [IN_PLANE + [5.0]] * 7     # 10th percentile 0.5 mm
    assert target_spacing(spacings, [[512, 512, 40]] * 10) == pytest.approx([0.8, 0.8, 0.8])


def test_target_spacing_follows_the_coarse_axis_wherever_it_is():
    spacings = [[s, 0.8, 0.8] for s in [2.0, 3.0] + [5.0] * 8]
    assert target_spacing(spacings, [[40, 512, 512]] * 10) == pytest.approx([2.9, 0.8, 0.8])


@pytest.mark.parametrize("spacings, shapes", [
    # coarse slices, but as many of them as in-plane voxels / 3 or more: not "few voxels"
    ([IN_PLANE + [s] for s in [2.0, 3.0] + [5.0] * 8], [[512, 512, 200]] * 10),
    # few slices, but only 2.5x coarser than in plane: not anisotropic enough
    ([IN_PLANE + [s] for s in [1.0, 1.5] + [2.0] * 8], [[512, 512, 40]] * 10),
    # a mixture of fine and coarse cases whose median is isotropic
    ([[1.0, 1.0, 1.0]] * 6 + [IN_PLANE + [5.0]] * 4, [[200, 200, 200]] * 6 + [[512, 512, 40]] * 4),
])
def test_target_spacing_is_the_median_unless_one_axis_is_coarse_and_short(spacings, shapes):
    assert target_spacing(spacings, shapes) == pytest.approx(np.median(spacings, axis=0).tolist())


def test_fingerprint_of_cases_read_holds_their_spacing_shape_and_native_foreground_intensities(tmp_path):
    task = write_task(tmp_path / "data", n_cases=4, affine=np.diag([1.0, 1.5, 5.0, 1.0]))
    cases, _ = load_cases(read_task(task), divisor=4, progress=False)
    fingerprint = json.loads(json.dumps(cases.fingerprint))          # JSON as saved, unchanged
    assert [row["id"] for row in fingerprint["cases"]] == cases.ids
    pooled = []
    for row in fingerprint["cases"]:
        image = nib.load(task / "imagesTr" / f"{row['id']}.nii.gz").get_fdata()
        label = nib.load(task / "labelsTr" / f"{row['id']}.nii.gz").get_fdata()
        assert row["spacing"] == pytest.approx([1.0, 1.5, 5.0])
        assert row["shape"] == list(image.shape)
        foreground = image[label > 0]                   # the file's own values, not z-scored ones
        pooled.append(foreground)
        (stats,) = row["foreground"]                    # one channel
        assert stats["mean"] == pytest.approx(foreground.mean())
        assert stats["std"] == pytest.approx(foreground.std())
        assert [stats["percentile_00_5"], stats["percentile_99_5"]] == pytest.approx(
            np.percentile(foreground, [0.5, 99.5]).tolist())
    shapes = [row["shape"] for row in fingerprint["cases"]]
    assert fingerprint["median_shape"] == pytest.approx(np.median(shapes, axis=0).tolist())
    assert fingerprint["median_spacing"] == pytest.approx([1.0, 1.5, 5.0])
    # Sampled equally from every case: close to the percentiles of all foreground voxels, and
    # a uint8 case (0-255) and a float case (x20) both count.
    pooled = np.concatenate(pooled)
    (overall,) = fingerprint["foreground"]
    assert overall["percentile_00_5"] == pytest.approx(np.percentile(pooled, 0.5), rel=0.05)
    assert overall["percentile_99_5"] == pytest.approx(np.percentile(pooled, 99.5), rel=0.05)
    assert cases.fingerprint == load_cases(read_task(task), divisor=4, progress=False)[0].fingerprint


def test_fingerprint_has_per_channel_statistics_and_none_for_a_case_without_foreground(two_channel_task):
    label_file = two_channel_task / "labelsTr" / "case_000.nii.gz"
    label = nib.load(label_file)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), label_file)
    cases, _ = load_cases(read_task(two_channel_task), divisor=4, progress=False)
    rows = {row["id"]: row for row in cases.fingerprint["cases"]}
    assert rows["case_000"]["foreground"] == [None, None]
    image = nib.load(two_channel_task / "imagesTr" / "case_001.nii.gz").get_fdata()     # (X, Y, Z, 2)
    foreground = nib.load(two_channel_task / "labelsTr" / "case_001.nii.gz").get_fdata() > 0
    for channel, stats in enumerate(rows["case_001"]["foreground"]):     # each on its own scale
        assert stats["mean"] == pytest.approx(image[..., channel][foreground].mean())
        assert stats["percentile_99_5"] == pytest.approx(np.percentile(image[..., channel][foreground], 99.5))
    assert len(cases.fingerprint["foreground"]) == 2 and None not in cases.fingerprint["foreground"]


@pytest.mark.parametrize("affine, spacing", [(None, [1.0, 1.0, 1.0]),
                                             (np.diag([1.0, 1.0, 5.0, 1.0]), [1.0, 1.0, 5.0])])
def test_training_saves_the_fingerprint_and_target_spacing_in_config_json_and_checkpoints(tmp_path, affine, spacing):
    task = write_task(tmp_path / "data", affine=affine)
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY, "-epochs", "1"]) == 0
    saved = json.loads((run / "config.json").read_text())["fingerprint"]
    # 5 mm slices are coarse, but the synthetic cases have as many slices as in-plane voxels.
    assert saved["target_spacing"] == pytest.approx(spacing)
    assert len(saved["cases"]) == 8 and all(row["spacing"] == spacing for row in saved["cases"])
    assert load_checkpoint(run / "last.pt")["fingerprint"] == saved
