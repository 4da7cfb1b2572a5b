"""Which training case goes into which batch: exactly `Nit` batches per epoch, every case equally
likely, the same sequence on every DDP process, and no case twice in one batch; and which part of
the case (`patch_window`): a random crop, or one centred on foreground."""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from typing import Sequence

import numpy as np
import torch
from monai.transforms.utils import generate_label_classes_crop_centers
from torch.utils.data import Sampler


class EvenSampler(Sampler[int]):
    """Yields `samples_per_epoch` indices of range(n) per epoch, every case equally likely.

    Within an epoch each case is drawn q = samples_per_epoch // n times (q shuffled passes), and
    r = samples_per_epoch % n distinct cases are drawn once more. Those extras come from a queue of
    random permutations that carries over from epoch to epoch, so every case gets its extra turn
    before any case gets a second one: no case is starved, and within an epoch no case is drawn
    more than once more than any other.

    The epoch is then reordered (`spread_repeats`) so that no batch holds a case twice where a
    batch spans two permutations, as long as the batch is not larger than the training set.

    Under DDP every process draws the same global sequence (same seed) and keeps its own slice of
    each global batch of batch_size * world_size samples, so the processes together follow the
    rules above, and no two of them draw the same case in the same step (when there are at least
    as many cases as samples in a global batch).
    """

    def __init__(self, n: int, samples_per_epoch: int, seed: int, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1):
        self.n, self.samples_per_epoch = n, samples_per_epoch
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size

    def _permutation(self) -> list[int]:
        return torch.randperm(self.n, generator=self.generator).tolist()

    def _extras(self, count: int) -> list[int]:
        """Take `count` distinct cases from the front of the carried-over queue."""
        chosen: list[int] = []
        position = 0
        while len(chosen) < count:
            if position == len(self.queue):
                self.queue += self._permutation()
            case = self.queue[position]
            if case in chosen:
                position += 1        # drawn already this epoch: keep its place for the next epoch
            else:
                chosen.append(self.queue.pop(position))
        return chosen

    def epoch_indices(self) -> list[int]:
        """The whole epoch's global sequence of case indices."""
        passes, extra = divmod(self.samples_per_epoch, self.n)
        indices = [i for _ in range(passes) for i in self._permutation()] + self._extras(extra)
        spread_repeats(indices, self.batch_size * self.world_size)
        return indices

    def __iter__(self):
        # Drawn up front, so the sampler's state after an epoch doesn't depend on loader prefetch.
        indices = self.epoch_indices()
        step, start = self.batch_size * self.world_size, self.rank * self.batch_size
        return iter([i for first in range(0, len(indices), step)
                     for i in indices[first + start:first + start + self.batch_size]])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.queue = list(state["queue"])


def spread_repeats(indices: list[int], window: int) -> None:
    """Reorder `indices` in place so that no window of `window` consecutive entries (one global
    batch) holds a case more than cap = ceil(window / number of cases) times: never twice when the
    batch is not larger than the training set.

    The windows are filled one after the other. First, a case with more copies waiting than the
    later windows can take (`cap` each) puts its earliest excess copies into this window. Then the
    window takes the earliest waiting entries whose case it doesn't hold `cap` times yet; an entry
    passed over keeps its place in the line for the next window.

    Why each window fills up within the cap. With m equal windows to go, some order keeps the cap
    as long as no case has more than m * cap copies waiting (list the copies case by case and deal
    them round-robin over the m windows). EvenSampler's epochs start that way: at most
    ceil(len / n) copies of each of n cases, and len / window windows take cap * len / window >=
    len / n copies of a case. That order's first window holds every excess copy (the later windows
    can't) and is full, so the excess copies fit and there are enough others to fill the window;
    afterwards no case has more copies waiting than the m - 1 windows left can take. A shorter
    last batch is filled first, working from the end, so that only equal windows follow it; with
    EvenSampler's counts and a cap of 1 an order keeping the cap exists then too (only the cases
    drawn once more than the others can need every window, and there are no more of them than
    entries in the shorter batch).

    Every entry is placed exactly once, in one pass over the windows, so the loop ends and the
    multiset, and with it the per-epoch counts, is unchanged. An order that already keeps the cap
    comes out as it went in, and the result depends on `indices` alone, so a resumed sampler draws
    what an uninterrupted one does. Work: O(len(indices)) plus the entries passed over again.
    """
    if len(indices) <= window or window <= 1:
        return                              # one window, or windows of one: nothing to do
    full, short = divmod(len(indices), window)
    if short:                               # the shorter last batch goes first (see above)
        backwards = indices[::-1]
        _fill_windows(backwards, [short] + [window] * full)
        indices[:] = backwards[::-1]
    else:
        _fill_windows(indices, [window] * full)


