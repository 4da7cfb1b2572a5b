"""The run log: each epoch's row and line, metrics.csv, curves, TensorBoard, peak memory."""
import csv
import json

import pytest
import torch

import main as entry
from conftest import TINY
from test_trainer import make_trainer
from utils.args import EPOCHS_UNDER_A_TIME_LIMIT
from utils.training.run_log import RunLog


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def test_an_epoch_gives_its_row_keeps_the_history_and_a_frame_and_writes_metrics_csv(tmp_path, capsys):
    log = RunLog(tmp_path, ["Anterior", "Posterior"], torch.device("cpu"), epochs=5, tensorboard=False)
    metrics = {"loss": 0.5, "dice": torch.tensor([0.25, 0.75]), "predictions": [torch.zeros(1, 4, 6, 8)]}
    row = log.epoch(1, 0.9, metrics, lr=0.01, improved=True, minutes=0.25, extra={"consistency_loss": 0.1})
    assert {k: row[k] for k in ("epoch", "train_loss", "val_loss", "dice_Anterior", "dice_mean", "lr",
                                "consistency_loss")} == {"epoch": 1, "train_loss": 0.9, "val_loss": 0.5,
                                                         "dice_Anterior": 0.25, "dice_mean": 0.5, "lr": 0.01,
                                                         "consistency_loss": 0.1}
    assert row["peak_rss_mb"] > 0 and log.history == [row]
    assert len(log.progress_frames) == 1 and sorted(frame.numel() for frame in log.progress_frames[0]) == [24, 32, 48]
    assert list(csv.DictReader(open(tmp_path / "metrics.csv")))[0]["dice_mean"] == "0.5"
    assert capsys.readouterr().out.startswith("epoch   1/5  train loss 0.9000  val loss 0.5000")
    assert RunLog(tmp_path, [], torch.device("cpu")).epoch_name(7) == "epoch   7"


def test_curves_are_redrawn_at_most_every_interval_and_after_the_last_epoch(task_dir, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr("utils.training.run_log.plot_curves", lambda history, names, path: drawn.append(len(history)))
    make_trainer(task_dir, tmp_path / "run", epochs=4).training_loop()
    assert drawn == [1, 4]          # quick epochs: the first, then the whole run at the end
    drawn.clear()
    monkeypatch.setattr("utils.training.run_log.CURVES_EVERY_SECONDS", 0)
    make_trainer(task_dir, tmp_path / "run2", epochs=3).training_loop()
    assert drawn == [1, 2, 3, 3]


def test_epoch_lines_give_the_number_of_epochs_only_when_epochs_end_the_run(task_dir, tmp_path, capsys):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=1)
    trainer.training_loop()
    assert capsys.readouterr().out.startswith("epoch   1/1  train loss")
    # As parse_args sets a time limit alone; it stops after one epoch.
    trainer = make_trainer(task_dir, tmp_path / "run2", max_minutes=1e-6, epochs=EPOCHS_UNDER_A_TIME_LIMIT)
    trainer.training_loop()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch   1  train loss") and str(EPOCHS_UNDER_A_TIME_LIMIT) not in "".join(lines)


def test_every_run_records_its_peak_memory_per_epoch_at_the_end_and_in_its_last_line(task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(task_dir, run) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    peaks = [float(row["peak_rss_mb"]) for row in rows]
    assert len(peaks) == 2 and 50 < peaks[0] <= peaks[1] < 20_000          # a process peak only grows
    saved = json.loads((run / "config.json").read_text())
    assert saved["peak_memory"]["peak_rss_mb"] >= peaks[-1] and saved["epochs_trained"] == 2
    assert f"peak memory {saved['peak_memory']['peak_rss_mb']:.0f} MB (RSS)" in capsys.readouterr().out.splitlines()[-1]


def test_tensorboard_gets_each_epochs_scalars_and_the_predictions(task_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-epochs", "3") == 0
    events = EventAccumulator(str(run)).Reload()
    assert [e.step for e in events.Scalars("dice/mean")] == [1, 2, 3]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [round(e.value, 5) for e in events.Scalars("dice/Anterior")] == [round(float(r["dice_Anterior"]), 5) for r in rows]
    assert {"lr", "memory/peak_rss_mb"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["predictions"]


