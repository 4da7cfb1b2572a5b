"""Sweeps (-sweep, Optuna): every trial an ordinary run, the grid and range spaces, pruning, results
of trials that fail, interrupted and shared sweeps. Tiny synthetic data, a few seconds a run."""
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import main as entry
from conftest import ROOT, TINY, interrupt_validation
from utils.args import parse_args
from utils.errors import UserError
from utils.experiments import sweep
from utils.training.checkpoint import load_checkpoint
from utils.trainer_class import Trainer


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def sweep_table(sweep_dir) -> list[dict]:
    return list(csv.DictReader(open(sweep_dir / "sweep.csv")))


def write_space(tmp_path, space: dict) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def test_sweep_options_without_a_sweep_are_refused(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "run", "-trials", "3") == 1
    assert "-trials applies to -sweep a space.json only" in capsys.readouterr().err


@pytest.mark.slow
def test_a_two_trial_grid_gives_two_ordinary_runs_a_table_a_picture_and_the_best_command(task_dir, tmp_path, capsys):
    space = write_space(tmp_path, {"lr": [0.02, 0.05]})
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-sweep", space) == 0
    printed = capsys.readouterr().out
    rows = sweep_table(out_dir)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "complete"), ("1", "complete")]
    assert sorted(float(r["lr"]) for r in rows) == [0.02, 0.05]
    for row in rows:
        trial = out_dir / f"trial_{row['number']}"
        assert {"config.json", "metrics.csv", "best.pt", "last.pt", "curves.png"} <= {p.name for p in trial.iterdir()}
        history = list(csv.DictReader(open(trial / "metrics.csv")))
        assert float(row["dice_mean"]) == pytest.approx(max(float(h["dice_mean"]) for h in history))
        assert int(row["epochs"]) == 2 and float(row["peak_rss_mb"]) > 0 and float(row["minutes"]) > 0
        assert json.loads((trial / "config.json").read_text())["config"]["lr"] == float(row["lr"])
    best = max(rows, key=lambda r: float(r["dice_mean"]))
    assert f"Best trial: {best['number']}" in printed and best["command"] in printed
    assert (out_dir / "sweep.png").stat().st_size > 0
    # a trial is an ordinary run: -evaluate works on it
    assert entry.main(["-evaluate", "True", "-best_models_dir", str(out_dir / "trial_0"), "-device", "cpu"]) == 0


@pytest.mark.slow
def test_out_of_memory_and_a_non_finite_loss_are_results_and_the_sweep_goes_on(task_dir, tmp_path, monkeypatch, capsys):
    original = Trainer.forward_pass

    def forward(self, batch):
        if self.config.batch_size == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.config.batch_size == 4:
            loss, logits = original(self, batch)
            return loss * float("nan"), logits
        return original(self, batch)

    monkeypatch.setattr(Trainer, "forward_pass", forward)
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-sweep", write_space(tmp_path, {"batch_size": [2, 3, 4]})) == 0
    states = {r["batch_size"]: r["state"] for r in sweep_table(out_dir)}
    assert states["2"] == "complete"
    assert states["3"].startswith("out of memory: OutOfMemoryError: CUDA out of memory")
    assert states["4"].startswith("failed: NonFiniteLossError: The training loss became nan")


@pytest.mark.slow
def test_a_trial_behind_is_pruned_and_recorded_with_its_epochs(task_dir, tmp_path, monkeypatch):
    # A pruner that stops every trial after its second epoch, so the test does not depend on
    # which trial learns faster; the MedianPruner gets the same reports.
    monkeypatch.setattr(sweep, "make_pruner", lambda: optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2))
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-epochs", "4", "-sweep", write_space(tmp_path, {"lr": [0.02, 0.05]})) == 0
    rows = sweep_table(out_dir)
    assert [r["state"] for r in rows] == ["pruned", "pruned"] and [r["epochs"] for r in rows] == ["2", "2"]
    assert all(float(r["dice_mean"]) >= 0 for r in rows)
    assert load_checkpoint(out_dir / "trial_1" / "last.pt")["epoch"] == 2      # it can still be resumed


