"""Read and check one case, and preprocess it deterministically: the steps that training,
validation, -evaluate and -predict share, and their undoing for a prediction.

  read and check (image, label) -> canonical orientation (RAS) -> resample to the target spacing
  (TorchIO: linear for images, nearest for labels; skipped for a scan that has it already) ->
  z-score each channel -> crop/pad to one shape (training) or to multiples of the U-Net's
  downsampling factor (prediction).

A prediction goes back the same way: un-padded (TorchIO's inverse of the crop/pad), and, for a
resampled scan, its class probabilities resampled linearly onto the scan's own grid before the
most likely class is taken (as nnU-Net does), so that labels are written, and measured, on the
grid of the original file. utils/data/cache.py runs these steps once per case and keeps the result.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchio as tio

from utils.errors import DataError
from utils.data.layouts import TaskInfo
from utils.data.scans import ScanError, read_scan

# A scan whose spacing is within this fraction of the target on every axis is not resampled: the
# header of a 1 mm scan may say 0.99999 mm, and resampling it would only blur it a little.
SPACING_TOLERANCE = 1e-3


class ChannelZNormalization(tio.ZNormalization):
    """tio.ZNormalization applied to each channel of an image on its own.

    TorchIO's ZNormalization takes one mean and one std over all the channels of an image, so a
    modality stored in the thousands would swamp one stored in units beside it. nnU-Net z-scores
    each MRI modality separately, and so does this. A one-channel image (Task04) is normalised
    exactly as by tio.ZNormalization.
    """

    def apply_normalization(self, subject: tio.Subject, image_name: str, mask: torch.Tensor) -> None:
        image = subject[image_name]
        channels = []
        for channel in range(image.num_channels):
            channel_mask = mask[channel:channel + 1] if len(mask) > 1 else mask   # a label mask has one
            standardized = self.znorm(image.data[channel:channel + 1], channel_mask)
            if standardized is None:
                raise RuntimeError(f"Standard deviation is 0 for masked values in channel {channel} of "
                                   f'image "{image_name}" ({image.path})')
            channels.append(standardized)
        image.set_data(torch.cat(channels))


def has_spacing(image: tio.Image, spacing: Sequence[float]) -> bool:
    return bool(np.allclose(image.spacing, spacing, rtol=SPACING_TOLERANCE, atol=0))


class ResampleTo(tio.Resample):
    """tio.Resample to a spacing in mm (linear for images, nearest for label maps), skipped for a
    subject that has that spacing already, so that Task04's 1 mm scans keep their voxels exactly."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if has_spacing(subject.get_first_image(), self.target):
            return subject
        return super().apply_transform(subject)


@dataclasses.dataclass
class Preprocessing:
    """Deterministic preprocessing, saved in checkpoints so that prediction repeats it exactly."""
    target_shape: tuple[int, int, int]
    # mm per voxel along the canonical axes, the fingerprint's target spacing (nnU-Net's rule);
    # None keeps every scan's own grid (checkpoints written before scans were resampled).
    spacing: tuple[float, float, float] | None = None
    orientation: str = "RAS"             # canonical orientation, as tio.ToCanonical
    normalisation: str = "zscore"        # per volume and channel, so uint8 and float files end up alike

    def __post_init__(self):
        self.target_shape = tuple(int(side) for side in self.target_shape)
        self.spacing = None if self.spacing is None else tuple(float(side) for side in self.spacing)

    def resample_and_normalise(self) -> list[tio.Transform]:
        """The steps between reading (canonical orientation) and the crop/pad."""
        # ZNormalization (not a fixed scale) because the files come as uint8 0-255 and as float32
        # in the thousands; per channel, as nnU-Net does for MRI modalities (ChannelZNormalization).
        # Transforms work in place (copy=False) inside a Compose, which copies its input once:
        # three deep copies fewer a volume (6 % of -predict's time).
        resample = [ResampleTo(self.spacing, copy=False)] if self.spacing is not None else []
        return resample + [ChannelZNormalization(copy=False)]

    def transform(self, divisor: int | None = None) -> tio.Compose:
        """The whole preprocessing of a scan as read: crop or pad to `target_shape`, or with
        `divisor` (prediction) pad only to the next multiple of it, so that a volume is predicted
        with as little padding as the U-Net allows, as in validation (see `prediction_window`), and
        a larger one keeps its size. Padding with 0 pads with each channel's mean intensity."""
        size = (tio.CropOrPad(self.target_shape, copy=False) if divisor is None
                else tio.EnsureShapeMultiple(divisor, copy=False))
        return tio.Compose([tio.ToCanonical(copy=False), *self.resample_and_normalise(), size])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_shape": list(self.target_shape),
                "spacing": None if self.spacing is None else list(self.spacing)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**d)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """The shape of a scan after ResampleTo, as TorchIO computes it (`Resample.get_reference_image`:
    floor of the extent over the new spacing, so that nothing is extrapolated)."""
    if target is None or np.allclose(spacing, target, rtol=SPACING_TOLERANCE, atol=0):
        return tuple(int(side) for side in shape)
    return tuple(int(side) if side == 1 else int(math.floor(side * old / new))
                 for side, old, new in zip(shape, spacing, target))


def shape_for(shapes: Sequence[Sequence[int]], divisor: int) -> tuple[int, int, int]:
    """Smallest shape holding every volume whose sides are multiples of `divisor`."""
    return tuple(int(math.ceil(max(s[axis] for s in shapes) / divisor) * divisor) for axis in range(3))


