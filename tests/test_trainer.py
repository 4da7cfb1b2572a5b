import csv
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from utils.args import config_from_dict
from utils.training.checkpoint import load_checkpoint
from utils.data.cache import load_cases
from utils.data_class import split_cases, train_loader

PACKAGE = str(Path(__file__).resolve().parents[1] / "utils")
from utils.data.layouts import read_task
from utils.training.losses import segmentation_loss
from utils.training.networks import build_model, downsampling_factor, model_config, training_outputs
from utils.training.semi_supervised import MeanTeacher, MeanTeacherTerm
from utils.trainer_class import NonFiniteLossError, Trainer, make_optimizer, memory_format
from utils.training.losses import make_loss


def make_trainer(task_dir, run_dir, **options) -> Trainer:
    config = config_from_dict({"batch_size": 2, "Nit": 2, "epochs": 2, "channels": [4, 8],
                               "num_res_units": 0, "best_models_dir": str(run_dir), **options})
    torch.manual_seed(config.random_seed)
    architecture = model_config(1, 3, config.channels, config.num_res_units, config.architecture,
                                config.patch_size, deep_supervision=config.deep_supervision)
    cases, preprocessing = load_cases(read_task(task_dir), divisor=downsampling_factor(architecture), progress=False)
    split = split_cases(cases.ids, config.train_val_ratio, config.random_seed)
    loader = train_loader(cases.subset(split["train"]), config.batch_size, config.Nit, True, 0, 0)
    model = build_model(architecture)
    optimizer = make_optimizer(model, config)
    run_dir.mkdir(exist_ok=True)
    return Trainer(model, make_loss(config.loss, None, training_outputs(architecture)), optimizer, loader,
                   cases.subset(split["val"]), config, run_dir, torch.device("cpu"),
                   ["Anterior", "Posterior"],
                   {"split": split, "preprocessing": preprocessing.to_dict(), "model_config": architecture})


def test_forward_pass_gives_loss_and_logits(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run")
    loss, logits = trainer.forward_pass(next(iter(trainer.train_loader)))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    assert logits.shape == (2, 3, 12, 14, 12)


def test_deep_supervision_loss_takes_every_output_and_forward_pass_returns_the_full_resolution(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", architecture="dynunet", patch_size=[32, 32, 32],
                           mixed_precision=False, channels_last=False)
    images, labels = next(iter(trainer.train_loader))             # whole volumes, padded to 16^3
    loss, logits = trainer.forward_pass((images, labels))
    assert logits.shape == (2, 3, 16, 16, 16)
    outputs = trainer.model(images)                                # training mode: every output, stacked
    assert outputs.shape == (2, 2, 3, 16, 16, 16)
    torch.testing.assert_close(logits, outputs[:, 0])
    base = segmentation_loss("dicece")
    expected = 2 / 3 * base(outputs[:, 0], labels.long()) + 1 / 3 * base(outputs[:, 1], labels.long())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.model.eval()                                           # validation: the full resolution only
    assert trainer.model(images).shape == (2, 3, 16, 16, 16)


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_mixed_precision_is_bf16_without_a_scaler_where_the_cpu_has_it(task_dir, tmp_path, monkeypatch,
                                                                          native_bf16, expected):
    monkeypatch.setattr("utils.inference.evaluation.cpu_has_fast_bf16", lambda: native_bf16)
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True)
    _, logits = trainer.forward_pass(next(iter(trainer.train_loader)))
    assert logits.dtype == expected
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=False)
    _, logits = trainer.forward_pass(next(iter(trainer.train_loader)))
    assert logits.dtype == torch.float32


def test_only_fp16_gets_a_grad_scaler(task_dir, tmp_path, monkeypatch):
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False), (None, False)):
        monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: dtype)
        assert make_trainer(task_dir, tmp_path / "run", mixed_precision=True).scaler.is_enabled() == scaled
    monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: torch.float16)
    assert not make_trainer(task_dir, tmp_path / "run", mixed_precision=False).scaler.is_enabled()


