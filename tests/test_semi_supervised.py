"""Unlabelled scans and the mean teacher (utils/training/semi_supervised.py): the unlabelled loader, the
consistency loss and the teacher's average, exact resume with it on, and bad unlabelled files named."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import main as entry
from conftest import TINY, interrupt_validation, learning_figures, write_task
from utils.training.checkpoint import load_checkpoint
from utils.data_class import labelled_subset
from utils.data.layouts import read_task, read_unlabelled
from utils.training.checkpoint import upgraded
from utils.training.semi_supervised import MeanTeacher


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def write_unlabelled(folder, count=3, shape=(11, 13, 12), seed=5):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        nib.save(nib.Nifti1Image(rng.normal(100, 20, shape).astype(np.float32), np.eye(4)),
                 folder / f"scan_{i}.nii.gz")
    return folder


def test_labelled_subset_keeps_a_seeded_share_and_gives_the_rest():
    ids = [f"c{i}" for i in range(10)]
    labelled, unlabelled = labelled_subset(ids, 0.3, seed=1)
    assert len(labelled) == 3 and sorted(labelled + unlabelled) == ids
    assert labelled_subset(ids, 0.3, seed=1) == (labelled, unlabelled)
    assert labelled_subset(ids, 1.0, seed=1) == (ids, [])
    assert len(labelled_subset(ids, 0.01, seed=1)[0]) == 1                   # at least one


def test_the_ramp_rises_from_near_zero_to_the_weight():
    teacher = MeanTeacher(torch.nn.Linear(2, 2), weight=0.1, rampup=0.4, ema_decay=0.99, loss="mse", threshold=0.9)
    assert teacher.ramp(0.0) == pytest.approx(0.1 * math.exp(-5))
    assert teacher.ramp(0.2) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert teacher.ramp(0.4) == teacher.ramp(0.9) == 0.1


def test_the_teacher_is_torchs_exponential_average_of_the_student_from_its_first_update():
    student = torch.nn.Linear(2, 1)
    mean = MeanTeacher(student, weight=1.0, rampup=0.0, ema_decay=0.9, loss="mse", threshold=0.9)
    assert isinstance(mean.teacher, AveragedModel)
    with torch.no_grad():
        student.weight.add_(1.0)
    mean.update(student, step=1)                   # the first update copies the student
    assert torch.equal(mean.teacher.module.weight, student.weight)
    before = student.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    mean.update(student, step=100)                 # late in the run: the full decay
    assert torch.allclose(mean.teacher.module.weight, 0.9 * before + 0.1 * student.weight)
    assert not mean.teacher.module.weight.requires_grad
    teacher = mean.teacher.module.weight.clone()
    mean.update(student, step=2)                   # the first steps follow the student closely
    assert torch.allclose(mean.teacher.module.weight, 2 / 3 * teacher + 1 / 3 * student.weight)


def test_the_teachers_state_keeps_the_students_keys_and_its_updates_and_loads_old_checkpoints():
    student = torch.nn.Linear(2, 1)
    mean = MeanTeacher(student, 1.0, 0.0, 0.99, loss="mse", threshold=0.9)
    mean.update(student, step=1)
    mean.update(student, step=2)
    state = mean.state_dict()
    assert set(state["teacher"]) == set(student.state_dict()) and state["updates"] == 2
    again = MeanTeacher(torch.nn.Linear(2, 1), 1.0, 0.0, 0.99, loss="mse", threshold=0.9)
    again.load_state_dict(state)
    assert torch.equal(again.teacher.module.weight, mean.teacher.module.weight) and again.teacher.n_averaged == 2
    old = MeanTeacher(torch.nn.Linear(2, 1), 1.0, 0.0, 0.99, loss="mse", threshold=0.9)
    # A version-1 checkpoint, saved before "updates" was kept, is upgraded where checkpoints are read.
    version_1 = {"model_config": {"architecture": "unet"}, "preprocessing": {"target_shape": [4, 4, 4]},
                 "mean_teacher": {"teacher": state["teacher"]}}
    old.load_state_dict(upgraded(version_1, "old.pt")["mean_teacher"])
    with torch.no_grad():
        student.weight.add_(1.0)
    old.update(student, step=1000)                               # averages: not the first update's copy
    assert not torch.equal(old.teacher.module.weight, student.weight)


def test_consistency_is_zero_for_agreeing_scores_and_grows_with_disagreement():
    mean = MeanTeacher(torch.nn.Linear(2, 2), 1.0, 0.0, 0.99, loss="mse", threshold=0.9)
    a = torch.randn(2, 3, 4, 4, 4)
    assert mean.consistency(a, a).item() == 0
    assert mean.consistency(a, a + torch.randn_like(a)).item() > 0


def test_pseudo_labels_are_the_teachers_sure_labels():
    mean = MeanTeacher(torch.nn.Linear(2, 2), 1.0, 0.0, 0.99, loss="pseudo_label", threshold=0.9)
    teacher = torch.zeros(1, 3, 2, 1, 1)
    teacher[0, 2, 0] = 10.0                        # voxel 0: class 2, sure (softmax 0.9999)
    teacher[0, 1, 1] = 1.0                         # voxel 1: class 1, unsure (softmax 0.58)
    student = torch.randn(1, 3, 2, 1, 1)
    expected = -torch.log_softmax(student, 1)[0, 2, 0, 0, 0] / 2    # voxel 0 only, over both voxels
    assert mean.consistency(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    agreeing = torch.zeros(1, 3, 2, 1, 1)
    agreeing[0, 2] = 100.0                         # the student is sure of the teacher's labels
    assert mean.consistency(agreeing, teacher).item() == pytest.approx(0, abs=1e-6)
    assert MeanTeacher(torch.nn.Linear(2, 2), 1.0, 0.0, 0.99, loss="pseudo_label",
                       threshold=1.0).consistency(student, teacher).item() == 0    # nothing sure enough


def test_mean_teacher_trains_with_a_labelled_fraction_and_resumes_exactly(task_dir, tmp_path, monkeypatch, capsys):
    options = ["-epochs", "3", "-mean_teacher", "True", "-labelled_fraction", "0.5", "-consistency_rampup", "0.3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(task_dir, whole, *options) == 0
    out = capsys.readouterr().out
    assert "3 training cases keep their labels, 3 are used as unlabelled scans" in out
    state = load_checkpoint(whole / "last.pt")
    assert set(state["mean_teacher"]["teacher"]) == set(state["model"])
    assert len(state["labelled"]) == 3 and len(state["unlabelled_ids"]) == 3
    assert not set(state["labelled"]) & set(state["unlabelled_ids"])

    interrupt_validation(monkeypatch, at_call=2)
    assert run_main(task_dir, parts, *options) == 130
    monkeypatch.undo()
    assert entry.main(["-best_models_dir", str(parts), "-resume", "True"]) == 0
    assert learning_figures(parts) == learning_figures(whole)
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parts / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["mean_teacher"]["teacher"][k], b["mean_teacher"]["teacher"][k]) for k in a["model"])
    assert a["mean_teacher"]["updates"] == b["mean_teacher"]["updates"] > 0


def test_weight_zero_trains_exactly_as_without_the_method_and_a_weight_changes_it(task_dir, tmp_path):
    # The unlabelled batches and noise come from their own random stream: with weight 0 the
    # network sees the same labelled batches and gets the same updates as without the method.
    common = ["-labelled_fraction", "0.5", "-mixed_precision", "False"]
    assert run_main(task_dir, tmp_path / "plain", *common) == 0
    teacher = ["-mean_teacher", "True", "-consistency_rampup", "0"]
    assert run_main(task_dir, tmp_path / "zero", *common, *teacher, "-consistency_weight", "0") == 0
    assert run_main(task_dir, tmp_path / "ten", *common, *teacher, "-consistency_weight", "10") == 0
    plain, zero, ten = (load_checkpoint(tmp_path / name / "last.pt") for name in ("plain", "zero", "ten"))
    assert plain["labelled"] == zero["labelled"] == ten["labelled"]
    assert all(torch.equal(plain["model"][k], zero["model"][k]) for k in plain["model"])
    assert not all(torch.equal(plain["model"][k], ten["model"][k]) for k in plain["model"])
    rows = learning_figures(tmp_path / "ten")
    assert all(float(row["consistency_loss"]) > 0 for row in rows)


def test_resume_refuses_other_unlabelled_options(task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-epochs", "1", "-mean_teacher", "True", "-labelled_fraction", "0.5") == 0
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2",
                       "-labelled_fraction", "0.3"]) == 1
    assert "-labelled_fraction 0.3 differs from the run being resumed (0.5)" in capsys.readouterr().err
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2", "-ema_decay", "0.9"]) == 0


def test_pseudo_label_consistency_trains_and_its_threshold_needs_it(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "run", "-mean_teacher", "True", "-labelled_fraction", "0.5",
                    "-consistency_loss", "pseudo_label", "-pseudo_label_threshold", "0.5",
                    "-consistency_rampup", "0") == 0
    assert all(float(row["consistency_loss"]) > 0 for row in learning_figures(tmp_path / "run"))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["consistency_loss"] == "pseudo_label"
    assert run_main(task_dir, tmp_path / "other", "-mean_teacher", "True", "-pseudo_label_threshold", "0.5") == 1
    assert "-pseudo_label_threshold applies to -consistency_loss pseudo_label only" in capsys.readouterr().err


def test_a_dynunet_with_deep_supervision_learns_from_unlabelled_scans(task_dir, tmp_path):
    assert entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(tmp_path / "run"), "-device", "cpu",
                       "-batch_size", "2", "-Nit", "2", "-epochs", "1", "-architecture", "dynunet",
                       "-channels", "4", "8", "-patch_size", "32", "32", "32", "-mean_teacher", "True",
                       # fp32: in bf16 this tiny network's loss became NaN once in 4 runs on a loaded machine
                       "-labelled_fraction", "0.5", "-consistency_rampup", "0", "-mixed_precision", "False"]) == 0
    assert float(learning_figures(tmp_path / "run")[0]["consistency_loss"]) > 0


def test_unlabelled_scans_from_a_folder_are_read_and_preprocessed(task_dir, tmp_path, capsys):
    folder = write_unlabelled(tmp_path / "unlabelled")
    assert run_main(task_dir, tmp_path / "run", "-mean_teacher", "True", "-unlabelled_dir", str(folder)) == 0
    assert "3 unlabelled scans for the mean teacher" in capsys.readouterr().out
    info = read_unlabelled(str(folder), read_task(task_dir))
    assert [label for _, label in info.pairs] == [None] * 3


def test_auto_without_imagests_and_a_bad_unlabelled_file_are_named(task_dir, tmp_path, capsys):
    assert run_main(task_dir, tmp_path / "a", "-mean_teacher", "True", "-unlabelled_dir", "auto") == 1
    assert "lists no unlabelled scans" in capsys.readouterr().err
    folder = write_unlabelled(tmp_path / "unlabelled")
    (folder / "scan_1.nii.gz").write_bytes(b"not a scan")
    assert run_main(task_dir, tmp_path / "b", "-mean_teacher", "True", "-unlabelled_dir", str(folder)) == 1
    assert "scan_1.nii.gz" in capsys.readouterr().err
    assert run_main(task_dir, tmp_path / "c", "-unlabelled_dir", str(folder)) == 1
    assert "-unlabelled_dir applies to -mean_teacher True only" in capsys.readouterr().err


def test_auto_reads_the_tasks_imagests(tmp_path, capsys):
    task = write_task(tmp_path / "data")
    write_unlabelled(task / "imagesTs", count=2)
    import json
    meta = json.loads((task / "dataset.json").read_text())
    meta["test"] = [f"./imagesTs/scan_{i}.nii.gz" for i in range(2)]
    (task / "dataset.json").write_text(json.dumps(meta))
    assert run_main(task, tmp_path / "run", "-mean_teacher", "True", "-unlabelled_dir", "auto", "-epochs", "1") == 0
    assert "2 unlabelled scans for the mean teacher" in capsys.readouterr().out
