"""Apply a trained model to new scans: NIfTI in, label map (uint8, 0/1/2) out, on the input's grid.

The preprocessing is the training one, read from the checkpoint: a scan is resampled to the
training spacing, predicted, and the prediction mapped back (TorchIO's inverse of the padding,
then the probabilities resampled onto the scan's canonical grid, then its own orientation), so
the written file has the input's exact shape and affine and overlays the scan in 3D Slicer or
ITK-SNAP.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import torch
import torchio as tio
from torch import nn
from tqdm import tqdm

from utils.errors import UserError
from utils.inference.evaluation import Autocast, keep_largest_component, predict_logits
from utils.data.preprocessing import Preprocessing, has_spacing, label_map, to_grid
from utils.data.scans import ScanError, read_scan

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The model knows only what its training scans show; Task04's are boxes of at most 43 x 59 x 47 mm
# around one hippocampus. A scan more than this many times larger on some axis (a whole head, say)
# is mostly anatomy the model never saw, where its labels mean nothing. 2x leaves room for a
# somewhat looser crop without a warning.
FIELD_OF_VIEW_FACTOR = 2.0


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
        needed = "a 3D volume" if in_channels == 1 else f"a 4D volume with {in_channels} channels last"
        raise ValueError(f"is {len(shape)}D with shape {shape}; the model needs {needed}")
    if min(image.spatial_shape) == 1:
        raise ValueError(f"is 2D: its shape {shape} is a single slice, not a 3D volume")
    return image


def extent_mm(image: tio.Image) -> tuple[float, float, float]:
    """The scan's physical size in mm along the canonical (RAS) axes, the order of the training
    shape (the preprocessing reorients with ToCanonical before anything else)."""
    world_axis = nib.io_orientation(image.affine)[:, 0].astype(int)    # voxel axis i runs along it
    extent = [0.0, 0.0, 0.0]
    for axis, size, spacing in zip(world_axis, image.spatial_shape, image.spacing):
        extent[axis] = float(size * spacing)
    return tuple(extent)


def field_of_view_warning(file: Path, image: tio.Image, training: Sequence[float]) -> str | None:
    """A sentence for a scan far larger on some axis than the training volumes (`training`, their
    largest extent in mm, the checkpoint's "training_extent_mm"), else None."""
    scan = extent_mm(image)
    if all(side <= FIELD_OF_VIEW_FACTOR * limit for side, limit in zip(scan, training)):
        return None
    mm = lambda sides: " x ".join(f"{side:.0f}" for side in sides)
    return (f"warning: {file} covers {mm(scan)} mm, more than {FIELD_OF_VIEW_FACTOR:g}x the {mm(training)} "
            f"mm of the training volumes. The model knows only what its training scans show (for Task04, "
            f"a box around one hippocampus), so it is predicted, but its labels are not to be trusted: "
            f"crop the scan to the hippocampus region first (3D Slicer's Crop Volume, or TorchIO's "
            f"CropOrPad around a chosen centre; see the README) and predict the crop.")


@torch.no_grad()
def predict_volume(model: nn.Module, image: tio.ScalarImage, preprocessing: Preprocessing, divisor: int,
                   device: torch.device, autocast: Autocast, num_classes: int,
                   postprocess: bool = False, mirror: bool = False,
                   roi_size: Sequence[int] | None = None) -> torch.Tensor:
    """Label map (1, X, Y, Z) uint8 on the grid of `image` as it was read. `divisor`: the U-Net's
    downsampling factor, to which the image is padded; `roi_size`: the training patch (default
    the training volume), the window of sliding-window inference for a larger scan."""
    subject = preprocessing.transform(divisor)(tio.Subject(image=image))
    logits = predict_logits(model, subject.image.data[None].float(), device, autocast,
                            roi_size=roi_size or preprocessing.target_shape, mirror=mirror)
    resampled = preprocessing.spacing is not None and not has_spacing(image, preprocessing.spacing)
    # Label map (cheap to un-pad), or for a resampled scan the scores, resampled back afterwards.
    prediction = tio.ScalarImage(tensor=logits[0], affine=subject.image.affine) if resampled else \
        tio.LabelMap(tensor=label_map(logits[0]), affine=subject.image.affine)
    subject.add_image(prediction, "prediction")
    uncropped = subject.apply_inverse_transform(warn=False).prediction   # undoes the padding
    if resampled:
        canonical = tio.ToCanonical()(image)
        uncropped = tio.LabelMap(tensor=to_grid(uncropped.data, uncropped.affine, canonical.spatial_shape,
                                                canonical.affine), affine=canonical.affine)
    if postprocess:
        uncropped.set_data(keep_largest_component(uncropped.data, num_classes))
    # ToCanonical has no inverse in TorchIO: reorient back to the file's own axis order.
    return tio.ToOrientation("".join(image.orientation))(uncropped).data.to(torch.uint8)


def predict_files(model: nn.Module, path: str | Path, out_dir: str | Path, preprocessing: Preprocessing,
                  divisor: int, device: torch.device, autocast: Autocast, in_channels: int, num_classes: int,
                  postprocess: bool = False, mirror: bool = False,
                  training_extent_mm: Sequence[float] | None = None,
                  roi_size: Sequence[int] | None = None) -> list[tuple[Path, str]]:
    """Predict every file under `path` into `out_dir/<same name>`; return the (file, reason) failures.
    A scan far larger than `training_extent_mm` (the checkpoint's) is predicted with a warning."""
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
        warning = None if training_extent_mm is None else field_of_view_warning(file, image, training_extent_mm)
        if warning:
            tqdm.write(warning)
        label = predict_volume(model, image, preprocessing, divisor, device, autocast, num_classes,
                               postprocess, mirror, roi_size)
        nib.save(nib.Nifti1Image(label[0].numpy(), image.affine), out_dir / file.name)
    seconds = time.perf_counter() - started
    done = len(files) - len(failures)
    print(f"Predicted {done} of {len(files)} volumes in {seconds:.1f} s ({done / seconds:.1f} volumes/s) "
          f"into {out_dir}" + (f"; {len(failures)} failed (listed above)" if failures else ""))
    return failures