def steps_recorded(trainer, overflow_step: int | None = None, poison_step: int | None = None):
    """Wrap forward and backward: record each step's loss and whether the weights changed; make
    the gradients of step `overflow_step` infinite, or the loss of `poison_step` NaN."""
    record = {"losses": [], "changed": []}
    forward, backward = trainer.forward_pass, trainer.backward_pass
    first_weight = next(trainer.network.parameters())

    def recording_forward(batch):
        loss, logits = forward(batch)
        if len(record["losses"]) + 1 == poison_step:
            loss = loss * float("nan")
        record["losses"].append(loss.item())
        return loss, logits

    def recording_backward(loss):
        before = [p.detach().clone() for p in trainer.network.parameters()]
        hook = (first_weight.register_hook(lambda grad: grad * float("inf"))
                if len(record["losses"]) == overflow_step else None)
        backward(loss)
        if hook is not None:
            hook.remove()
        record["changed"].append(any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters())))

    trainer.forward_pass, trainer.backward_pass = recording_forward, recording_backward
    return record


def test_fp16_grad_scaler_skips_an_overflowing_step_and_lowers_its_scale(task_dir, tmp_path, fp16_on_cpu):
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True, Nit=3)
    assert trainer.scaler.is_enabled()
    _, logits = trainer.forward_pass(next(iter(trainer.train_loader)))
    assert logits.dtype == torch.float16
    scale = trainer.scaler.get_scale()
    record = steps_recorded(trainer, overflow_step=2)
    mean_loss = trainer.train_one_epoch()
    assert record["changed"] == [True, False, True]              # the overflowing step was skipped
    assert trainer.scaler.get_scale() == scale / 2
    assert mean_loss == pytest.approx(sum(record["losses"]) / 3)  # a finite loss, still measured


def test_fp16_a_nan_loss_is_skipped_and_left_out_of_the_epoch_mean(task_dir, tmp_path, fp16_on_cpu):
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True, Nit=3)
    record = steps_recorded(trainer, poison_step=2)
    mean_loss = trainer.train_one_epoch()                        # no NonFiniteLossError: the scaler copes
    assert record["changed"] == [True, False, True]
    losses = record["losses"]
    assert math.isnan(losses[1]) and mean_loss == pytest.approx((losses[0] + losses[2]) / 2)


@pytest.mark.parametrize("fp16", [True, False])
def test_the_loss_is_read_back_every_step_only_without_a_scaler(task_dir, tmp_path, monkeypatch, fp16):
    """Reading a loss (item()) waits for the GPU; with fp16 the scaler makes it unnecessary. (The
    scaler's own step reads its overflow flag; only the Trainer's reads are counted.)"""
    if fp16:
        monkeypatch.setattr("utils.inference.evaluation.amp_dtype", lambda device: torch.float16)
        monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: torch.float16)
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True, Nit=6)
    reads = []
    item = torch.Tensor.item

    def counted_item(self):
        if sys._getframe(1).f_code.co_filename.endswith("trainer_class.py"):
            reads.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    trainer.train_one_epoch()
    assert len(reads) <= 2 if fp16 else len(reads) >= 6        # at the epoch's end only / every step


