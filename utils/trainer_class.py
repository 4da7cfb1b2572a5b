"""The Trainer: forward_pass -> backward_pass, epoch after epoch, with validation and checkpoints.

It knows nothing about files beyond its run folder (`run_dir`), where it writes best.pt and
last.pt. What a checkpoint holds is utils/training/checkpoint.py's; what is printed and drawn
(metrics.csv, pictures, TensorBoard) is utils/training/run_log.py's; an extra term of the loss
(the mean teacher's, utils/training/semi_supervised.py) comes in as `extra_loss`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.args import EPOCHS_UNDER_A_TIME_LIMIT, Config
from utils.data.cache import Cases
from utils.inference.evaluation import amp_dtype, autocast_for, evaluate
from utils.training.checkpoint import restore_training, save_checkpoint, training_state
from utils.training.distributed import Place, any_process, unwrap
from utils.training.run_log import RunLog

POLY_POWER = 0.9           # nnU-Net's learning-rate decay: lr * (1 - epoch / epochs) ** 0.9


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


class ExtraLoss(Protocol):
    """A term added to every training step's loss (e.g. the mean teacher's consistency)."""
    def __call__(self, progress: float) -> torch.Tensor: ...
    def epoch_columns(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader: DataLoader, val_cases: Cases, config: Config, run_dir: str | Path, device: torch.device,
                 class_names: list[str], run_info: dict, place: Place | None = None,
                 after_epoch: Callable[[dict], None] | None = None, extra_loss: ExtraLoss | None = None):
        self.model, self.loss_fn = model, loss_fn       # model: the network, or its DDP wrapper
        self.network = unwrap(model)                    # the network itself: evaluated and saved
        self.place = place or Place(device=device)      # rank and world size under torchrun
        self.optimizer = optimizer
        self.train_loader, self.val_cases = train_loader, val_cases
        self.config, self.device = config, device
        self.run_dir = Path(run_dir)
        self.class_names = class_names                  # foreground classes, e.g. Anterior, Posterior
        self.run_info = run_info                        # split, preprocessing, model_config: kept in checkpoints
        self.after_epoch = after_epoch                  # e.g. a sweep's pruner, given each epoch's row
        self.extra_loss = extra_loss                    # e.g. the mean teacher's consistency term
        self.run_log = RunLog(self.run_dir, class_names, device, is_main=self.place.is_main,
                              epochs=None if config.epochs == EPOCHS_UNDER_A_TIME_LIMIT else config.epochs)

        # Mixed precision. On CUDA: fp16 autocast, and a GradScaler that scales the loss up so
        # that small fp16 gradients don't underflow to zero. On CPU: bf16 autocast, which has
        # fp32's range, so the scaler is disabled (then every scaler call is a plain pass-through);
        # on a CPU without native bf16, plain fp32 (see amp_dtype).
        self.autocast = autocast_for(device, config.mixed_precision)
        self.scaler = make_scaler(device, config.mixed_precision)

        self.epoch = 0                                  # epochs completed
        self.best_metric = -math.inf                    # best validation mean Dice so far
        self.epochs_without_improvement = 0
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

    def backward_pass(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)                # skipped by the scaler if grads are inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ one epoch

    def train_one_epoch(self) -> float:
        """Train for one epoch (Nit iterations) and return the mean training loss of its steps.

        With fp16's GradScaler a step whose loss or gradients are not finite is skipped by the
        scaler, which lowers its scale; such a loss is left out of the mean. The sums stay on the
        device, so no step waits for the GPU just to add up the loss.
        """
        self.model.train()
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        bar = tqdm(self.train_loader, desc=self.run_log.epoch_name(self.epoch + 1), leave=False,
                   disable=not self.place.is_main)
        for iteration, batch in enumerate(bar, start=1):
            loss, _ = self.forward_pass(batch)
            if self.extra_loss is not None:
                loss = loss + self.extra_loss(self.progress((iteration - 1) / len(self.train_loader)))
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
        metrics = None
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
            extra = self.extra_loss.epoch_columns() if self.extra_loss is not None else None
            row = self.run_log.epoch(self.epoch, train_loss, metrics, self.optimizer.param_groups[0]["lr"], improved,
                                     self.minutes_trained(), extra)
            if improved:
                self.save("best.pt")
            self.save("last.pt")
            if self.after_epoch is not None:
                self.after_epoch(row)
            if self.should_stop():
                break
        if metrics is not None:
            self.run_log.end(metrics, self.val_cases)

    def should_stop(self) -> bool:
        """Early stopping or the time limit. The validation figures are the same in every
        process, and the clock is agreed on, so under DDP all stop together."""
        patience = self.config.early_stopping
        if patience is not None and self.epochs_without_improvement >= patience:
            self.say(f"Early stopping: no improvement for {patience} epochs. "
                     f"Best mean Dice {self.best_metric:.4f} is in {self.run_dir / 'best.pt'}")
            self.stop_reason = f"early stopping: no improvement for {patience} epochs"
            return True
        if self.time_is_up():
            self.say(f"Stopping: the time limit of {self.config.max_minutes} minutes is reached.")
            self.stop_reason = f"the time limit of {self.config.max_minutes:g} minutes"
            return True
        return False

    # ------------------------------------------------------------ time, progress, checkpoints

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

    def say(self, text: str) -> None:
        self.run_log.say(text)

    def save(self, name: str) -> None:
        state = self.state_dict()          # every process takes part: it gathers their RNG states
        if self.place.is_main:
            save_checkpoint(state, self.run_dir / name)

    def state_dict(self) -> dict:
        return training_state(self)

    def load_state_dict(self, state: dict) -> None:
        restore_training(self, state)
