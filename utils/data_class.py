"""The data of a training run: read the cases, split them and load them in batches.

One batch, from disk to the loader:
  a TaskInfo (utils/data/layouts.py: from dataset.json, a CSV list or a plain folder) -> read, check
  and preprocess each case once into the on-disk cache (utils/data/preprocessing.py, utils/data/cache.py)
  -> seeded split (or the CSV list's own) -> EvenSampler (Nit iterations per epoch) -> a crop of
  each sampled case, read from its memory map (a share centred on foreground) -> augmented batches.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from utils.args import Config, refuse_other_values, options
from utils.data.augmentation import BatchAugmentation
from utils.data.cache import Cases, load_cases
from utils.data.layouts import TaskInfo, read_data, read_unlabelled
from utils.data.preprocessing import Preprocessing
from utils.data.sampling import EvenSampler, patch_window
from utils.errors import DataError, UserError
from utils.training.distributed import Place, barrier
from utils.training.networks import input_multiples
from utils.training.semi_supervised import unlabelled_pool


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


def labelled_subset(train_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) training case ids: a seeded choice of round(fraction * n) cases
    (at least one) keeps its labels (-labelled_fraction), the rest is used as unlabelled."""
    keep = max(1, round(len(train_ids) * fraction))
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    labelled = sorted(train_ids[i] for i in order[:keep])
    return labelled, sorted(set(train_ids) - set(labelled))


class PatchDataset(Dataset):
    """(image, label) crops of `patch_size` (capped at the volume's shape) of preprocessed cases,
    read from their memory maps: only the crop is read. A share `foreground_crops` of them is
    centred on a foreground voxel (`patch_window`). Without `patch_size`, the whole volumes."""

    def __init__(self, cases: Cases, patch_size: Sequence[int] | None = None, foreground_crops: float = 0.0):
        self.cases, self.patch_size, self.foreground_crops = cases, patch_size, foreground_crops

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.cases.images[index], self.cases.labels[index]
        if self.patch_size is None:
            return image, label
        window = (slice(None), *patch_window(label.shape[1:], self.patch_size, self.cases.foreground[index],
                                             self.foreground_crops))
        return image[window], label[window]


def train_loader(cases: Cases, batch_size: int, Nit: int | None, augment: bool, num_workers: int,
                 seed: int, patch_size: Sequence[int] | None = None, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1, foreground_crops: float = 0.0) -> DataLoader:
    """Loader of exactly `Nit` batches per epoch (or one pass over the cases when Nit is None).

    With `augment`, batches are crops of `patch_size` (capped at the volume shape, a share
    `foreground_crops` centred on foreground), augmented; without, the whole preprocessed volumes.
    Under DDP, `batch_size` is per process and an epoch is `Nit` global steps of
    batch_size * world_size samples.
    """
    global_batch = batch_size * world_size
    if world_size == 1:
        samples = len(cases) if Nit is None else Nit * batch_size
    else:
        samples = (Nit or math.ceil(len(cases) / global_batch)) * global_batch
    sampler = EvenSampler(len(cases), samples, seed, batch_size, rank, world_size)
    return DataLoader(
        PatchDataset(cases, patch_size if augment else None, foreground_crops),
        collate_fn=BatchAugmentation() if augment else None,
        batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        # Workers are re-seeded every epoch from this generator, so a resumed run repeats the
        # augmentations of an uninterrupted one (persistent workers would break that).
        generator=torch.Generator().manual_seed(seed + 1),
    )


# ---------------------------------------------------------------- the data of a run


@dataclasses.dataclass
class TrainingData:
    """What build_data gives a training run."""
    info: TaskInfo                  # where the cases are, their classes and channels
    cases: Cases                    # every labelled case, preprocessed (memory-mapped)
    preprocessing: Preprocessing    # how, saved with the run for -evaluate and -predict
    split: dict[str, list[str]]     # {"train": ids, "val": ids}
    labelled: list[str]             # the training cases whose labels are used (-labelled_fraction)
    train_cases: Cases
    val_cases: Cases
    loader: DataLoader              # Nit batches of augmented training crops per epoch
    unlabelled_loader: DataLoader | None = None     # -mean_teacher: as many batches of unlabelled crops