def test_with_the_mean_teacher_no_step_waits_for_the_device(task_dir, tmp_path, monkeypatch):
    """Under fp16 no code of the package reads a device value per step: neither a loss (item())
    nor the scaler's scale (get_scale(), which the teacher's step count used to read twice a
    step). The teacher still counts exactly the steps taken, through the optimizer's step hook."""
    monkeypatch.setattr("utils.inference.evaluation.amp_dtype", lambda device: torch.float16)
    monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: torch.float16)
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True, Nit=6)
    unlabelled = train_loader(trainer.val_cases, 2, 6, True, 0, 5, trainer.config.patch_size)
    teacher = MeanTeacher(trainer.network, 0.1, 0.0, 0.99, "mse", 0.9)
    trainer.extra_loss = MeanTeacherTerm(trainer.model, trainer.optimizer, unlabelled, teacher, trainer.autocast,
                                         trainer.device, memory_format(trainer.config), 0)
    reads = []
    item, get_scale = torch.Tensor.item, torch.amp.GradScaler.get_scale

    def ours(frame) -> bool:
        return frame.f_code.co_filename.startswith(PACKAGE)

    def counted_item(self):
        reads.append(("item", sys._getframe(1).f_code.co_name)) if ours(sys._getframe(1)) else None
        return item(self)

    def counted_get_scale(self):
        reads.append(("get_scale", sys._getframe(1).f_code.co_name)) if ours(sys._getframe(1)) else None
        return get_scale(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", counted_get_scale)
    trainer.train_one_epoch()
    assert reads == [("item", "train_one_epoch")] * 2                # the epoch's mean, at its end
    assert trainer.extra_loss.steps == 6                            # every step of the 6 was taken


def test_an_epoch_of_only_non_finite_losses_stops_even_with_a_scaler(task_dir, tmp_path, fp16_on_cpu):
    trainer = make_trainer(task_dir, tmp_path / "run", mixed_precision=True, Nit=2)
    forward = trainer.forward_pass
    trainer.forward_pass = lambda batch: (lambda loss, logits: (loss * float("inf"), logits))(*forward(batch))
    with pytest.raises(NonFiniteLossError, match="Every training loss of epoch 1"):
        trainer.train_one_epoch()


def test_channels_last_layout_trains_the_same_numbers(task_dir, tmp_path):
    steps = {}
    for channels_last in (False, True):
        trainer = make_trainer(task_dir, tmp_path / "run", channels_last=channels_last)
        trainer.network.to(memory_format=memory_format(trainer.config))   # as main.py does
        weights = [p for p in trainer.network.parameters() if p.ndim == 5]
        assert all(w.is_contiguous(memory_format=memory_format(trainer.config)) for w in weights)
        assert channels_last == all(not w.is_contiguous() for w in weights if w.shape[1] > 1)
        loss, logits = trainer.forward_pass(next(iter(trainer.train_loader)))
        trainer.backward_pass(loss)
        steps[channels_last] = loss.item(), logits.detach(), [w.detach().clone() for w in weights]
    (loss_a, logits_a, after_a), (loss_b, logits_b, after_b) = steps[False], steps[True]
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert torch.allclose(logits_a, logits_b, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after_a, after_b))


