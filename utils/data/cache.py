"""Every labelled case, preprocessed once and kept on disk, and the `Cases` that map it.

    read and check every case (its fingerprint: spacing, shape, foreground intensities) ->
    target spacing and one shape holding every resampled case -> read each case again, preprocess
    it (utils/data/preprocessing.py) and write it as .npy files -> rename the folder into place.

The cache folder's name is a key of everything that decides its content: each file's path, size
and modification time, the class values, the U-Net's downsampling factor, the preprocessing asked
for (a checkpoint's, for -evaluate) and CACHE_VERSION. A changed file or option gives another
key, so a stale cache is never read. A cache is built in a folder of its own and renamed into
place once its last file is written, so one left half-written (a run killed while building it) is
never read either: the next run builds it again.

Runs and -evaluate map the files (np.load(mmap_mode="c")) instead of loading them: the operating
system reads what a batch touches, and keeps it in its page cache while memory allows, so the
process holds batches rather than the data set, and a data set larger than memory still trains.
Reading the data is done in two passes, one case at a time, for the same reason.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from utils.errors import DataError
from utils.data.fingerprint import case_summary, fingerprint, samples_per_case
from utils.data.layouts import TaskInfo
from utils.data.preprocessing import (Preprocessing, check_channels, crop_or_pad_bounds, label_map, load_pair,
                                 prediction_window, resampled_shape, shape_for, to_grid, uncrop_transform)

# Bump when the preprocessing code changes what it writes, so that older caches are not read.
CACHE_VERSION = 1
# Foreground voxel positions kept per class and case for foreground-centred crops (nnU-Net keeps
# 10,000 per class too); drawn with a fixed seed, so the cache is the same on every build.
FOREGROUND_LOCATIONS = 10_000
PARTIAL = ".partial-"     # a folder being built: <cache>.partial-<pid>


@dataclasses.dataclass
class Grid:
    """How a case was resampled: its grid before (`native_shape`, `native_affine`, canonical
    orientation) and after (`affine`). A prediction on the training grid goes back with to_grid."""
    affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray

    def to_native(self, scores: torch.Tensor) -> torch.Tensor:
        return to_grid(scores, self.affine, self.native_shape, self.native_affine)


@dataclasses.dataclass
class Cases:
    """Preprocessed cases, mapped from the cache. images[i] (C, D, H, W) float32 and labels[i]
    (1, D, H, W) uint8 share one shape (Preprocessing.target_shape).

    `native_labels`, `uncrop` and `grids` undo the preprocessing, so that metrics are computed on
    each case's own voxel grid rather than on the padded training tensor; `windows` say which part
    of the padded volume validation predicts (`prediction_window`); `foreground` holds (class, x,
    y, z) rows of foreground voxels of the training volume, for foreground-centred crops.
    `fingerprint` (utils/data/fingerprint.py) describes all the cases read; a subset keeps none.
    """
    ids: list[str]
    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    native_labels: list[torch.Tensor]
    uncrop: list[tio.Transform]
    grids: list[Grid | None]                       # None: not resampled
    spacings: list[tuple[float, float, float]]     # mm per voxel of each native grid
    windows: list[tuple[slice, slice, slice]]
    foreground: list[np.ndarray]
    fingerprint: dict | None = None
    folder: Path | None = None                     # the cache folder

    def __len__(self) -> int:
        return len(self.ids)

    def extent_mm(self) -> list[float]:
        """The largest physical size of any case along each canonical axis, in mm: what a model
        trained on these cases has seen (-predict warns about scans far larger)."""
        return [max(label.shape[1 + axis] * spacing[axis] for label, spacing in zip(self.native_labels, self.spacings))
                for axis in range(3)]

    def to_native(self, index: int, scores: torch.Tensor) -> torch.Tensor:
        """Class scores (K, ...) of case `index`'s prediction window -> its label map (1, X, Y, Z)
        uint8 on its own grid. Outside the window (padding only): background."""
        window = (slice(None), *self.windows[index])
        grid = self.grids[index]
        if grid is None:             # not resampled: un-pad the label map, the cheaper way round
            padded = torch.zeros_like(self.labels[index])
            padded[window] = label_map(scores)
            return self.uncrop[index](padded)
        padded = torch.zeros(len(scores), *self.labels[index].shape[1:])
        padded[0] = 1.0
        padded[window] = scores
        return grid.to_native(self.uncrop[index](padded))

    def native_image(self, index: int) -> torch.Tensor:
        """The preprocessed (z-scored) image of case `index` on its own grid, for pictures."""
        image = self.uncrop[index](self.images[index])
        grid = self.grids[index]
        if grid is None:
            return image
        back = tio.Resample((grid.native_shape, grid.native_affine))(tio.ScalarImage(tensor=image, affine=grid.affine))
        return back.data

    def join(self, other: "Cases") -> "Cases":
        """These cases followed by `other`'s (e.g. the unlabelled scans of two sources)."""
        fields = ("ids", "images", "labels", "native_labels", "uncrop", "grids", "spacings", "windows", "foreground")
        return Cases(*(getattr(self, f) + getattr(other, f) for f in fields))

    def subset(self, ids: Sequence[str]) -> "Cases":
        where = {case: i for i, case in enumerate(self.ids)}
        missing = [case for case in ids if case not in where]
        if missing:
            raise DataError(f"Cases {missing[:5]} of the saved split are not in the data set. Use the "
                            f"same -data_dir as the run that made the checkpoint.")
        pick = lambda values: [values[where[case]] for case in ids]
        return Cases(list(ids), pick(self.images), pick(self.labels), pick(self.native_labels), pick(self.uncrop),
                     pick(self.grids), pick(self.spacings), pick(self.windows), pick(self.foreground),
                     folder=self.folder)


