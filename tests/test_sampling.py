"""EvenSampler: exact epochs, even and equiprobable draws, carried-over permutations, state; and
patch_window's foreground crops (MONAI's centres), exact resume with them."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import main as entry
from conftest import TINY, interrupt_validation, learning_figures
from utils.data.sampling import EvenSampler, patch_window, spread_repeats
from utils.training.checkpoint import load_checkpoint


def epoch_counts(sampler: EvenSampler, epochs: int) -> list[Counter]:
    return [Counter(iter(sampler)) for _ in range(epochs)]


@pytest.mark.parametrize("n, samples", [(10, 4), (10, 6), (10, 25), (7, 16), (10, 10), (5, 3)])
def test_sampler_epochs_are_exact_and_even(n, samples):
    sampler = EvenSampler(n, samples, seed=0)
    assert len(sampler) == samples
    total = Counter()
    for counts in epoch_counts(sampler, 30):
        assert sum(counts.values()) == samples
        per_case = [counts.get(i, 0) for i in range(n)]
        assert max(per_case) - min(per_case) <= 1       # even coverage within the epoch
        total.update(counts)
    # Carried-over permutations: over many epochs no case is starved or favoured.
    assert max(total.values()) - min(total.get(i, 0) for i in range(n)) <= 1


def test_sampler_carries_permutations_over_epochs():
    # 10 cases, 4 per epoch: the first 5 epochs must cover all cases twice (5 * 4 = 2 * 10),
    # which restarting a shuffled loader every epoch cannot guarantee.
    sampler = EvenSampler(10, 4, seed=3)
    counts = sum(epoch_counts(sampler, 5), Counter())
    assert sorted(counts.values()) == [2] * 10


def test_sampler_is_equiprobable():
    # Each case is equally likely to be in a given epoch: first-epoch frequency over many seeds.
    hits = Counter()
    for seed in range(600):
        hits.update(iter(EvenSampler(6, 2, seed)))
    assert all(abs(hits[i] / 600 - 2 / 6) < 0.07 for i in range(6))


def test_sampler_state_round_trip():
    a = EvenSampler(9, 5, seed=0)
    list(a), list(a)
    b = EvenSampler(9, 5, seed=99)
    b.load_state_dict(a.state_dict())
    assert [list(a) for _ in range(4)] == [list(b) for _ in range(4)]


def batches_of(indices: list[int], batch: int) -> list[list[int]]:
    return [indices[first:first + batch] for first in range(0, len(indices), batch)]


@pytest.mark.parametrize("n, batch, samples", [(10, 4, 28), (10, 10, 30), (9, 4, 20), (20, 7, 63),
                                                (100, 64, 320), (7, 4, 17), (12, 5, 37), (5, 2, 2)])
def test_single_process_batches_never_hold_a_case_twice(n, batch, samples):
    # A batch spanning two permutations (or the last one and the extras) must not repeat a case,
    # and keeping it out must not make the counts uneven. (7, 4, 17) and (12, 5, 37) end in a
    # shorter batch.
    sampler = EvenSampler(n, samples, seed=1, batch_size=batch)
    total = Counter()
    for epoch in range(40):
        indices = list(iter(sampler))
        for step, cases in enumerate(batches_of(indices, batch)):
            assert len(set(cases)) == len(cases), f"epoch {epoch} step {step}: {sorted(cases)}"
        counts = Counter(indices)
        per_case = [counts.get(i, 0) for i in range(n)]
        assert sum(per_case) == samples and max(per_case) - min(per_case) <= 1
        total.update(counts)
    assert max(total.values()) - min(total.get(i, 0) for i in range(n)) <= 1


@pytest.mark.parametrize("n, window", [(10, 4), (10, 10), (30, 7), (5, 12), (3, 8)])
def test_spread_repeats_keeps_the_draws_and_caps_each_case_per_window(n, window):
    generator = torch.Generator().manual_seed(0)
    drawn = [i for _ in range(40) for i in torch.randperm(n, generator=generator).tolist()]
    drawn += torch.randperm(n, generator=generator).tolist()[:n // 2]   # the extras
    spread = list(drawn)
    spread_repeats(spread, window)
    assert Counter(spread) == Counter(drawn)
    cap = math.ceil(window / n)          # 1 whenever the window is not larger than the cases
    assert all(max(Counter(cases).values()) <= cap for cases in batches_of(spread, window))


def test_spread_repeats_moves_only_what_it_must():
    indices = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    spread_repeats(indices, 3)
    assert indices == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    indices = [0, 1, 2, 2, 1, 0]         # batches [0, 1] [2, 2] [1, 0]: the second 2 waits a batch
    spread_repeats(indices, 2)
    assert indices == [0, 1, 2, 1, 2, 0]


def test_sampler_state_round_trip_with_batches():
    # The reordering depends on the drawn cases alone, so a resumed sampler draws the same batches.
    a = EvenSampler(9, 20, seed=0, batch_size=4)
    list(a), list(a)
    b = EvenSampler(9, 20, seed=99, batch_size=4)
    b.load_state_dict(a.state_dict())
    assert [list(a) for _ in range(4)] == [list(b) for _ in range(4)]


@pytest.mark.parametrize("voxel", [(0, 0, 0), (10, 31, 5), (19, 63, 9), (3, 60, 2)])
def test_a_foreground_crop_is_centred_on_the_voxel_or_moved_just_inside_the_volume(voxel):
    shape, patch = (20, 64, 10), (16, 16, 16)                     # z: the volume is thinner than the patch
    foreground = np.array([[1, *voxel]], np.int32)
    window = patch_window(shape, patch, foreground, foreground_crops=1.0)
    sizes = [min(p, s) for p, s in zip(patch, shape)]
    assert [w.stop - w.start for w in window] == sizes
    for w, v, size, side in zip(window, voxel, sizes, shape):
        assert 0 <= w.start <= v < w.stop <= side
        assert w.start == min(max(v - size // 2, 0), side - size)  # centred, unless the edge is nearer


def test_foreground_crops_draw_each_present_class_alike():
    foreground = np.array([[1, 2, 2, 2]] * 99 + [[2, 17, 60, 7]], np.int32)    # class 2: one voxel of 100
    np.random.seed(0)
    starts = Counter(patch_window((20, 64, 10), (16, 16, 16), foreground, 1.0)[1].start for _ in range(2000))
    assert set(starts) == {0, 48} and starts[48] / 2000 == pytest.approx(0.5, abs=0.05)


def test_a_run_with_foreground_crops_resumes_exactly(task_dir, tmp_path, monkeypatch):
    options = ["-data_dir", str(task_dir), *TINY, "-epochs", "3", "-patch_size", "8", "8", "8",
               "-foreground_crops", "1.0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert entry.main([*options, "-best_models_dir", str(whole)]) == 0
    interrupt_validation(monkeypatch, at_call=2)
    assert entry.main([*options, "-best_models_dir", str(parts)]) == 130
    monkeypatch.undo()
    assert entry.main(["-best_models_dir", str(parts), "-resume", "True"]) == 0
    assert learning_figures(parts) == learning_figures(whole)
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parts / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
