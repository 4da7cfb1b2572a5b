"""Learning from unlabelled scans: the mean teacher (Tarvainen and Valpola, 2017; in 3D
segmentation e.g. Yu et al., MICCAI 2019).

The teacher is a copy of the network whose weights follow the student's (the trained network) as
an exponential moving average, EMA_DECAY per step. On each unlabelled batch, student and teacher
see the same crops with different noise; the consistency loss is the mean squared difference of
their softmax scores, added to the supervised loss with a weight that ramps up from 0 (while the
teacher is still random) over the first share of the run (-consistency_rampup), as
exp(-5 (1 - t)^2). The teacher only teaches: validation, checkpoints' "model", -evaluate and
-predict use the student. The unlabelled batches and the noise are drawn from a random stream of
their own (kept in checkpoints), so the labelled batches are those of the same run without the
method, and -consistency_weight 0 trains exactly as without it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

NOISE_STD = 0.1            # Gaussian noise added to each copy of an unlabelled batch (z-scored images)


class MeanTeacher:
    def __init__(self, student: nn.Module, weight: float, rampup: float, ema_decay: float):
        self.teacher = copy.deepcopy(student).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.weight, self.rampup, self.ema_decay = weight, rampup, ema_decay

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
        """Mean squared difference of the softmax scores (computed in fp32)."""
        return F.mse_loss(torch.softmax(student_logits.float(), 1), torch.softmax(teacher_logits.float(), 1))

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """teacher <- decay * teacher + (1 - decay) * student; early on (step < 1 / (1 - decay))
        the decay is lower, so the teacher is not stuck at its random start (Tarvainen's rule)."""
        decay = min(self.ema_decay, 1 - 1 / (step + 1))
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