def crop_or_pad_bounds(shape: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
    """(padding, cropping), six numbers each (first, last of every axis), that tio.CropOrPad
    applies to go from `shape` to `target`: ceil(difference / 2) voxels first, the rest last."""
    padding, cropping = [], []
    for side, goal in zip(shape, target):
        pad, crop = max(goal - side, 0), max(side - goal, 0)
        padding += [math.ceil(pad / 2), pad // 2]
        cropping += [math.ceil(crop / 2), crop // 2]
    return padding, cropping


def uncrop_transform(padding: Sequence[int], cropping: Sequence[int]) -> tio.Transform:
    """The inverse of a tio.CropOrPad with these bounds: back from the padded training volume to
    the case's own (resampled) grid; what was cropped comes back as 0 (background)."""
    return tio.Compose([tio.Crop(list(padding)), tio.Pad(list(cropping))])


def prediction_window(native_shape: Sequence[int], target_shape: Sequence[int],
                      divisor: int) -> tuple[slice, slice, slice]:
    """Where a case's own voxels lie in its padded volume, widened to multiples of `divisor`.

    Validation predicts this window rather than the whole padded volume: less padding is about
    2x faster, and closer to the training crops, which measured +0.002 to +0.003 mean Dice
    (benchmarks/README.md).
    """
    window = []
    for native, target in zip(native_shape, target_shape):
        # CropOrPad pads ceil(difference / 2) voxels first, in the training volume as in
        # -predict's EnsureShapeMultiple, so a case sits in its window as in a predicted scan.
        first = max(0, math.ceil((target - native) / 2))
        size = min(target, math.ceil(native / divisor) * divisor)
        start = min(max(0, first - math.ceil((size - min(native, target)) / 2)), target - size)
        window.append(slice(start, start + size))
    return tuple(window)


def label_map(scores: torch.Tensor) -> torch.Tensor:
    """Class scores (K, D, H, W) -> label map (1, D, H, W) uint8: the class of highest score.

    (`max(0).indices` is the same as `argmax(0)`, first maximum on ties, but about 10x faster
    on a CPU for this layout: 25 ms vs 2.5 ms a volume, which was most of a validation's time.)
    """
    return scores.max(0, keepdim=True).indices.to(torch.uint8)


def to_grid(scores: torch.Tensor, affine: np.ndarray, shape: Sequence[int], grid_affine: np.ndarray) -> torch.Tensor:
    """Class scores (K, D, H, W) on a grid of `affine` -> label map (1, *shape) uint8 on the grid
    of (`shape`, `grid_affine`): softmax probabilities resampled linearly (TorchIO), then the
    class of highest probability, as nnU-Net does. Outside the scores' extent: background."""
    probabilities = tio.ScalarImage(tensor=torch.softmax(scores.float(), dim=0), affine=affine)
    resampled = tio.Resample((tuple(int(side) for side in shape), np.asarray(grid_affine)),
                             image_interpolation="linear")(probabilities)
    return label_map(resampled.data)


def load_pair(image_path: Path, label_path: Path | None, label_values: set[int]) -> tio.Subject:
    """Read one case, check it, and return it in canonical orientation. An unlabelled scan
    (`label_path` None) gets an empty (all background) label map, which nothing trains on."""
    try:
        image = read_scan(image_path, "image")
        label = read_scan(label_path, "label") if label_path is not None else None
    except ScanError as error:
        raise DataError(f"Cannot read {error.path}: it {error.reason}. A corrupt or truncated file is "
                        f"usually left by an interrupted copy or download; restore it from the "
                        f"archive.") from None
    if label is None:
        if image.data.ndim != 4:
            raise DataError(f"{image_path} is not a 3D (or 4D, channels last) scan.")
        empty = torch.zeros(1, *image.spatial_shape, dtype=torch.uint8)
        return tio.ToCanonical()(tio.Subject(image=image, label=tio.LabelMap(tensor=empty, affine=image.affine)))
    subject = tio.Subject(image=image, label=label)
    if image.data.ndim != 4 or label.num_channels != 1:
        raise DataError(f"{label_path} has {label.num_channels} channels; a label map has one.")
    if image.spatial_shape != label.spatial_shape:
        raise DataError(f"{image_path} has shape {image.spatial_shape} but its label {label_path} has "
                        f"{label.spatial_shape}. Image and label must be on the same voxel grid.")
    if not torch.allclose(torch.as_tensor(image.affine), torch.as_tensor(label.affine), atol=1e-3):
        raise DataError(f"{image_path} and its label {label_path} have different affines (positions "
                        f"in space):\n{image.affine}\nvs\n{label.affine}")
    found = set(np.unique(label.data.numpy()).tolist())       # (60x faster than torch.unique on float)
    if not found <= label_values:
        raise DataError(f"{label_path} holds label values {sorted(found - label_values)} that are not "
                        f"declared (the classes are {sorted(label_values)}, named by dataset.json or "
                        f"-label_names).")
    return tio.ToCanonical()(subject)


def check_channels(image: Path, channels: int, info: TaskInfo, first_channels: int) -> None:
    """Every image of a task has the same channels (modalities) as its first image, as many as
    `info.in_channels` (dataset.json's 'modality', or the first image's header)."""
    first = info.pairs[0][0]
    counts = lambda n: f"{n} channel{'s' if n > 1 else ''} ({'3D' if n == 1 else '4D, channels last'})"
    if channels != first_channels:
        raise DataError(f"{image} has {counts(channels)} but {first} has {counts(first_channels)}. Every "
                        f"image of a data set must hold the same modalities, in the same order; convert "
                        f"or remove the odd case.")
    if channels != info.in_channels:
        raise DataError(f"{image} has {counts(channels)} but {info.task_dir / 'dataset.json'} declares "
                        f"{info.in_channels} modalities. Make its 'modality' entry list one per channel.")
