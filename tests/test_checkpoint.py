"""Checkpoint helpers: random-generator states restored across machines; files written whole."""
import os
import random

import numpy as np
import pytest
import torch

from utils.training.checkpoint import rng_states, set_rng_states
from utils.files import current_umask, written_atomically


def test_random_states_round_trip():
    saved = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def fake_gpus(monkeypatch, count: int) -> dict:
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    return restored


def test_cuda_states_of_more_gpus_than_this_machine_has_restore_the_ones_it_has(monkeypatch):
    saved = {**rng_states(), "cuda": [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]}
    restored = fake_gpus(monkeypatch, 1)
    set_rng_states(saved)                       # saved on 2 GPUs, resumed on 1
    assert list(restored) == [0] and torch.equal(restored[0], saved["cuda"][0])
    restored = fake_gpus(monkeypatch, 0)
    set_rng_states(saved)                       # resumed on a CPU
    assert restored == {}
    restored = fake_gpus(monkeypatch, 2)
    set_rng_states({**saved, "cuda": []})       # saved on a CPU, resumed on 2 GPUs
    assert restored == {}


def test_a_file_written_atomically_is_whole_or_the_previous_one(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with written_atomically(path) as file:
            file.write("half of the new ")
            assert path.read_text() == "previous"          # nothing is visible while writing
            raise RuntimeError("killed half-way")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["metrics.csv"]
    with written_atomically(path) as first, written_atomically(path) as second:   # two writers at once
        first.write("first")
        second.write("second")
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["metrics.csv"]   # the last rename wins
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
