"""Faults (kill -9, Ctrl-C, full disk, NaN loss) and bad input: no lost work, clear messages."""
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.utils import set_determinism

import main as entry
from conftest import ROOT, TINY, learning_figures, write_task
from utils.training import checkpoint as checkpoint_module
from utils.training.checkpoint import load_checkpoint
from utils.training.environment import seed_everything
from utils.errors import CheckpointError

EPOCHS = ["-epochs", "3"]


def options(task_dir, run_dir, *extra):
    return ["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *EPOCHS, *extra]


def metrics_text(run_dir) -> list[dict]:
    return learning_figures(run_dir)


def same_weights(a, b) -> bool:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run to compare interrupted-and-resumed runs with."""
    root = tmp_path_factory.mktemp("reference")
    task = write_task(root / "data")
    assert entry.main(options(task, root / "run")) == 0
    return task, root / "run"


@pytest.mark.parametrize("fault, when", [
    ("kill_in_step", 3),   # during epoch 2's training
    ("kill_in_save", 2),   # half-way through writing epoch 1's best.pt
    ("kill_in_save", 3),   # half-way through writing epoch 1's last.pt
    ("kill_in_save", 5),   # half-way through writing epoch 2's last.pt (or best.pt)
])
@pytest.mark.slow
def test_kill_9_then_resume_ends_like_an_uninterrupted_run(reference, tmp_path, fault, when):
    task, whole = reference
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_runner.py"), fault, str(when), *options(task, run)],
                            cwd=Path.cwd(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] < 3      # whatever is there still loads
    assert entry.main(["-best_models_dir", str(run), "-resume", "True"]) == 0
    assert metrics_text(run) == metrics_text(whole)
    assert same_weights(run / "last.pt", whole / "last.pt")
    assert same_weights(run / "best.pt", whole / "best.pt")
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_ctrl_c_saves_prints_how_to_resume_and_exits_non_zero(tmp_path):
    task = write_task(tmp_path / "data")
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *options(task, run), "-epochs", "400"], cwd=Path.cwd(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] >= 1):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert f"python main.py -best_models_dir {run} -resume True" in err
    saved = load_checkpoint(run / "last.pt")["epoch"]
    assert saved >= 1
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", str(saved + 1)]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == saved + 1


def test_full_disk_keeps_the_previous_checkpoint(task_dir, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    saves = []

    def full_disk(obj, file, *args, **kwargs):
        saves.append(1)
        if len(saves) >= 4:          # epoch 2's first checkpoint
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    run = tmp_path / "run"
    assert entry.main(options(task_dir, run)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "is intact" in err and "-resume True" in err
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_unwritable_run_folder(task_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert entry.main(options(task_dir, blocker / "run")) == 1
    assert "Cannot create the run folder" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "1"])
def test_same_seed_gives_identical_metrics(task_dir, tmp_path, workers):
    for name in ("a", "b"):
        assert entry.main(options(task_dir, tmp_path / name, "-num_workers", workers)) == 0
    assert metrics_text(tmp_path / "a") == metrics_text(tmp_path / "b")


def test_seed_everything_draws_as_monais_set_determinism_and_leaves_cudnn_alone():
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        seed_everything(7)
        ours = random.random(), np.random.rand(), torch.rand(3).tolist()
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        set_determinism(7)
        assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == ours
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)   # what it would undo
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


# ---------------------------------------------------------------- bad input, end to end


def corrupt_dataset_json(task):
    (task / "dataset.json").write_text("{")


def list_missing_file(task):
    (task / "imagesTr" / "hippocampus_002.nii.gz").unlink()


def truncate_nifti(task):
    path = task / "labelsTr" / "hippocampus_001.nii.gz"
    path.write_bytes(path.read_bytes()[:60])


def mismatch_shapes(task):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), task / "labelsTr" / "hippocampus_003.nii.gz")


def mismatch_affines(task):
    path = task / "labelsTr" / "hippocampus_003.nii.gz"
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([1, 1, 3.0, 1])), path)


def undeclared_label(task):
    path = task / "labelsTr" / "hippocampus_004.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


@pytest.mark.parametrize("damage, message", [
    (corrupt_dataset_json, "dataset.json is malformed"),
    (list_missing_file, "hippocampus_002.nii.gz is listed in"),
    (truncate_nifti, "hippocampus_001.nii.gz: "),
    (mismatch_shapes, "but its label"),
    (mismatch_affines, "different affines"),
    (undeclared_label, "label values [5]"),
])
def test_bad_data_is_named_without_a_traceback(task_dir, tmp_path, capsys, damage, message):
    damage(task_dir)
    assert entry.main(options(task_dir, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in err and "Traceback" not in err


def test_data_dir_that_is_not_a_task_folder(tmp_path, capsys):
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    (folder / "beach.jpg").write_bytes(b"jpeg")
    assert entry.main(options(folder, tmp_path / "run")) == 1
    assert "is not a task folder" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["beach.jpg"]


def test_checkpoint_that_is_not_a_checkpoint(task_dir, tmp_path, capsys):
    fake = tmp_path / "weights.pt"
    fake.write_text("hello")
    assert entry.main(options(task_dir, tmp_path / "run", "-train_from_checkpoint", str(fake))) == 1
    assert "is not a checkpoint this program can read safely" in capsys.readouterr().err
    torch.save({"just": torch.zeros(2)}, fake)
    assert entry.main(options(task_dir, tmp_path / "run2", "-train_from_checkpoint", str(fake))) == 1
    assert "not a checkpoint of this program" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_untrusted_checkpoint_cannot_run_code(tmp_path):
    payload = Payload()
    payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as file:
        pickle.dump({"model": payload, "model_config": {}, "preprocessing": {}}, file)
    with pytest.raises(CheckpointError, match="not a checkpoint this program can read safely"):
        load_checkpoint(evil)
    assert not payload.marker.exists()


def test_checkpoint_with_another_class_count(task_dir, tmp_path, capsys):
    assert entry.main(options(task_dir, tmp_path / "base")) == 0
    other = write_task(tmp_path / "other", n_cases=8)
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"]["3"] = "extra"
    (other / "dataset.json").write_text(json.dumps(meta))
    code = entry.main(options(other, tmp_path / "run", "-train_from_checkpoint", str(tmp_path / "base" / "best.pt")))
    assert code == 1
    assert "out_channels: checkpoint 3 vs now 4" in capsys.readouterr().err


def test_batch_larger_than_the_training_set(task_dir, tmp_path, capsys):
    assert entry.main(options(task_dir, tmp_path / "run", "-batch_size", "10")) == 0
    assert "-batch_size 10 is larger than the 6 training cases" in capsys.readouterr().out
    assert entry.main(options(task_dir, tmp_path / "run2", "-batch_size", "10", "-Nit", "None")) == 0


def test_more_validation_than_training_cases(task_dir, tmp_path, capsys):
    assert entry.main(options(task_dir, tmp_path / "run", "-train_val_ratio", "0.3")) == 1
    assert "no more validation than training cases" in capsys.readouterr().err