def build_data(config: Config, place: Place, resumed: dict | None = None, say: Callable = print) -> TrainingData:
    """The data of a training run as `config` says, or of the run being resumed (`resumed`, its
    last.pt): the cases read, checked and preprocessed once into the cache, the split (the run's
    own when resumed), and the loaders."""
    info = read_data(config.data_dir, config.task, config.google_id, config.label_names)
    divisor = max(input_multiples(config.architecture, config.channels, config.patch_size))
    if not place.is_main:
        barrier(place)          # the first process builds the cache; the others then read it
    cases, preprocessing = load_cases(info, divisor, progress=place.is_main, cache_dir=config.cache_dir)
    if place.is_main:
        barrier(place)
    if resumed is not None:
        split = resumed["split"]
        if Preprocessing.from_dict(resumed["preprocessing"]) != preprocessing:
            raise UserError(f"The data in {info.task_dir} preprocesses differently from the run being "
                            f"resumed. Use the same -data_dir as that run.")
    else:
        split_seed = config.random_seed if config.split_seed is None else config.split_seed
        split = split_cases(cases.ids, config.train_val_ratio, split_seed, info.split)
    labelled, unlabelled_ids = labelled_subset(split["train"], config.labelled_fraction, config.random_seed)
    if resumed is not None:
        refuse_other_values(config, resumed["config"], options(kept_on_resume=True))
        labelled = resumed["labelled"]
    train_cases, val_cases = cases.subset(labelled), cases.subset(split["val"])
    if config.labelled_fraction < 1:
        say(f"-labelled_fraction {config.labelled_fraction:g}: {len(labelled)} training cases keep their labels, "
            f"{len(unlabelled_ids)} are used as unlabelled scans" + ("" if config.mean_teacher else
                                                                    " (by nothing, without -mean_teacher True)"))
    if config.batch_size > len(train_cases):
        say(f"Note: -batch_size {config.batch_size} is larger than the {len(train_cases)} training "
            f"cases; batches repeat cases" + ("." if config.Nit else " only with -Nit; without it a "
                                              "batch holds each training case once."))

    def loader_of(pool: Cases, Nit: int | None, seed: int, foreground_crops: float = 0.0) -> DataLoader:
        return train_loader(pool, config.batch_size, Nit, config.augment, config.num_workers, seed,
                            config.patch_size, pin_memory=place.device.type == "cuda", rank=place.rank,
                            world_size=place.world_size, foreground_crops=foreground_crops)

    loader = loader_of(train_cases, config.Nit, config.random_seed, config.foreground_crops)
    unlabelled_loader = None
    if config.mean_teacher:
        if place.distributed:
            raise UserError("-mean_teacher runs in one process for now (its second forward pass per step "
                            "is not yet arranged for DDP): start it with python main.py, not torchrun.")
        scans = None
        if config.unlabelled_dir is not None:
            scans, _ = load_cases(read_unlabelled(config.unlabelled_dir, info), divisor, progress=place.is_main,
                                  preprocessing=preprocessing, cache_dir=config.cache_dir)
        pool = unlabelled_pool(train_cases, cases.subset(unlabelled_ids) if unlabelled_ids else None, scans,
                               split["val"], None if resumed is None else resumed["unlabelled_ids"], say)
        # As many unlabelled batches as labelled ones, from crops anywhere in the scans.
        unlabelled_loader = loader_of(pool, len(loader), config.random_seed + 2)
    spacing = "each scan's own spacing" if preprocessing.spacing is None else \
        " x ".join(f"{side:g}" for side in preprocessing.spacing) + " mm voxels"
    say(f"{len(train_cases)} training and {len(val_cases)} validation cases, preprocessed to "
        f"{preprocessing.target_shape} ({spacing}); {len(loader)} iterations per epoch"
        + (f" on each of {place.world_size} processes (batch {config.batch_size} each)" if place.distributed else ""))
    return TrainingData(info, cases, preprocessing, split, labelled, train_cases, val_cases, loader, unlabelled_loader)
