"""EvenSampler: exact epochs, even and equiprobable draws, carried-over permutations, state."""
from collections import Counter

import pytest

from utils.sampling import EvenSampler


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