# ---------------------------------------------------------------- finding and building a cache


def cache_key(info: TaskInfo, divisor: int, preprocessing: Preprocessing | None) -> str:
    """A name for everything that decides the cache's content (see the module's docstring)."""
    files = []
    for path in (p for pair in info.pairs for p in pair if p is not None):       # None: an unlabelled scan
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    content = {"version": CACHE_VERSION, "files": files, "ids": info.case_ids, "labels": sorted(info.label_names),
               "in_channels": info.in_channels, "divisor": divisor,
               "preprocessing": preprocessing.to_dict() if preprocessing else None}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def cache_folder(root: Path, info: TaskInfo, divisor: int, preprocessing: Preprocessing | None) -> Path:
    """The folder of this data's cache. With `preprocessing` (a checkpoint's), the cache that a run
    on the same data made is reused when it preprocessed alike."""
    own = root / f"{info.task_dir.name}-{cache_key(info, divisor, None)}"
    if preprocessing is None or (is_complete(own) and read_index(own)["preprocessing"] == preprocessing.to_dict()):
        return own
    return root / f"{info.task_dir.name}-{cache_key(info, divisor, preprocessing)}"


def is_complete(folder: Path) -> bool:
    return (folder / "index.json").is_file()


def read_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def remove_abandoned(root: Path) -> None:
    """Delete half-built caches whose process is gone (killed while building)."""
    for partial in root.glob(f"*{PARTIAL}*"):
        pid = int(partial.name.rsplit(PARTIAL, 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:      # another user's live process
            pass


def foreground_locations(label: np.ndarray, seed: int = 1234) -> np.ndarray:
    """(n, 4) int32 rows (class, x, y, z): at most FOREGROUND_LOCATIONS voxels of each foreground
    class of a (1, D, H, W) label map."""
    rng = np.random.RandomState(seed)
    rows = []
    for value in np.unique(label[0]):
        if value == 0:
            continue
        where = np.argwhere(label[0] == value)
        if len(where) > FOREGROUND_LOCATIONS:
            where = where[rng.choice(len(where), FOREGROUND_LOCATIONS, replace=False)]
        rows.append(np.concatenate([np.full((len(where), 1), value), where], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def build_cache(info: TaskInfo, divisor: int, preprocessing: Preprocessing | None, folder: Path,
                progress: bool) -> None:
    """Read, check and preprocess every case into `folder` (see the module's docstring)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder.parent)
    partial = folder.with_name(f"{folder.name}{PARTIAL}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    label_values = set(info.label_names)
    # Pass 1: check every case and take its fingerprint, one case in memory at a time.
    summaries, first_channels = [], None
    with tqdm(zip(info.case_ids, info.pairs), total=len(info.pairs), desc="checking cases",
              disable=not progress) as pairs:
        for case, (image, label) in pairs:
            subject = load_pair(image, label, label_values)
            first_channels = first_channels or subject.image.num_channels
            check_channels(image, subject.image.num_channels, info, first_channels)
            summaries.append(case_summary(case, subject, samples_per_case(len(info.pairs))))
    found = fingerprint(summaries)
    if preprocessing is None:
        spacing = found["target_spacing"]
        shapes = [resampled_shape(case["shape"], case["spacing"], spacing) for case in found["cases"]]
        preprocessing = Preprocessing(shape_for(shapes, divisor), spacing)
    # Pass 2: preprocess each case and write it. The steps work in place (copy=False): the case
    # read is this loop's own, and what is kept of its native grid is taken first.
    steps = tio.Compose(preprocessing.resample_and_normalise(), copy=False)
    crop_or_pad = tio.CropOrPad(preprocessing.target_shape, copy=False)
    cases = []
    with tqdm(list(enumerate(zip(info.case_ids, info.pairs))), desc="preprocessing cases",
              disable=not progress) as pairs:
        for number, (case, (image, label)) in pairs:
            subject = load_pair(image, label, label_values)
            native_label = subject.label.data.to(torch.uint8).numpy().copy()
            native = {"spacing": [float(s) for s in subject.image.spacing], "shape": subject.spatial_shape,
                      "affine": subject.image.affine.copy()}
            steps(subject)
            resampled_shape_, affine = subject.spatial_shape, subject.image.affine
            is_resampled = resampled_shape_ != native["shape"] or not np.allclose(affine, native["affine"])
            padding, cropping = crop_or_pad_bounds(resampled_shape_, preprocessing.target_shape)
            crop_or_pad(subject)
            arrays = {"image": subject.image.data.float().numpy(), "label": subject.label.data.to(torch.uint8).numpy(),
                      "native_label": native_label}
            arrays["foreground"] = foreground_locations(arrays["label"])
            for name, array in arrays.items():
                np.save(partial / f"{number:05d}_{name}.npy", array)
            cases.append({
                "id": case, "spacing": native["spacing"], "native_shape": list(native["shape"]),
                "native_affine": native["affine"].tolist(), "affine": affine.tolist() if is_resampled else None,
                "padding": padding, "cropping": cropping,
                "window": [[w.start, w.stop] for w in prediction_window(resampled_shape_,
                                                                         preprocessing.target_shape, divisor)]})
    index = {"version": CACHE_VERSION, "preprocessing": preprocessing.to_dict(), "fingerprint": found,
             "cases": cases}
    # The index is written last, and the folder renamed into place only then: a cache is whole or absent.
    (partial / "index.json").write_text(json.dumps(index))
    try:
        partial.rename(folder)
    except OSError:                  # another process built it meanwhile: use theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not is_complete(folder):
            raise


def mapped(path: Path) -> torch.Tensor:
    """A .npy file as a tensor backed by the file: read as it is touched, never loaded whole.
    Copy-on-write, so that an accidental in-place change stays in memory instead of crashing
    the process on a read-only page or changing the cache."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def open_cache(folder: Path) -> tuple[Cases, Preprocessing]:
    index = read_index(folder)
    entries = index["cases"]
    file = lambda number, name: folder / f"{number:05d}_{name}.npy"
    grid = lambda c: (None if c["affine"] is None else
                      Grid(np.array(c["affine"]), tuple(c["native_shape"]), np.array(c["native_affine"])))
    cases = Cases(
        ids=[c["id"] for c in entries],
        images=[mapped(file(n, "image")) for n in range(len(entries))],
        labels=[mapped(file(n, "label")) for n in range(len(entries))],
        native_labels=[mapped(file(n, "native_label")) for n in range(len(entries))],
        uncrop=[uncrop_transform(c["padding"], c["cropping"]) for c in entries],
        grids=[grid(c) for c in entries],
        spacings=[tuple(c["spacing"]) for c in entries],
        windows=[tuple(slice(*w) for w in c["window"]) for c in entries],
        foreground=[np.load(file(n, "foreground")) for n in range(len(entries))],
        fingerprint=index["fingerprint"], folder=folder)
    return cases, Preprocessing.from_dict(index["preprocessing"])


_temporary_root: Path | None = None


def temporary_root() -> Path:
    """A folder for the caches of a process that was given no cache folder, removed at exit."""
    global _temporary_root
    if _temporary_root is None:
        _temporary_root = Path(tempfile.mkdtemp(prefix="preprocessed-"))
        atexit.register(shutil.rmtree, _temporary_root, ignore_errors=True)
    return _temporary_root


def load_cases(info: TaskInfo, divisor: int, progress: bool = True, preprocessing: Preprocessing | None = None,
               cache_dir: str | os.PathLike | None = None) -> tuple[Cases, Preprocessing]:
    """Every labelled case of `info`, preprocessed (from the cache in `cache_dir` if it holds
    them, else preprocessed into it first; None: a temporary folder removed at exit).

    The target spacing is the fingerprint's and the target shape the smallest that holds every
    resampled case, unless `preprocessing` (from a checkpoint) is given.
    """
    root = Path(cache_dir) if cache_dir is not None else temporary_root()
    folder = cache_folder(root, info, divisor, preprocessing)
    if not is_complete(folder):
        try:
            # TorchIO draws from torch's generator (each transform's probability): the same random
            # numbers follow whether or not the cache had to be built.
            with torch.random.fork_rng(devices=[]):
                build_cache(info, divisor, preprocessing, folder, progress)
        except OSError as error:        # reading problems are DataErrors (load_pair): this is writing
            raise DataError(f"Cannot write the preprocessed cases into {root} ({error.strerror or error}). "
                            f"Choose a folder with space that you can write to with -cache_dir.") from None
    elif progress:
        print(f"Preprocessed cases from the cache {folder}")
    cases, made = open_cache(folder)
    if preprocessing is not None and made != preprocessing:
        raise DataError(f"The cache {folder} holds cases preprocessed as {made}, not as {preprocessing}. "
                        f"Delete the folder and run again.")
    return cases, made
