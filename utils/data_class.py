"""Check, preprocess, split, sample and load the task's data.

One batch, from disk to the loader:
  a TaskInfo (utils/layouts.py: from dataset.json, a CSV list or a plain folder) -> read and
  check each (image, label) pair -> preprocess once (canonical orientation, z-score of each
  volume and channel, crop/pad to one shape) -> tensors in memory -> seeded split (or the CSV
  list's own) -> EvenSampler (Nit iterations per epoch) -> batches, randomly cropped and augmented.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.augmentation import BatchAugmentation
from utils.errors import DataError
from utils.fingerprint import fingerprint
from utils.layouts import TaskInfo
from utils.sampling import EvenSampler
from utils.scans import ScanError, read_scan


# ---------------------------------------------------------------- preprocessing


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


@dataclasses.dataclass
class Preprocessing:
    """Deterministic preprocessing, saved in checkpoints so that prediction repeats it exactly."""
    target_shape: tuple[int, int, int]
    orientation: str = "RAS"             # canonical orientation, as tio.ToCanonical
    normalisation: str = "zscore"        # per volume and channel, so uint8 and float files end up alike

    def transform(self, divisor: int | None = None) -> tio.Compose:
        """The preprocessing: crop or pad to `target_shape`. With `divisor` (prediction), pad only
        to the next multiple of it instead, so a volume is predicted with as little padding as the
        U-Net allows, as in validation (see `prediction_window`), and a larger one keeps its size."""
        # ZNormalization (not a fixed scale) because the files come as uint8 0-255 and as float32
        # in the thousands; per channel, as nnU-Net does for MRI modalities (ChannelZNormalization).
        # Padding with 0 pads with each channel's mean intensity.
        # The Compose copies its input once; its steps then work on that copy (copy=False), which
        # saves three deep copies a volume (6 % of -predict's time).
        size = (tio.CropOrPad(self.target_shape, copy=False) if divisor is None
                else tio.EnsureShapeMultiple(divisor, copy=False))
        return tio.Compose([tio.ToCanonical(copy=False), ChannelZNormalization(copy=False), size])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_shape": list(self.target_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{**d, "target_shape": tuple(d["target_shape"])})


def shape_for(shapes: Sequence[Sequence[int]], divisor: int) -> tuple[int, int, int]:
    """Smallest shape holding every volume whose sides are multiples of `divisor`."""
    return tuple(int(math.ceil(max(s[axis] for s in shapes) / divisor) * divisor) for axis in range(3))


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


def load_pair(image_path: Path, label_path: Path, label_values: set[int]) -> tio.Subject:
    """Read one case, check it, and return it in canonical orientation."""
    try:
        image, label = read_scan(image_path, "image"), read_scan(label_path, "label")
    except ScanError as error:
        raise DataError(f"Cannot read {error.path}: it {error.reason}. A corrupt or truncated file is "
                        f"usually left by an interrupted copy or download; restore it from the "
                        f"archive.") from None
    subject = tio.Subject(image=image, label=label)
    if image.data.ndim != 4 or label.num_channels != 1:
        raise DataError(f"{label_path} has {label.num_channels} channels; a label map has one.")
    if image.spatial_shape != label.spatial_shape:
        raise DataError(f"{image_path} has shape {image.spatial_shape} but its label {label_path} has "
                        f"{label.spatial_shape}. Image and label must be on the same voxel grid.")
    if not torch.allclose(torch.as_tensor(image.affine), torch.as_tensor(label.affine), atol=1e-3):
        raise DataError(f"{image_path} and its label {label_path} have different affines (positions "
                        f"in space):\n{image.affine}\nvs\n{label.affine}")
    found = set(torch.unique(label.data).tolist())
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


@dataclasses.dataclass
class Cases:
    """Preprocessed cases in memory. images (N, C, D, H, W) float32, labels (N, 1, D, H, W) uint8.

    `native_labels` and `uncrop` undo the crop/pad, so that metrics are computed on each case's
    own voxel grid rather than on the padded training tensor; `windows` say which part of the
    padded volume validation predicts (`prediction_window`). `fingerprint` (utils/fingerprint.py)
    describes all the cases read, from their native images; a subset keeps none.
    """
    ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    native_labels: list[torch.Tensor]
    uncrop: list[tio.Transform]
    spacings: list[tuple[float, float, float]]     # mm per voxel of each native grid
    windows: list[tuple[slice, slice, slice]]
    fingerprint: dict | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def extent_mm(self) -> list[float]:
        """The largest physical size of any case along each canonical axis, in mm: what a model
        trained on these cases has seen (-predict warns about scans far larger)."""
        return [max(label.shape[1 + axis] * spacing[axis] for label, spacing in zip(self.native_labels, self.spacings))
                for axis in range(3)]

    def subset(self, ids: Sequence[str]) -> "Cases":
        where = {case: i for i, case in enumerate(self.ids)}
        missing = [case for case in ids if case not in where]
        if missing:
            raise DataError(f"Cases {missing[:5]} of the saved split are not in the data set. Use the "
                            f"same -data_dir as the run that made the checkpoint.")
        index = [where[case] for case in ids]
        return Cases(list(ids), self.images[index], self.labels[index],
                     [self.native_labels[i] for i in index], [self.uncrop[i] for i in index],
                     [self.spacings[i] for i in index], [self.windows[i] for i in index])


def load_cases(info: TaskInfo, divisor: int, progress: bool = True,
               preprocessing: Preprocessing | None = None) -> tuple[Cases, Preprocessing]:
    """Read, check and preprocess every labelled case once.

    The target shape is the smallest that holds every case, unless `preprocessing` (from a
    checkpoint) is given.
    """
    label_values = set(info.label_names)
    subjects = []
    # As a context manager the bar is closed (its line ended) if a case fails to load.
    with tqdm(info.pairs, desc="reading cases", disable=not progress) as pairs:
        for image, label in pairs:
            subjects.append(load_pair(image, label, label_values))
            check_channels(image, subjects[-1].image.num_channels, info, subjects[0].image.num_channels)
    preprocessing = preprocessing or Preprocessing(shape_for([s.spatial_shape for s in subjects], divisor))
    # Orientation is already canonical; the remaining steps are normalise and crop/pad.
    normalise_and_pad = tio.Compose(preprocessing.transform().transforms[1:])
    done = [normalise_and_pad(s) for s in subjects]
    cases = Cases(
        ids=info.case_ids,
        images=torch.stack([d.image.data.float() for d in done]),
        labels=torch.stack([d.label.data.to(torch.uint8) for d in done]),
        native_labels=[s.label.data.to(torch.uint8) for s in subjects],
        uncrop=[d.get_inverse_transform(warn=False) for d in done],
        spacings=[s.label.spacing for s in subjects],
        windows=[prediction_window(s.spatial_shape, preprocessing.target_shape, divisor) for s in subjects],
        # Here, because the native intensities are gone once the cases are z-scored.
        fingerprint=fingerprint(info.case_ids, subjects),
    )
    return cases, preprocessing


# ---------------------------------------------------------------- split


def split_cases(ids: Sequence[str], train_val_ratio: float, seed: int,
                fixed: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Seeded split into {'train': [...], 'val': [...]} case ids.

    `fixed` ({case id: 'train' or 'val'}, a CSV list's split column) puts those cases where it
    says; the other cases are split by `train_val_ratio`.
    """
    fixed = fixed or {}
    free = [case for case in ids if case not in fixed]
    n_train = round(len(free) * train_val_ratio)
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    split = {"train": [free[i] for i in order[:n_train]], "val": [free[i] for i in order[n_train:]]}
    for case in ids:
        if case in fixed:
            split[fixed[case]].append(case)
    n_val = len(split["val"])
    if not fixed and (n_val < 1 or n_train < n_val):
        raise DataError(f"-train_val_ratio {train_val_ratio} with {len(ids)} cases gives {n_train} "
                        f"training and {n_val} validation cases; there must be at least one validation "
                        f"case and no more validation than training cases. Choose a ratio between "
                        f"0.5 and {1 - 1 / len(ids):.2f}" + (" or add cases." if len(ids) < 2 else "."))
    if fixed and not (split["train"] and split["val"]):
        marked = {name: sum(1 for s in fixed.values() if s == name) for name in ("train", "val")}
        raise DataError(f"The split column marks {marked['train']} cases train and {marked['val']} val, "
                        f"and -train_val_ratio {train_val_ratio} splits the {len(free)} unmarked ones into "
                        f"{n_train} training and {len(free) - n_train} validation cases: that leaves no "
                        f"{'training' if not split['train'] else 'validation'} case. Mark at least one "
                        f"case of each, or leave more rows unmarked.")
    return {name: sorted(cases) for name, cases in split.items()}


