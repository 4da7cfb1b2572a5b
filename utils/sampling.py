"""Which training case goes into which batch: exactly `Nit` batches per epoch, every case equally
likely, the same sequence on every DDP process, and no case twice in one batch."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EvenSampler(Sampler[int]):
    """Yields `samples_per_epoch` indices of range(n) per epoch, every case equally likely.

    Within an epoch each case is drawn q = samples_per_epoch // n times (q shuffled passes), and
    r = samples_per_epoch % n distinct cases are drawn once more. Those extras come from a queue of
    random permutations that carries over from epoch to epoch, so every case gets its extra turn
    before any case gets a second one: no case is starved, and within an epoch no case is drawn
    more than once more than any other.

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
        if self.world_size > 1:
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
    batch) holds a case twice, by swapping each repeat with an entry of another window that can
    take it. The multiset is kept, so the per-epoch counts don't change."""
    def window_of(position: int) -> range:
        first = position - position % window
        return range(first, min(first + window, len(indices)))

    for first in range(0, len(indices), window):
        here = window_of(first)
        for position in here:
            value = indices[position]
            if [indices[p] for p in here].count(value) == 1:
                continue
            # Later windows first, so the ones already checked stay as they are where possible.
            for other in [*range(here.stop, len(indices)), *range(0, here.start)]:
                there = window_of(other)
                if indices[other] not in [indices[p] for p in here] and value not in [indices[p] for p in there]:
                    indices[position], indices[other] = indices[other], value
                    break
