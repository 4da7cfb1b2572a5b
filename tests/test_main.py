"""End-to-end runs of main.py on tiny synthetic data: in-process for speed, and one subprocess."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
from conftest import ROOT, TINY, interrupt_validation, learning_figures
from utils.training.checkpoint import load_checkpoint
from utils.training.networks import build_model, last_layer
from utils.trainer_class import Trainer


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def metrics(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_training_writes_a_run_folder_and_learns(task_dir, tmp_path):
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-epochs", "12", "-Nit", "4", "-lr", "0.05") == 0
    for name in ("best.pt", "last.pt", "metrics.csv", "config.json"):
        assert (run / name).is_file(), name
    rows = metrics(run)
    assert len(rows) == 12
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(float(r["dice_mean"]) for r in rows) > 0.5


def test_interrupted_run_resumes_to_the_same_result(task_dir, tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(task_dir, whole, "-epochs", "3") == 0

    interrupt_validation(monkeypatch, at_call=2)                  # Ctrl-C in epoch two
    assert run_main(task_dir, parts, "-epochs", "3") == 130
    assert "-resume True" in capsys.readouterr().err
    assert load_checkpoint(parts / "last.pt")["epoch"] == 1
    monkeypatch.undo()

    assert entry.main(["-best_models_dir", str(parts), "-resume", "True"]) == 0
    assert learning_figures(parts) == learning_figures(whole)
    a, b = load_checkpoint(whole / "last.pt")["model"], load_checkpoint(parts / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_fp16_resumes_with_fp16_and_its_grad_scaler(task_dir, tmp_path, fp16_on_cpu):
    """As a run started on a CPU (or in fp32) and continued on a GPU in fp16."""
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-epochs", "1", "-mixed_precision", "False") == 0
    assert load_checkpoint(run / "last.pt")["scaler"] == {}
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2",
                       "-mixed_precision", "True"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["scaler"]["scale"] > 0 and state["config"]["mixed_precision"]


def last_layer_keys(model_config: dict) -> set[str]:
    model = build_model(model_config)
    return {f"{name}.{p}" for name, module in model.named_modules() if module is last_layer(model)
            for p, _ in module.named_parameters()}


@pytest.mark.parametrize("num_res_units", ["0", "1"])      # 1 is the default network
def test_fine_tune_trains_only_the_last_layer(task_dir, tmp_path, capsys, num_res_units):
    assert run_main(task_dir, tmp_path / "base", "-num_res_units", num_res_units) == 0
    start = tmp_path / "base" / "best.pt"
    assert run_main(task_dir, tmp_path / "tuned", "-fine_tune", "True", "-train_from_checkpoint", str(start),
                    "-num_res_units", num_res_units) == 0
    before = load_checkpoint(start)
    after = load_checkpoint(tmp_path / "tuned" / "last.pt")
    last = last_layer_keys(before["model_config"])
    model = build_model(before["model_config"])   # the last layer is the one that makes the class scores
    assert last_layer(model).out_channels == 3
    changed = {k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])}
    assert changed == last
    trainable = sum(before["model"][k].numel() for k in last)
    total = sum(v.numel() for v in before["model"].values())
    assert f"Fine-tuning the last layer only: {trainable:,} trainable of {total:,} parameters" in capsys.readouterr().out


def test_fine_tune_from_random_weights(task_dir, tmp_path, monkeypatch):
    started = {}
    original = Trainer.training_loop

    def remember_the_start(self):
        started.update({k: v.clone() for k, v in self.network.state_dict().items()})
        return original(self)

    monkeypatch.setattr(Trainer, "training_loop", remember_the_start)
    assert run_main(task_dir, tmp_path / "run", "-fine_tune", "True") == 0
    after = load_checkpoint(tmp_path / "run" / "last.pt")
    changed = {k for k in started if not torch.equal(started[k], after["model"][k])}
    assert changed == last_layer_keys(after["model_config"])


def test_checkpoint_of_another_architecture_is_refused(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "base") == 0
    code = run_main(task_dir, tmp_path / "other", "-channels", "4", "8", "16",
                    "-train_from_checkpoint", str(tmp_path / "base" / "best.pt"))
    assert code == 1
    assert "holds a different network (channels: checkpoint [4, 8] vs now [4, 8, 16]" in capsys.readouterr().err


def test_a_finished_run_is_never_overwritten(task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(task_dir, run) == 0
    saved = (run / "best.pt").read_bytes()
    assert run_main(task_dir, run) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == saved


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert entry.main(["-best_models_dir", str(tmp_path / "empty"), "-resume", "True"]) == 1
    assert "Nothing to resume" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_without_a_gpu(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "run", "-device", "cuda") == 1
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_in_a_subprocess(task_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "-data_dir", str(task_dir), "-best_models_dir",
                           str(tmp_path / "run"), *TINY], cwd=Path.cwd(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "epoch   2/2" in done.stdout and "Best validation mean Dice" in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), "-data_dir", str(tmp_path / "nowhere.tar")], cwd=Path.cwd(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("native_bf16", [True, False])
def test_mixed_precision_on_a_cpu_without_native_bf16_says_it_trains_in_fp32(task_dir, tmp_path, monkeypatch,
                                                                            capsys, native_bf16):
    monkeypatch.setattr("utils.inference.evaluation.cpu_has_fast_bf16", lambda: native_bf16)
    assert run_main(task_dir, tmp_path / "run", "-epochs", "1", "-mixed_precision", "True") == 0
    said = "no native bf16" in capsys.readouterr().out
    assert said != native_bf16


def test_config_json_records_the_batch_size_used_on_the_cpu(task_dir, tmp_path):
    options = list(TINY)
    at = options.index("-batch_size")
    del options[at:at + 2]
    assert entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(tmp_path / "run"), *options,
                       "-epochs", "1"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["batch_size"] == 2 and load_checkpoint(tmp_path / "run" / "last.pt")["config"]["batch_size"] == 2


def test_split_seed_keeps_the_validation_cases_when_the_random_seed_changes(task_dir, tmp_path):
    def split(name, *options):
        assert run_main(task_dir, tmp_path / name, "-epochs", "1", "-Nit", "1", *options) == 0
        return json.loads((tmp_path / name / "config.json").read_text())["split"]

    default = split("default")
    assert split("seed_3_same_split", "-random_seed", "3", "-split_seed", "42") == default
    assert split("seed_3", "-random_seed", "3")["val"] != default["val"]
