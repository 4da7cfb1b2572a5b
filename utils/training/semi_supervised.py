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
        # A checkpoint from before "updates" was kept holds a teacher that has been averaged.
        self.teacher.n_averaged.fill_(state.get("updates", 1))