def test_backward_pass_steps_and_zeroes_gradients(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, _ = trainer.forward_pass(next(iter(trainer.train_loader)))
    trainer.backward_pass(loss)
    after = list(trainer.model.parameters())
    assert all(p.grad is None for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_training_loop_writes_checkpoints_and_metrics(task_dir, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(task_dir, run, epochs=3)
    trainer.training_loop()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "dice_Anterior", "dice_Posterior",
                            "dice_mean", "lr", "peak_rss_mb"}
    last = load_checkpoint(run / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "config", "split",
                "preprocessing", "model_config", "rng", "history"):
        assert key in last
    assert last["epoch"] == 3 and last["config"]["epochs"] == 3
    assert set(last["rng"]) == {"processes", "device", "sampler", "loader"} and last["rng"]["device"] == "cpu"
    assert set(last["rng"]["processes"][0]) == {"torch", "cuda", "numpy", "python"}
    best = load_checkpoint(run / "best.pt")
    assert best["best_metric"] == pytest.approx(max(float(r["dice_mean"]) for r in rows), abs=1e-6)
    assert not list(run.glob("*.tmp"))
    # Readable like any other file the user writes (mkstemp alone would make it private).
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    # progress.gif's frames are kept as three small mid-slices per epoch, not whole volumes.
    assert len(last["progress_frames"]) == 3
    assert all(len(frame) == 3 and all(s.ndim == 2 and s.dtype == torch.uint8 for s in frame)
               for frame in last["progress_frames"])
    assert (run / "progress.gif").stat().st_size > 0 and (run / "predictions.png").is_file()


def test_epoch_losses_are_means_over_the_epoch(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", Nit=3)
    seen = []
    original = trainer.forward_pass

    def recording(batch):
        loss, logits = original(batch)
        seen.append(loss.item())
        return loss, logits

    trainer.forward_pass = recording
    assert trainer.train_one_epoch() == pytest.approx(sum(seen) / 3)


def test_non_finite_loss_stops_with_epoch_and_iteration(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=3)
    calls = []
    original = trainer.forward_pass

    def poisoned(batch):
        calls.append(1)
        loss, logits = original(batch)
        return (loss * float("nan") if len(calls) == 4 else loss), logits

    trainer.forward_pass = poisoned
    with pytest.raises(NonFiniteLossError, match="epoch 2, iteration 2"):
        trainer.training_loop()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert (tmp_path / "run" / "best.pt").exists()


def test_early_stopping_stops_after_patience(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=10, early_stopping=2)
    dice = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])
    original = trainer.validate

    def scripted():
        metrics = original()
        metrics["dice"] = torch.tensor([next(dice)] * 2)
        return metrics

    trainer.validate = scripted
    trainer.training_loop()
    assert trainer.epoch == 4 and trainer.best_metric == pytest.approx(0.6)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    assert trainer.stop_reason == "early stopping: no improvement for 2 epochs"      # for report.html


def test_learning_rate_decays_to_zero_over_the_epochs(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=4, lr=0.1)
    trainer.training_loop()
    lrs = [row["lr"] for row in trainer.run_log.history]
    assert lrs == pytest.approx([0.1 * (1 - e / 4) ** 0.9 for e in (1, 2, 3, 4)])


def test_learning_rate_follows_the_clock_under_a_time_budget(task_dir, tmp_path):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=100, max_minutes=10)
    trainer.minutes_trained = lambda: 5.0           # half the budget used after one epoch
    trainer.epoch = 1
    assert trainer.poly_factor() == pytest.approx(0.5 ** 0.9)
    trainer.minutes_trained = lambda: 10.5
    assert trainer.poly_factor() == 0 and trainer.time_is_up()


def test_resume_from_a_run_without_fp16_into_fp16_and_back(task_dir, tmp_path, monkeypatch, capsys):
    plain = make_trainer(task_dir, tmp_path / "plain", mixed_precision=False, epochs=1)
    plain.training_loop()
    saved = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert saved["scaler"] == {}                          # a disabled scaler saves nothing
    monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: torch.float16)
    scaled = make_trainer(task_dir, tmp_path / "plain", mixed_precision=True, epochs=2)
    scaled.load_state_dict(saved)                         # e.g. a CPU run continued on a GPU
    assert scaled.scaler.is_enabled() and scaled.scaler.get_scale() == 2.0 ** 16 and scaled.epoch == 1
    scaled.backward_pass(scaled.forward_pass(next(iter(scaled.train_loader)))[0])
    fp16_state = scaled.state_dict()
    assert fp16_state["scaler"]["scale"] == 2.0 ** 16
    monkeypatch.setattr("utils.trainer_class.amp_dtype", lambda device: None)
    back = make_trainer(task_dir, tmp_path / "plain", mixed_precision=True, epochs=2)
    back.load_state_dict(fp16_state)                      # and a GPU run continued on a CPU
    assert not back.scaler.is_enabled() and back.epoch == 1
    assert "Note:" not in capsys.readouterr().out         # same device and process count


def test_resume_with_another_process_count_or_device_says_the_streams_differ(task_dir, tmp_path, capsys):
    trainer = make_trainer(task_dir, tmp_path / "run", epochs=1)
    trainer.training_loop()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    capsys.readouterr()
    two_gpus = {**state, "rng": {**state["rng"], "device": "cuda",
                                 "processes": state["rng"]["processes"] * 2}}
    other = make_trainer(task_dir, tmp_path / "run", epochs=2)
    before = torch.get_rng_state()
    other.load_state_dict(two_gpus)
    assert "saved by 2 process(es) on cuda and continues with 1 on cpu" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), before)     # this process's own seeding is kept
    make_trainer(task_dir, tmp_path / "run", epochs=2).load_state_dict(state)
    assert "Note:" not in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), state["rng"]["processes"][0]["torch"])
