"""The learning-rate range test (-lr_find): its curve, its suggestion, and the weights it leaves
alone. Tiny synthetic data, a few seconds a run."""
import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

import main as entry
from conftest import TINY
from utils.training.checkpoint import load_checkpoint


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def write_space(tmp_path, space: dict) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_lr_find_writes_its_curve_and_suggestion_and_leaves_the_checkpoint_alone(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "base") == 0
    checkpoint = tmp_path / "base" / "best.pt"
    before = file_hash(checkpoint)
    weights = load_checkpoint(checkpoint)["model"]
    capsys.readouterr()
    finder = tmp_path / "finder"
    assert run_main(task_dir, finder, "-lr_find", "True", "-train_from_checkpoint", str(checkpoint)) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(finder / "lr_find.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert len(rows) > 20 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-5)
    assert all(b / a == pytest.approx(lrs[1] / lrs[0], rel=1e-6) for a, b in zip(lrs, lrs[1:]))   # exponential
    suggested = float(out.split("suggested -lr ")[1].split()[0])
    assert lrs[0] < suggested < lrs[-1] and "steepest fall" in out
    assert (finder / "lr_find.png").stat().st_size > 0
    assert not any((finder / name).exists() for name in ("best.pt", "last.pt", "metrics.csv"))     # no training
    assert file_hash(checkpoint) == before                  # the weights it started from are untouched
    assert all(torch.equal(a, b) for a, b in zip(weights.values(), load_checkpoint(checkpoint)["model"].values()))


def test_lr_find_returns_the_model_to_its_weights(task_dir, tmp_path, monkeypatch):
    from utils.experiments import lr_finder
    seen = {}
    original = lr_finder.range_test

    def watched(trainer):
        before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        result = original(trainer)
        seen["same"] = all(torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())
        return result

    monkeypatch.setattr(lr_finder, "range_test", watched)
    assert run_main(task_dir, tmp_path / "finder", "-lr_find", "True") == 0
    assert seen["same"]


@pytest.mark.parametrize("other", [["-resume", "True"], ["-evaluate", "True"], ["-sweep", "SPACE"]])
def test_lr_find_refuses_another_kind_of_run(other, task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "run", "-epochs", "1") == 0           # a run there to resume
    other = [write_space(tmp_path, {"lr": [0.01]}) if word == "SPACE" else word for word in other]
    capsys.readouterr()
    assert run_main(task_dir, tmp_path / "run", "-lr_find", "True", *other) == 1
    assert f"-lr_find and {other[0]} are different kinds of run" in capsys.readouterr().err
    assert not (tmp_path / "run" / "lr_find.csv").exists()
