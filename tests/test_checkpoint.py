"""Checkpoints: one format version, older ones upgraded in one place; random-generator states
restored across machines; files written whole."""
import os
import random

import numpy as np
import pytest
import torch

import main as entry
from utils.errors import CheckpointError
from utils.training.checkpoint import FORMAT_VERSION, load_checkpoint, rng_states, set_rng_states
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


def small_run(task_dir, run_dir) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), "-device", "cpu", "-epochs", "1",
                       "-Nit", "1", "-batch_size", "2", "-channels", "4", "8", "-num_res_units", "0",
                       "-patch_size", "16", "16", "16", "-mixed_precision", "False"])


def test_a_version_1_checkpoint_is_upgraded_where_it_is_read_and_others_are_refused(task_dir, tmp_path, capsys):
    assert small_run(task_dir, tmp_path / "run") == 0
    now = load_checkpoint(tmp_path / "run" / "best.pt")
    assert now["format_version"] == FORMAT_VERSION
    # Version 1 (no version recorded) as the oldest checkpoints wrote it: a U-Net without its
    # name, no training extent, no labelled share, no unlabelled scans.
    old = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    for key in ("format_version", "training_extent_mm", "labelled", "unlabelled_ids"):
        del old[key]
    for key in ("architecture", "input_divisor"):
        del old["model_config"][key]
    torch.save(old, tmp_path / "old.pt")
    upgraded = load_checkpoint(tmp_path / "old.pt")
    assert upgraded["model_config"] == now["model_config"] and upgraded["format_version"] == FORMAT_VERSION
    assert upgraded["labelled"] == now["split"]["train"] and upgraded["unlabelled_ids"] is None
    assert upgraded["training_extent_mm"] == [float(side) for side in now["preprocessing"]["target_shape"]]
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(tmp_path / "old.pt")]) == 0
    torch.save({**old, "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}; this program reads versions 1"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({**old, "format_version": "2"}, tmp_path / "odd.pt")          # not a number: a sentence too
    with pytest.raises(CheckpointError, match="format version 2; this program reads versions 1"):
        load_checkpoint(tmp_path / "odd.pt")
