"""On a machine with a CUDA GPU: fp16 training with an enabled GradScaler, resume (also of a run
started on the CPU), prediction, and the GPU's default batch size. Skipped without CUDA; the fp16
path itself is also tested on the CPU (tests/test_trainer.py, fixture fp16_on_cpu)."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import main as entry
from conftest import TINY, interrupt_validation, synthetic_case
from utils.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_GPU = [*TINY, "-device", "cuda", "-mixed_precision", "True"]      # the last -device wins


def train(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *ON_GPU, *extra])


def test_fp16_training_uses_an_enabled_grad_scaler(task_dir, tmp_path):
    run = tmp_path / "run"
    assert train(task_dir, run, "-epochs", "3") == 0
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 3 and state["rng"]["device"] == "cuda"
    assert state["scaler"]["scale"] > 0                   # an enabled scaler saves its scale
    assert all(np.isfinite(float(row["train_loss"])) for row in state["history"])


def test_an_interrupted_gpu_run_resumes_on_the_gpu(task_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_validation(monkeypatch, at_call=2)                  # Ctrl-C in epoch two
    assert train(task_dir, run, "-epochs", "3") == 130
    monkeypatch.undo()
    assert entry.main(["-best_models_dir", str(run), "-resume", "True"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_a_cpu_run_resumes_on_the_gpu_in_fp16(task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run), *TINY, "-epochs", "1",
                       "-mixed_precision", "False"]) == 0
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2", "-device", "cuda",
                       "-mixed_precision", "True"]) == 0
    assert "saved by 1 process(es) on cpu and continues with 1 on cuda" in capsys.readouterr().out
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["scaler"]["scale"] > 0


def test_prediction_on_the_gpu_matches_the_cpu(task_dir, tmp_path):
    run = tmp_path / "run"
    assert train(task_dir, run, "-epochs", "4", "-Nit", "4", "-lr", "0.05") == 0
    image, _ = synthetic_case(np.random.default_rng(3), (11, 17, 9), as_uint8=False)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "in" / "scan.nii.gz")
    for device in ("cuda", "cpu"):
        assert entry.main(["-predict", str(tmp_path / "in"), "-train_from_checkpoint", str(run / "best.pt"),
                           "-predictions_dir", str(tmp_path / device), "-device", device,
                           "-mixed_precision", "False"]) == 0
    gpu, cpu = (np.asarray(nib.load(tmp_path / d / "scan.nii.gz").dataobj) for d in ("cuda", "cpu"))
    assert gpu.shape == (11, 17, 9) and (gpu == cpu).mean() > 0.99


def test_the_gpu_batch_size_is_16_unless_given(task_dir, tmp_path):
    options = [o for o in ON_GPU]
    at = options.index("-batch_size")
    del options[at:at + 2]
    assert entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(tmp_path / "run"), *options,
                       "-epochs", "1"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["batch_size"] == 16
    assert torch.backends.cudnn.benchmark