# ---------------------------------------------------------------- loaders


class SegmentationDataset(Dataset):
    """(image, label) pairs of preprocessed cases held in memory."""

    def __init__(self, cases: Cases):
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cases.images[index], self.cases.labels[index]


def train_loader(cases: Cases, batch_size: int, Nit: int | None, augment: bool, num_workers: int,
                 seed: int, patch_size: Sequence[int] | None = None, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """Loader of exactly `Nit` batches per epoch (or one pass over the cases when Nit is None).

    With `augment`, batches are randomly cropped to `patch_size` (capped at the volume shape)
    and augmented; without, they are the whole preprocessed volumes. Under DDP, `batch_size` is
    per process and an epoch is `Nit` global steps of batch_size * world_size samples.
    """
    global_batch = batch_size * world_size
    if world_size == 1:
        samples = len(cases) if Nit is None else Nit * batch_size
    else:
        samples = (Nit or math.ceil(len(cases) / global_batch)) * global_batch
    sampler = EvenSampler(len(cases), samples, seed, batch_size, rank, world_size)
    return DataLoader(
        SegmentationDataset(cases), collate_fn=BatchAugmentation(patch_size) if augment else None,
        batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        # Workers are re-seeded every epoch from this generator, so a resumed run repeats the
        # augmentations of an uninterrupted one (persistent workers would break that).
        generator=torch.Generator().manual_seed(seed + 1),
    )
