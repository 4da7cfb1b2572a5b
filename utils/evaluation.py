"""Inference and metrics, shared by validation during training and by evaluation afterwards.

Metrics are computed on each case's own voxel grid: predictions on the padded training shape
are cropped back (TorchIO's inverse of CropOrPad) before they meet the original label.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from utils.data_class import Cases


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """Class scores (N, K, D, H, W) float32 on the CPU for preprocessed images (N, C, D, H, W)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        with autocast():
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs)


def evaluate(model: nn.Module, cases: Cases, batch_size: int, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager], num_classes: int,
             loss_fn: nn.Module | None = None) -> dict:
    """Mean loss on the padded tensors and per-class Dice on each case's native grid.

    Returns {'loss': float or None, 'dice': tensor (num_classes - 1,), 'dice_per_case': (N, K-1)}.
    """
    logits = predict_logits(model, cases.images, batch_size, device, autocast)
    loss = None
    if loss_fn is not None:
        loss = sum(loss_fn(logits[i:i + batch_size], cases.labels[i:i + batch_size].long()).item()
                   * len(logits[i:i + batch_size]) for i in range(0, len(logits), batch_size)) / len(logits)
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    for index, scores in enumerate(logits):
        prediction = cases.uncrop[index](scores.argmax(0, keepdim=True).to(torch.uint8))
        dice(one_hot(prediction[None].long(), num_classes),
             one_hot(cases.native_labels[index][None].long(), num_classes))
    per_case = dice.get_buffer().clone()
    return {"loss": loss, "dice": dice.aggregate(), "dice_per_case": per_case}
