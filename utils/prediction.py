"""Apply a trained model to new scans: NIfTI in, label map (uint8, 0/1/2) out, on the input's grid.

The preprocessing is the training one, read from the checkpoint. The prediction is mapped back
through TorchIO's inverse transforms, so the written file has the input's exact shape and affine
and overlays the scan in 3D Slicer or ITK-SNAP.
"""
from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import torch
import torchio as tio
from torch import nn
from tqdm import tqdm

from utils.data_class import Preprocessing
from utils.errors import UserError
from utils.evaluation import Autocast, keep_largest_component, label_map, predict_logits
from utils.scans import ScanError, read_scan

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def input_files(path: str | Path) -> list[Path]:
    """One file, or every visible file of a folder (non-NIfTI ones are reported, not skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"-predict {path} is an empty folder; point it at NIfTI files (.nii or .nii.gz).")
        return files
    raise UserError(f"-predict {path} does not exist; give a NIfTI file or a folder of them.")


def writable_folder(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"Cannot write predictions into {path} ({error.strerror or error}). Choose a "
                        f"folder you can write to with -predictions_dir.") from None
    return path


def read_volume(path: Path, in_channels: int) -> tio.ScalarImage:
    """Read a 3D scan, or raise a ValueError that says what is wrong with it. The image keeps the
    file's own affine, so the prediction is written on exactly the scan's grid."""
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError("not a NIfTI file (.nii or .nii.gz)")
    try:
        image = read_scan(path, "image")
    except ScanError as error:
        raise ValueError(f"cannot be read: it {error.reason}") from None
    channels = image.num_channels
    shape = (*image.spatial_shape, channels) if channels > 1 else image.spatial_shape   # as stored
    if channels != in_channels:
        raise ValueError(f"is {len(shape)}D with shape {shape}; the model needs a 3D volume"
                         + (f" with {in_channels} channels" if in_channels > 1 else ""))
    if min(image.spatial_shape) == 1:
        raise ValueError(f"is 2D: its shape {shape} is a single slice, not a 3D volume")
    return image


@torch.no_grad()
def predict_volume(model: nn.Module, image: tio.ScalarImage, preprocessing: Preprocessing, divisor: int,
                   device: torch.device, autocast: Autocast, num_classes: int,
                   postprocess: bool = False, mirror: bool = False) -> torch.Tensor:
    """Label map (1, X, Y, Z) uint8 on the grid of `image` as it was read. `divisor`: the U-Net's
    downsampling factor, to which the image is padded."""
    subject = preprocessing.transform(divisor)(tio.Subject(image=image))
    logits = predict_logits(model, subject.image.data[None].float(), device, autocast,
                            roi_size=preprocessing.target_shape, mirror=mirror)
    label = label_map(logits[0])
    if postprocess:
        label = keep_largest_component(label, num_classes)
    subject.add_image(tio.LabelMap(tensor=label, affine=subject.image.affine), "prediction")
    uncropped = subject.apply_inverse_transform(warn=False).prediction   # undoes the padding
    # ToCanonical has no inverse in TorchIO: reorient back to the file's own axis order.
    return tio.ToOrientation("".join(image.orientation))(uncropped).data.to(torch.uint8)


def predict_files(model: nn.Module, path: str | Path, out_dir: str | Path, preprocessing: Preprocessing,
                  divisor: int, device: torch.device, autocast: Autocast, in_channels: int, num_classes: int,
                  postprocess: bool = False, mirror: bool = False) -> list[tuple[Path, str]]:
    """Predict every file under `path` into `out_dir/<same name>`; return the (file, reason) failures."""
    files = input_files(path)
    out_dir = writable_folder(out_dir)
    failures: list[tuple[Path, str]] = []
    started = time.perf_counter()
    for file in tqdm(files, desc="predicting", unit="volume"):
        try:
            image = read_volume(file, in_channels)
        except ValueError as reason:
            failures.append((file, str(reason)))
            tqdm.write(f"skipped {file}: {reason}")
            continue
        label = predict_volume(model, image, preprocessing, divisor, device, autocast, num_classes,
                               postprocess, mirror)
        nib.save(nib.Nifti1Image(label[0].numpy(), image.affine), out_dir / file.name)
    seconds = time.perf_counter() - started
    done = len(files) - len(failures)
    print(f"Predicted {done} of {len(files)} volumes in {seconds:.1f} s ({done / seconds:.1f} volumes/s) "
          f"into {out_dir}" + (f"; {len(failures)} failed (listed above)" if failures else ""))
    return failures
