"""The Trainer: forward_pass -> backward_pass, epoch after epoch, with validation and checkpoints.

It knows nothing about files beyond its run folder (`run_dir`), where it writes best.pt and
last.pt; what is printed and drawn (metrics.csv, pictures, TensorBoard) is utils/training/run_log.py's.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.args import EPOCHS_UNDER_A_TIME_LIMIT, Config
from utils.training.checkpoint import rng_states, save_checkpoint, set_rng_states
from utils.data.cache import Cases
from utils.training.distributed import Place, any_process, gather, unwrap
from utils.inference.evaluation import amp_dtype, autocast_for, evaluate
from utils.training.losses import DeepSupervisionLoss, deep_supervision_weights, segmentation_loss
from utils.training.memory import peak_memory
from utils.outputs.plots import mid_slices
from utils.training.run_log import RunLog
from utils.training.semi_supervised import MeanTeacher

POLY_POWER = 0.9           # nnU-Net's learning-rate decay: lr * (1 - epoch / epochs) ** 0.9


def make_loss(name: str = "dicece", class_weights: list[float] | None = None, outputs: int = 1) -> nn.Module:
    """-loss `name` (default Dice + cross-entropy) with `class_weights` on its cross-entropy or
    focal term (utils/training/losses.py). With several training outputs (a DynUNet's deep supervision), the
    loss of each, weighted as nnU-Net weights them."""
    loss = segmentation_loss(name, class_weights)
    return loss if outputs == 1 else DeepSupervisionLoss(loss, deep_supervision_weights(outputs))


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the trainable parameters only (fine-tuning freezes the rest)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                           momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)


def make_scaler(device: torch.device, mixed_precision: bool) -> torch.amp.GradScaler:
    """A GradScaler that is on only under fp16 autocast: fp16 gradients can underflow to zero, so
    the loss is scaled up before backward(). bf16 has fp32's range and needs none; a disabled
    scaler passes every call straight through."""
    return torch.amp.GradScaler(device.type, enabled=mixed_precision and amp_dtype(device) == torch.float16)


def memory_format(config: Config) -> torch.memory_format:
    """The layout of the network's weights and of the training batches. channels_last_3d (channels
    innermost) suits oneDNN's convolutions with few channels, such as the U-Net's last layers."""
    return torch.channels_last_3d if config.channels_last else torch.contiguous_format


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoints."""


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader: DataLoader, val_cases: Cases, config: Config, run_dir: str | Path, device: torch.device,
                 class_names: list[str], run_info: dict, place: Place | None = None,
                 run_log: RunLog | None = None, after_epoch: Callable[[dict], None] | None = None,
                 unlabelled_loader: DataLoader | None = None, mean_teacher: MeanTeacher | None = None):
        self.model, self.loss_fn = model, loss_fn       # model: the network, or its DDP wrapper
        self.network = unwrap(model)                    # the network itself: evaluated and saved
        self.place = place or Place(device=device)      # rank and world size under torchrun
        self.optimizer = optimizer
        self.train_loader, self.val_cases = train_loader, val_cases
        self.config, self.device = config, device
        self.run_dir = Path(run_dir)
        self.class_names = class_names                  # foreground classes, e.g. Anterior, Posterior
        self.run_info = run_info                        # split, preprocessing, model_config: kept in checkpoints
        self.run_log = run_log or RunLog(self.run_dir, class_names, is_main=self.place.is_main)
        self.after_epoch = after_epoch                  # e.g. a sweep's pruner, given each epoch's row
        # Semi-supervised learning (utils/training/semi_supervised.py): batches of unlabelled crops, and the
        # teacher whose predictions on them the network learns to agree with.
        self.unlabelled_loader, self.mean_teacher = unlabelled_loader, mean_teacher
        self.steps = 0                                  # optimizer steps taken, for the teacher's average
        self.unlabelled_rng = torch.Generator().manual_seed(config.random_seed + 3).get_state()
        self.epoch_consistency = None                   # the last epoch's mean weighted consistency loss

        # Mixed precision. On CUDA: fp16 autocast, and a GradScaler that scales the loss up so
        # that small fp16 gradients don't underflow to zero. On CPU: bf16 autocast, which has
        # fp32's range, so the scaler is disabled (then every scaler call is a plain pass-through);
        # on a CPU without native bf16, plain fp32 (see amp_dtype).
        self.autocast = autocast_for(device, config.mixed_precision)
        self.scaler = make_scaler(device, config.mixed_precision)

        self.epoch = 0                                  # epochs completed
        self.best_metric = -math.inf                    # best validation mean Dice so far
        self.epochs_without_improvement = 0
        self.history: list[dict] = []                   # one row of metrics.csv per epoch
        self.progress_frames: list[list[torch.Tensor]] = []   # mid-slices of the first validation
                                                              # case's prediction, after each epoch
        self.minutes_before = 0.0                       # training time of earlier sessions (-resume)
        self.started = time.monotonic()
        self.stop_reason = "not started"                # why training_loop ended, in words
        # Poly decay of the learning rate to 0 over the run (nnU-Net's schedule).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.poly_factor)

    # ------------------------------------------------------------ one step

    def forward_pass(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, D, H, W), labels (B, 1, D, H, W) -> (loss, logits (B, K, D, H, W)).

        Under deep supervision the network returns (B, outputs, K, D, H, W), full resolution first:
        the loss takes them all, and the full-resolution scores are returned."""
        images, labels = (t.to(self.device, non_blocking=True) for t in batch)
        images = images.contiguous(memory_format=memory_format(self.config))
        with self.autocast():
            outputs = self.model(images)
        # The loss (softmax, log, sums) is computed in fp32 for accuracy.
        loss = self.loss_fn(outputs.float(), labels.long())
        logits = outputs[:, 0] if outputs.ndim > labels.ndim else outputs
        return loss, logits

    def unlabelled_batch(self, unlabelled: Iterator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next unlabelled crops and two draws of noise, from the mean teacher's own random
        stream: the labelled batches stay those of the same run without it."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.unlabelled_rng)
            images = next(unlabelled)[0]                # their labels, if any, are not looked at
            noises = torch.randn_like(images), torch.randn_like(images)
            self.unlabelled_rng = torch.get_rng_state()
        return images, *noises

    def consistency_pass(self, images: torch.Tensor, student_noise: torch.Tensor, teacher_noise: torch.Tensor,
                         progress: float) -> torch.Tensor:
        """Unlabelled crops -> the mean teacher's consistency loss, weighted by the ramp-up at
        `progress`: the student and the teacher see the crops with their own noise, and the
        student learns to give the teacher's scores."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format(self.config))
        with self.autocast():
            student = self.model(self.mean_teacher.noisy(images, student_noise))
            with torch.no_grad():
                teacher = self.mean_teacher.teacher(self.mean_teacher.noisy(images, teacher_noise))
        if student.ndim == images.ndim + 1:             # deep supervision: the full-resolution output
            student = student[:, 0]
        return self.mean_teacher.ramp(progress) * self.mean_teacher.consistency(student, teacher)

    def backward_pass(self, loss: torch.Tensor) -> None:
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)                # skipped by the scaler if grads are inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale is None or self.scaler.get_scale() >= scale:     # the step was taken
            self.steps += 1
            if self.mean_teacher is not None:
                self.mean_teacher.update(self.network, self.steps)

    # ------------------------------------------------------------ one epoch

    def minutes_trained(self) -> float:
        return self.minutes_before + (time.monotonic() - self.started) / 60

    def time_is_up(self) -> bool:
        limit = self.config.max_minutes
        # Under DDP all processes must stop at the same step, so they agree first.
        return limit is not None and any_process(self.minutes_trained() > limit, self.place)

    def progress(self, within_epoch: float = 0.0) -> float:
        """How far the run is, 0 to 1: over the epochs (plus `within_epoch`, the share of the
        current epoch done), or over -max_minutes when that budget runs out first. (With a time
        budget it follows the clock, so such runs are not bit-for-bit repeatable.)"""
        progress = (self.epoch + within_epoch) / self.config.epochs
        if self.config.max_minutes is not None:
            progress = max(progress, self.minutes_trained() / self.config.max_minutes)
        return min(progress, 1.0)

    def poly_factor(self, _: int = 0) -> float:
        """Learning-rate factor (1 - progress) ** 0.9 (nnU-Net's poly decay)."""
        return (1 - self.progress()) ** POLY_POWER

    def train_one_epoch(self) -> float:
        """Train for one epoch (Nit iterations) and return the mean training loss of its steps.

        With fp16's GradScaler a step whose loss or gradients are not finite is skipped by the
        scaler, which lowers its scale; such a loss is left out of the mean. The sums stay on the
        device, so no step waits for the GPU just to add up the loss.
        """
        self.model.train()
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        bar = tqdm(self.train_loader, desc=self.epoch_name(self.epoch + 1), leave=False,
                   disable=not self.place.is_main)
        unlabelled = iter(self.unlabelled_loader) if self.mean_teacher is not None else None
        consistency = torch.zeros((), device=self.device)
        for iteration, batch in enumerate(bar, start=1):
            loss, _ = self.forward_pass(batch)
            if unlabelled is not None:
                term = self.consistency_pass(*self.unlabelled_batch(unlabelled),
                                             self.progress((iteration - 1) / len(self.train_loader)))
                consistency += term.detach()
                loss = loss + term
            if not self.scaler.is_enabled():
                self.check_finite(loss, iteration)
            self.backward_pass(loss)
            loss = loss.detach()
            finite = torch.isfinite(loss)
            total += torch.where(finite, loss, 0.0)
            count += finite
            if iteration % 10 == 0:
                bar.set_postfix(loss=f"{(total / count.clamp(min=1)).item():.4f}")
            if self.time_is_up():
                break
        if count.item() == 0:
            raise NonFiniteLossError(f"Every training loss of epoch {self.epoch + 1} was NaN or infinite. "
                                     f"Try a lower -lr, or -mixed_precision False.")
        if unlabelled is not None:
            self.epoch_consistency = (consistency / iteration).item()
        return (total / count).item()

    def check_finite(self, loss: torch.Tensor, iteration: int) -> None:
        """Stop on a NaN or infinite loss. Under DDP every process learns of it, so all stop
        together here instead of the others waiting for it in backward()."""
        value = loss.item()                              # (a CPU-GPU sync point)
        if any_process(not math.isfinite(value), self.place):
            where = f"{value}" if not math.isfinite(value) else "NaN or infinite in another process"
            raise NonFiniteLossError(f"The training loss became {where} at epoch {self.epoch + 1}, "
                                     f"iteration {iteration}. Try a lower -lr, or -mixed_precision False.")

    def validate(self) -> dict:
        return evaluate(self.network, self.val_cases, self.device, self.autocast,
                        self.class_names, loss_fn=self.loss_fn, mirror=self.config.tta, place=self.place,
                        roi_size=self.config.patch_size)

    # ------------------------------------------------------------ the whole run

    def training_loop(self) -> None:
        if self.epoch == 0:   # so that even a run stopped in its first epoch can be resumed
            self.save("last.pt")
        predictions = None
        self.stop_reason = f"all {self.config.epochs} epochs done"
        for epoch in range(self.epoch, self.config.epochs):
            train_loss = self.train_one_epoch()
            metrics = self.validate()
            self.epoch = epoch + 1
            self.scheduler.step()

            mean_dice = metrics["dice"].mean().item()
            improved = mean_dice > self.best_metric
            if improved:
                self.best_metric, self.epochs_without_improvement = mean_dice, 0
            else:
                self.epochs_without_improvement += 1
            predictions = metrics
            if self.place.is_main:   # only the mid-slices: checkpoints keep every epoch's frame
                frame = metrics["predictions"][0]
                self.progress_frames.append([torch.as_tensor(s).to(torch.uint8) for s in mid_slices(frame)])
            self.history.append(self.epoch_row(train_loss, metrics))
            self.run_log.epoch(self.history, improved, self.epoch_name(self.epoch), self.minutes_trained())
            if improved:
                self.save("best.pt")
            self.save("last.pt")
            if self.after_epoch is not None:
                self.after_epoch(self.history[-1])

            patience = self.config.early_stopping
            # The validation figures are the same in every process, so they all stop together.
            if patience is not None and self.epochs_without_improvement >= patience:
                self.say(f"Early stopping: no improvement for {patience} epochs. "
                           f"Best mean Dice {self.best_metric:.4f} is in {self.run_dir / 'best.pt'}")
                self.stop_reason = f"early stopping: no improvement for {patience} epochs"
                break
            if self.time_is_up():
                self.say(f"Stopping: the time limit of {self.config.max_minutes} minutes is reached.")
                self.stop_reason = f"the time limit of {self.config.max_minutes:g} minutes"
                break
        if predictions is not None:
            self.run_log.end(self.history, predictions, self.val_cases, self.progress_frames)

    def say(self, text: str) -> None:
        self.run_log.say(text)

    def save(self, name: str) -> None:
        state = self.state_dict()          # every process takes part: it gathers their RNG states
        if self.place.is_main:
            save_checkpoint(state, self.run_dir / name)

    def epoch_row(self, train_loss: float, metrics: dict) -> dict:
        """The epoch's row of metrics.csv: losses, validation Dice per class and mean, learning
        rate, and the process's peak memory so far."""
        return {"epoch": self.epoch, "train_loss": round(train_loss, 6), "val_loss": round(metrics["loss"], 6),
                **{f"dice_{name}": round(d, 6) for name, d in zip(self.class_names, metrics["dice"].tolist())},
                "dice_mean": round(metrics["dice"].mean().item(), 6),
                "lr": self.optimizer.param_groups[0]["lr"], **peak_memory(self.device),
                # -mean_teacher: the part of train_loss that is the weighted consistency term
                **({} if self.mean_teacher is None else {"consistency_loss": round(self.epoch_consistency, 6)})}

    def epoch_name(self, number: int) -> str:
        """'epoch  12/100', or 'epoch  12' when the time budget, not -epochs, ends the run."""
        if self.config.epochs == EPOCHS_UNDER_A_TIME_LIMIT:
            return f"epoch {number:3d}"
        return f"epoch {number:3d}/{self.config.epochs}"

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        sampler = self.train_loader.sampler
        return {
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "epochs_without_improvement": self.epochs_without_improvement,
            "minutes_trained": self.minutes_trained(),
            "history": self.history,
            "progress_frames": self.progress_frames,
            "config": self.config.to_dict(),
            **self.run_info,
            "rng": {"processes": gather(rng_states(), self.place), "device": self.device.type,
                    "sampler": sampler.state_dict(), "loader": self.train_loader.generator.get_state()},
            "steps": self.steps,
            **({} if self.mean_teacher is None else {
                "mean_teacher": self.mean_teacher.state_dict(), "unlabelled_rng": self.unlabelled_rng,
                "unlabelled": {"sampler": self.unlabelled_loader.sampler.state_dict(),
                               "loader": self.unlabelled_loader.generator.get_state()}}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` (a last.pt) left off."""
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # (Otherwise the run was saved without fp16, e.g. on a CPU, and continues with a fresh
        # scaler; or it continues without fp16, where the scaler is off.)
        self.epoch = state["epoch"]
        self.best_metric = state["best_metric"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.minutes_before = state["minutes_trained"]
        self.history = list(state["history"])
        self.progress_frames = list(state["progress_frames"])
        self.train_loader.sampler.load_state_dict(state["rng"]["sampler"])
        self.train_loader.generator.set_state(state["rng"]["loader"])
        self.steps = state.get("steps", 0)
        if self.mean_teacher is not None:
            self.mean_teacher.load_state_dict(state["mean_teacher"])
            self.unlabelled_rng = state["unlabelled_rng"]
            self.unlabelled_loader.sampler.load_state_dict(state["unlabelled"]["sampler"])
            self.unlabelled_loader.generator.set_state(state["unlabelled"]["loader"])
        # Each process continues its own random stream when the processes and device are the same.
        processes, saved_on = state["rng"]["processes"], state["rng"].get("device", self.device.type)
        if len(processes) == self.place.world_size:
            set_rng_states(processes[self.place.rank])
        if len(processes) != self.place.world_size or saved_on != self.device.type:
            self.say(f"Note: this run was saved by {len(processes)} process(es) on {saved_on} and continues "
                     f"with {self.place.world_size} on {self.device.type}, so its random streams (and "
                     f"arithmetic) differ from an uninterrupted run's: the result is equivalent, not identical.")