@pytest.mark.slow
def test_the_median_pruner_is_fed_every_epochs_mean_dice(task_dir, tmp_path):
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-epochs", "3", "-sweep", write_space(tmp_path, {"lr": [0.05]})) == 0
    study = optuna.load_study(study_name=sweep.STUDY_NAME, storage=f"sqlite:///{out_dir / 'sweep.db'}")
    history = list(csv.DictReader(open(out_dir / "trial_0" / "metrics.csv")))
    assert study.trials[0].intermediate_values == {int(h["epoch"]): float(h["dice_mean"]) for h in history}
    assert isinstance(sweep.make_pruner(), optuna.pruners.MedianPruner)


@pytest.mark.slow
def test_an_interrupted_sweep_continues_without_running_finished_trials_again(task_dir, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "sweep"
    command = ["-sweep", write_space(tmp_path, {"lr": [0.01, 0.02, 0.05]})]
    interrupt_validation(monkeypatch, at_call=4)             # Ctrl-C in the second trial's second epoch
    assert run_main(task_dir, out_dir, *command) == 130
    assert "Continue the sweep with the same command" in capsys.readouterr().err
    first = sweep_table(out_dir)
    assert [r["state"] for r in first] == ["complete", "interrupted"]
    finished = (out_dir / "trial_0" / "metrics.csv").read_text()
    monkeypatch.undo()

    assert run_main(task_dir, out_dir, *command) == 0
    rows = sweep_table(out_dir)
    complete = [r for r in rows if r["state"] == "complete"]
    assert sorted(float(r["lr"]) for r in complete) == [0.01, 0.02, 0.05]      # each point once
    assert [r for r in rows if r["state"] == "interrupted"][0]["lr"] == first[1]["lr"]
    assert "0" in [r["number"] for r in complete]
    assert (out_dir / "trial_0" / "metrics.csv").read_text() == finished       # not run again
    assert len(rows) == 4


@pytest.mark.slow
def test_a_finished_sweep_run_again_starts_no_trial(task_dir, tmp_path, capsys):
    # (Optuna's MaxTrialsCallback, checked after a trial, would run a third one here: sweep.work_left.)
    out_dir = tmp_path / "sweep"
    command = ["-epochs", "1", "-trials", "2", "-sweep", write_space(tmp_path, {"lr": {"low": 0.01, "high": 0.05}})]
    assert run_main(task_dir, out_dir, *command) == 0
    first = sweep_table(out_dir)
    capsys.readouterr()
    assert run_main(task_dir, out_dir, *command) == 0
    assert "--- trial" not in capsys.readouterr().out
    assert sweep_table(out_dir) == first and [r["state"] for r in first] == ["complete", "complete"]


@pytest.mark.slow
def test_two_processes_share_one_study_and_never_run_a_point_twice(task_dir, tmp_path):
    out_dir = tmp_path / "sweep"
    space = write_space(tmp_path, {"lr": [0.01, 0.02, 0.03, 0.04]})
    command = [sys.executable, str(ROOT / "main.py"), "-data_dir", str(task_dir), "-best_models_dir", str(out_dir),
               *TINY, "-sweep", space]
    processes = [subprocess.Popen(command, cwd=Path.cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    rows = sweep_table(out_dir)
    assert sorted(float(r["lr"]) for r in rows) == [0.01, 0.02, 0.03, 0.04]
    assert all(r["state"] == "complete" for r in rows)
    ran = [out.count("--- trial") // 2 for out, _ in outputs]            # each trial prints two lines
    assert sum(ran) == 4


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": [0.01]}, "'learning_rate' is not an option of main.py"),
    ({"lr": [0.01, -1]}, 'lr = -1: -lr -1: -1.0 must be a finite number greater than 0'),
    ({"best_models_dir": ["a", "b"]}, "-best_models_dir cannot be swept"),
    ({"lr": []}, "lr has an empty list"),
    ({"lr": {"low": 0.01}}, 'the range of lr needs "low" and "high"'),
    ({"channels": {"low": 4, "high": 8}}, "channels takes no range of numbers"),
    ({"batch_size": {"low": 1.5, "high": 4}}, "batch_size takes whole numbers"),
    ({"num_res_units": [2]}, "num_res_units = 2: -num_res_units applies to -architecture unet only"),
    ({"patch_size": [[40, 50, 40]]}, "does not fit -architecture dynunet"),
    ([0.01], "must be a JSON object of options"),
])
def test_a_bad_space_is_refused_before_anything_runs(space, message, tmp_path):
    path = write_space(tmp_path, space)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        sweep.read_space(path, parse_args(["-architecture", "dynunet"] if "architecture" in message
                                          or "dynunet" in message else []))


def test_a_bad_space_stops_main_with_the_reason_and_no_trial(task_dir, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-sweep", write_space(tmp_path, {"lr": [0.01, 0]})) == 1
    assert "lr = 0: -lr 0: 0.0 must be a finite number greater than 0" in capsys.readouterr().err
    assert not (out_dir / "trial_0").exists()


@pytest.mark.slow
def test_a_range_space_runs_trials_trials_with_values_inside_it(task_dir, tmp_path):
    out_dir = tmp_path / "sweep"
    space = write_space(tmp_path, {"lr": {"low": 0.001, "high": 0.1, "log": True}, "batch_size": [2, 3]})
    assert run_main(task_dir, out_dir, "-epochs", "1", "-sweep", space, "-trials", "3") == 0
    rows = sweep_table(out_dir)
    assert len(rows) == 3 and all(0.001 <= float(r["lr"]) <= 0.1 and r["batch_size"] in ("2", "3") for r in rows)


@pytest.mark.slow
def test_another_space_in_the_same_folder_is_refused(task_dir, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-epochs", "1", "-sweep", write_space(tmp_path, {"lr": [0.05]})) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lr": [0.01]}))
    assert run_main(task_dir, out_dir, "-epochs", "1", "-sweep", str(other)) == 1
    assert 'another space or options (its space is {"lr": [0.05]})' in capsys.readouterr().err
    assert run_main(task_dir, out_dir, "-epochs", "2", "-sweep", write_space(tmp_path, {"lr": [0.05]})) == 1
    assert "its options differ: -epochs 1 there, 2 here" in capsys.readouterr().err
    # the same options in another order, and another data folder (a path of this machine), join it
    assert entry.main(["-sweep", write_space(tmp_path, {"lr": [0.05]}), "-device", "cpu", "-lr", "0.01",
                       *TINY[:-4], "-epochs", "1", "-best_models_dir", str(out_dir),
                       "-data_dir", str(task_dir)]) == 0
    assert len(sweep_table(out_dir)) == 1                      # its one point was done already


def test_journal_storage_for_a_shared_folder(tmp_path):
    storage = sweep.make_storage(f"journal:{tmp_path / 'sweep.journal'}", tmp_path)
    assert isinstance(storage, optuna.storages.JournalStorage)
    with pytest.raises(UserError, match="cannot be opened"):
        sweep.make_storage("nosuchdb://x", tmp_path)


@pytest.mark.slow
def test_a_trial_whose_process_died_is_failed_and_run_again(task_dir, tmp_path, monkeypatch):
    out_dir = tmp_path / "sweep"
    space = write_space(tmp_path, {"lr": [0.02, 0.05]})
    options = ["-epochs", "30", "-Nit", "1", "-sweep", space]
    command = [sys.executable, str(ROOT / "main.py"), "-data_dir", str(task_dir), "-best_models_dir", str(out_dir),
               *TINY, *options]
    process = subprocess.Popen(command, cwd=Path.cwd(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out_dir / "trial_0" / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.kill()                                   # SIGKILL: as the kernel's OOM killer does
    process.wait()
    monkeypatch.setattr(sweep, "HEARTBEAT_GRACE_SECONDS", 1)
    time.sleep(2)
    assert run_main(task_dir, out_dir, *options) == 0
    rows = sweep_table(out_dir)
    assert rows[0]["state"].startswith("died") and "its options ran again" in rows[0]["state"]
    assert sorted(float(r["lr"]) for r in rows if r["state"] == "complete") == [0.02, 0.05]