def _fill_windows(indices: list[int], sizes: list[int]) -> None:
    """`spread_repeats` for consecutive windows of `sizes` (all equal but perhaps the first)."""
    cap = -(-max(sizes) // len(set(indices)))
    waiting_copies: dict[int, deque[int]] = defaultdict(deque)  # case -> its unplaced positions
    for position, case in enumerate(indices):
        waiting_copies[case].append(position)
    cases_with = defaultdict(set)           # k -> the cases with k copies waiting
    for case, positions in waiting_copies.items():
        cases_with[len(positions)].add(case)
    most = max(cases_with)                  # the most copies any case has waiting
    placed = [False] * len(indices)
    passed_over: list[int] = []             # positions earlier windows skipped, in order
    scanned = 0                             # positions from here on haven't been looked at
    chosen: list[int] = []                  # the current window's positions
    taken: Counter = Counter()              # the current window's cases
    result: list[int] = []

    def place(case: int) -> None:
        nonlocal most
        copies = len(waiting_copies[case])
        position = waiting_copies[case].popleft()    # always the case's earliest waiting copy
        cases_with[copies].remove(case)
        cases_with[copies - 1].add(case)
        while most and not cases_with[most]:
            most -= 1
        placed[position] = True
        chosen.append(position)
        taken[case] += 1

    for later, size in zip(range(len(sizes) - 1, -1, -1), sizes):
        room = cap * later                  # copies of one case the later windows can take
        chosen.clear()
        taken.clear()
        for copies in range(most, room, -1):    # cases with copies the later windows can't take
            for case in sorted(cases_with[copies]):
                for _ in range(min(copies - room, size - len(chosen))):
                    place(case)
        skipped = []
        for position in passed_over:
            if not placed[position]:
                if len(chosen) < size and taken[indices[position]] < cap:
                    place(indices[position])
                else:
                    skipped.append(position)
        while len(chosen) < size and scanned < len(indices):
            position, scanned = scanned, scanned + 1
            if not placed[position]:
                if taken[indices[position]] < cap:
                    place(indices[position])
                else:
                    skipped.append(position)
        for position in skipped:            # only when no order keeps the cap
            if len(chosen) == size:
                break
            if not placed[position]:
                place(indices[position])
        passed_over = [position for position in skipped if not placed[position]]
        result += [indices[position] for position in sorted(chosen)]
    indices[:] = result


def patch_window(shape: Sequence[int], patch_size: Sequence[int], foreground: np.ndarray,
                 foreground_crops: float) -> tuple[slice, slice, slice]:
    """Where to crop a patch of `patch_size` (capped at `shape`, a side the volume has no room for
    is kept whole) from a volume of `shape`.

    With probability `foreground_crops` (nnU-Net: a third), and if the case has foreground, the
    patch is centred on a foreground voxel of a class drawn uniformly from those present (from
    `foreground`'s (class, x, y, z) rows), moved inside the volume where needed: MONAI's draw, the
    one its RandCropByLabelClasses makes (generate_label_classes_crop_centers). Otherwise the patch
    lies anywhere in the volume, every position equally likely. Small structures in large volumes
    are then seen in every batch. The share and the random crops draw from torch's global
    generator, MONAI's centres from numpy's; torch seeds both in each loader worker, and
    checkpoints keep both.

    Not TorchIO's LabelSampler or MONAI's RandCropByLabelClasses itself: both take the whole volume
    in memory, where this reads only the crop from the memory map. Measured per foreground crop,
    the read included (AMD EPYC, one thread, the ranges of three runs' medians on a 2-core machine
    shared with other jobs): Task04 (48 x 64 x 48, patch 40 x 56 x 40) 0.1 ms here, 0.65-1.1 ms
    MONAI's transform, 2.3-18 ms TorchIO's sampler; a 256^3 volume, patch 128^3: 1.7-2.7 ms,
    17-54 ms, 0.6-2.1 s. TorchIO's sampler also never centres a patch within half a patch of the
    border: with the default patch, on 6.3 % of Task04's foreground voxels only, and not at all (a
    RuntimeError) on a structure 40 voxels from the edge of that 256^3 volume. MONAI's centre here
    costs 0.01-0.1 ms more per crop than the torch draws it replaced, and gives the same window for
    the same voxel (checked on 10,600 of Task04's).
    """
    patch = [min(p, s) for p, s in zip(patch_size, shape)]
    room = [side - size for side, size in zip(shape, patch)]
    if not any(room):
        return tuple(slice(0, side) for side in shape)
    if len(foreground) and float(torch.rand(())) < foreground_crops:
        flat = np.ravel_multi_index(tuple(foreground[:, 1:].T), shape)     # per class, as MONAI keeps them
        indices = [flat[foreground[:, 0] == value] for value in np.unique(foreground[:, 0])]
        centre = generate_label_classes_crop_centers(patch, 1, shape, indices)[0]
        corner = [c - size // 2 for c, size in zip(centre, patch)]
    else:
        corner = [int(torch.randint(r + 1, ())) for r in room]
    return tuple(slice(start, start + size) for start, size in zip(corner, patch))
