"""Learning from unlabelled scans: the mean teacher (Tarvainen and Valpola, 2017; in 3D
segmentation e.g. Yu et al., MICCAI 2019).

The teacher is a copy of the network whose weights follow the student's (the trained network) as
an exponential moving average, -ema_decay per step. On each unlabelled batch, student and teacher
see the same crops with different noise, and the student learns to agree with the teacher
(-consistency_loss):
  mse           the mean squared difference of their softmax scores (Tarvainen and Valpola; Yu
                et al.): every voxel pulls a little, towards the teacher's soft scores;
  pseudo_label  cross-entropy towards the teacher's own labels (its argmax), on the voxels where
                the teacher is sure (softmax >= -pseudo_label_threshold), averaged over all
                voxels (self-training with pseudo-labels, as in FixMatch; the teacher here is the
                moving average).
The term is added to the supervised loss with a weight that ramps up from 0 (while the teacher is
still random) over the first share of the run (-consistency_rampup), as exp(-5 (1 - t)^2).

The teacher only teaches: validation, checkpoints' "model", -evaluate and -predict use the student. The unlabelled batches and the noise are drawn from a random stream of
their own (kept in checkpoints), so the labelled batches are those of the same run without the
method, and -consistency_weight 0 trains exactly as without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.errors import UserError

NOISE_STD = 0.1            # Gaussian noise added to each copy of an unlabelled batch (z-scored images)
CONSISTENCY_LOSSES = ("mse", "pseudo_label")


class MeanTeacher:
    """The teacher (torch's AveragedModel of the student, with torch's EMA update), the ramp-up of
    the consistency weight, and the consistency loss."""

    def __init__(self, student: nn.Module, weight: float, rampup: float, ema_decay: float, loss: str,
                 threshold: float):
        if loss not in CONSISTENCY_LOSSES:
            raise ValueError(f"consistency loss {loss!r}: one of {', '.join(CONSISTENCY_LOSSES)}")
        # A deep copy of the student; its count of updates stays on the CPU, so no step waits for the GPU.
        self.teacher = AveragedModel(student).eval().requires_grad_(False)
        self.weight, self.rampup, self.ema_decay = weight, rampup, ema_decay
        self.loss, self.threshold = loss, threshold

    def ramp(self, progress: float) -> float:
        """The consistency weight at `progress` (0 to 1) of the run."""
        if self.rampup <= 0 or progress >= self.rampup:
            return self.weight
        t = max(progress, 0.0) / self.rampup
        return self.weight * math.exp(-5 * (1 - t) ** 2)

    @staticmethod
    def noisy(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return images + NOISE_STD * noise.to(images.device, images.dtype)

    def consistency(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """How far the student is from the teacher on the same crops (computed in fp32)."""
        student_logits, teacher_scores = student_logits.float(), torch.softmax(teacher_logits.float(), 1)
        if self.loss == "mse":
            return F.mse_loss(torch.softmax(student_logits, 1), teacher_scores)
        confidence, pseudo_labels = teacher_scores.max(1)
        sure = (confidence >= self.threshold).float()
        return (F.cross_entropy(student_logits, pseudo_labels, reduction="none") * sure).mean()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """teacher <- decay * teacher + (1 - decay) * student (torch's get_ema_multi_avg_fn); the
        first update copies the student (AveragedModel's start), and early on (step < 1 / (1 - decay))
        the decay is lower, so the teacher is not stuck near its start (Tarvainen's rule). The
        student's buffers, if any, are copied."""
        self.teacher.multi_avg_fn = get_ema_multi_avg_fn(min(self.ema_decay, 1 - 1 / (step + 1)))
        self.teacher.update_parameters(student)

    def state_dict(self) -> dict:
        """The teacher's weights (the student's keys) and its number of updates."""
        return {"teacher": self.teacher.module.state_dict(), "updates": int(self.teacher.n_averaged)}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.module.load_state_dict(state["teacher"])
        self.teacher.n_averaged.fill_(state["updates"])


class MeanTeacherTerm:
    """The mean teacher as the Trainer sees it: an extra term of the training loss. Called once per
    training step with the run's progress, it draws a batch of unlabelled crops and returns the
    ramped, weighted consistency loss of the student against the teacher on them. After every
    optimizer step that is taken (GradScaler skips those whose gradients overflowed), the teacher
    follows the student: a step hook on the optimizer, so nothing waits for the GPU to ask
    whether the step was taken. Its columns go into metrics.csv and its state into checkpoints.

    The unlabelled batches and the noise come from a random stream of its own, so the labelled
    batches are those of the same run without it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, unlabelled_loader, teacher: MeanTeacher,
                 autocast, device: torch.device, memory_format: torch.memory_format, seed: int):
        self.model, self.loader, self.mean_teacher = model, unlabelled_loader, teacher
        self.student = getattr(model, "module", model)     # the network itself (under a DDP wrapper)
        self.autocast, self.device, self.memory_format = autocast, device, memory_format
        self.rng = torch.Generator().manual_seed(seed + 3).get_state()
        self.steps = 0                                       # optimizer steps taken, for the teacher's average
        self.batches = None                                  # this epoch's unlabelled batches
        self.total, self.calls = torch.zeros((), device=device), 0
        optimizer.register_step_post_hook(self.after_step)

    def __call__(self, progress: float) -> torch.Tensor:
        """The weighted consistency loss of one batch of unlabelled crops, at `progress` (0 to 1)."""
        images, student_noise, teacher_noise = self.next_batch()
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with self.autocast():
            student = self.model(self.mean_teacher.noisy(images, student_noise))
            with torch.no_grad():
                teacher = self.mean_teacher.teacher(self.mean_teacher.noisy(images, teacher_noise))
        if student.ndim == images.ndim + 1:                  # deep supervision: the full-resolution output
            student = student[:, 0]
        term = self.mean_teacher.ramp(progress) * self.mean_teacher.consistency(student, teacher)
        self.total += term.detach()
        self.calls += 1
        return term

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next unlabelled crops (their labels, if any, are not looked at) and two draws of
        noise, from this term's own random stream."""
        if self.batches is None:
            self.batches = iter(self.loader)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            images = next(self.batches)[0]
            noises = torch.randn_like(images), torch.randn_like(images)
            self.rng = torch.get_rng_state()
        return images, *noises

    def after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.mean_teacher.update(self.student, self.steps)

    def epoch_columns(self) -> dict:
        """metrics.csv's column for the epoch just ended: the part of train_loss that is the
        weighted consistency term (its mean over the epoch's steps). Starts the next epoch."""
        mean = (self.total / max(self.calls, 1)).item()
        self.batches, self.total, self.calls = None, torch.zeros((), device=self.device), 0
        return {"consistency_loss": round(mean, 6)}

    def state_dict(self) -> dict:
        return {"mean_teacher": self.mean_teacher.state_dict(), "unlabelled_rng": self.rng, "steps": self.steps,
                "unlabelled": {"sampler": self.loader.sampler.state_dict(), "loader": self.loader.generator.get_state()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean_teacher.load_state_dict(state["mean_teacher"])
        self.rng, self.steps = state["unlabelled_rng"], state["steps"]
        self.loader.sampler.load_state_dict(state["unlabelled"]["sampler"])
        self.loader.generator.set_state(state["unlabelled"]["loader"])


def mean_teacher_term(config, network: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                      unlabelled_loader, autocast, device: torch.device,
                      memory_format: torch.memory_format) -> MeanTeacherTerm:
    """-mean_teacher's term of the loss, as `config` (utils/args.py's Config) sets it: a teacher
    copied from `network`, and the student `model` (the network, or its DDP wrapper)."""
    teacher = MeanTeacher(network, config.consistency_weight, config.consistency_rampup, config.ema_decay,
                          config.consistency_loss, config.pseudo_label_threshold)
    return MeanTeacherTerm(model, optimizer, unlabelled_loader, teacher, autocast, device, memory_format,
                           config.random_seed)


def unlabelled_pool(cases, labelled_pool, scans, validation_ids: list[str], resumed_ids: list[str] | None, say):
    """The scans the mean teacher learns from: the training cases whose labels are set aside
    (-labelled_fraction) and the -unlabelled_dir scans, or, with neither, the training scans
    themselves. Warns when a scan has the name of a validation case; refuses other scans than
    those of the run being resumed (`resumed_ids`)."""
    pool = labelled_pool if scans is None else (scans if labelled_pool is None else labelled_pool.join(scans))
    if pool is None:
        say("Note: -mean_teacher has no unlabelled scans (no -unlabelled_dir, -labelled_fraction 1), so it "
            "asks for consistency on the training scans themselves.")
        pool = cases
    leaking = sorted(set(pool.ids) & set(validation_ids))
    if leaking:
        say(f"Warning: {len(leaking)} unlabelled scans have the names of validation cases ({', '.join(leaking[:3])}"
            f"{', ...' if len(leaking) > 3 else ''}): if they are the same scans, validation is not blind.")
    if resumed_ids not in (None, pool.ids):
        raise UserError("The unlabelled scans differ from those of the run being resumed. Resume with the "
                        "same -unlabelled_dir (and its files unchanged).")
    say(f"{len(pool)} unlabelled scans for the mean teacher")
    return pool
