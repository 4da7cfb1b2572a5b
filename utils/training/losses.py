"""The training losses: MONAI's Dice, cross-entropy or focal terms, class weights from the labels'
statistics, and deep supervision over a DynUNet's decoder outputs.

Every loss takes logits (B, K, D, H, W) and labels (B, 1, D, H, W) of class indices, as MONAI's
losses do.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import monai.losses
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from utils.errors import UserError

LOSSES = ("dicece", "dice", "ce", "dicefocal")
FOCAL_GAMMA = 2.0          # MONAI's (and the focal loss paper's) default
CLASS_WEIGHT_POWER = 0.5   # -class_weights auto: w_c proportional to (1 / f_c) ** 0.5


def class_frequencies(labels: Sequence[torch.Tensor], num_classes: int) -> list[float]:
    """The share of voxels of each class 0 .. num_classes - 1 over label maps of any shapes
    (each case's own grid, so the padding of preprocessing does not count as background)."""
    counts = sum(torch.bincount(label.reshape(-1).long(), minlength=num_classes) for label in labels)
    return (counts.double() / counts.sum()).tolist()


def weights_from_frequencies(frequencies: Sequence[float], power: float = CLASS_WEIGHT_POWER) -> list[float]:
    """Cross-entropy weights for classes of these voxel frequencies: (1 / f) ** power, scaled so
    that they average 1 (so the loss keeps its scale and the learning rate its meaning).

    Power 1 would make every class count as much in total as any other: on Task04 (background
    94.7 %, anterior 2.7 %, posterior 2.5 % of the voxels) 0.04, 1.42, 1.54. The square root is a
    milder correction that keeps the background's many voxels counting: 0.23, 1.36, 1.41. A class
    with no voxels has no weight that makes sense; the caller refuses it.
    """
    raw = [(1.0 / f) ** power for f in frequencies]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def choose_class_weights(choice: Sequence[float] | str | None, label_names: dict[int, str],
                         labels: Sequence[torch.Tensor], say: Callable = print) -> dict:
    """-class_weights `choice` (None, "auto" or one weight per class) for data with these classes,
    as config.json and the checkpoints keep them: {"class_weights": one per class, background
    first, or None; "class_frequencies": with auto, the voxel shares of `labels` (the training
    cases' label maps) they came from, else None}."""
    names = [name for _, name in sorted(label_names.items())]
    if choice is None:
        return {"class_weights": None, "class_frequencies": None}
    if choice == "auto":
        frequencies = class_frequencies(labels, len(names))
        absent = [name for name, share in zip(names, frequencies) if share == 0]
        if absent:
            raise UserError(f"-class_weights auto: the {len(labels)} training cases have no voxel of "
                            f"{', '.join(absent)}, so there is no frequency to weight by. Give one weight "
                            f"per class instead, background first.")
        weights = weights_from_frequencies(frequencies)
        say(f"Class weights (auto, (1/f)^{CLASS_WEIGHT_POWER:g} of each class's share f of the training "
            f"voxels, mean 1): " + ", ".join(f"{name} {w:.3f} (f {share:.4f})"
                                             for name, w, share in zip(names, weights, frequencies)))
        return {"class_weights": weights, "class_frequencies": frequencies}
    if len(choice) != len(names):
        raise UserError(f"-class_weights gives {len(choice)} weights, but the data has {len(names)} classes "
                        f"({', '.join(names)}): give one per class, background first.")
    return {"class_weights": list(choice), "class_frequencies": None}


class CrossEntropy(nn.Module):
    """torch's cross-entropy for labels (B, 1, D, H, W), with optional class weights. The weights
    follow the logits to their device: validation scores are on the CPU, training's may not be."""

    def __init__(self, weight: Sequence[float] | None = None):
        super().__init__()
        self.weight = None if weight is None else torch.tensor(weight, dtype=torch.float32)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.device)
        return F.cross_entropy(logits, labels[:, 0].long(), weight=weight)


class DicePlus(nn.Module):
    """MONAI's soft Dice (softmax, every class) plus a voxel-wise term, which alone carries the
    class weights. (MONAI's DiceCELoss(weight=...) would weight its Dice term too.)"""

    def __init__(self, voxelwise: nn.Module):
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True)
        self.voxelwise = voxelwise

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, labels) + self.voxelwise(logits, labels)


def segmentation_loss(name: str = "dicece", class_weights: Sequence[float] | None = None) -> nn.Module:
    """-loss `name` with `class_weights` (one per class, background first) on its cross-entropy
    or focal term; the Dice term is unweighted (it already weighs every class alike)."""
    focal = lambda: FocalLoss(to_onehot_y=True, use_softmax=True, gamma=FOCAL_GAMMA, weight=class_weights)
    losses = {"dicece": lambda: DicePlus(CrossEntropy(class_weights)),
              "dice": lambda: DiceLoss(to_onehot_y=True, softmax=True),
              "ce": lambda: CrossEntropy(class_weights),
              "dicefocal": lambda: DicePlus(focal())}
    return losses[name]()


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's weights of the decoder outputs, full resolution first: 1/2 ** i, normalised to
    sum 1. (nnU-Net also has an output below these, which it weights 0; our DynUNet has no head
    there, so the weights are the same.) MONAI's DeepSupervisionLoss(weight_mode="exp") has
    1/2 ** i unnormalised and floored at 1/16 (1, 0.5, 0.25: the loss 1.75 times larger for three
    outputs, so the learning rate would change its meaning); these are given to it instead."""
    raw = [0.5 ** i for i in range(outputs)]
    return [w / sum(raw) for w in raw]


class DeepSupervisionLoss(monai.losses.DeepSupervisionLoss):
    """MONAI's deep supervision loss (`base` on each output, weighted by `weights`, summed), fed the
    way MONAI's DynUNet returns its outputs. In training mode with deep supervision the DynUNet
    returns them stacked, (B, outputs, K, D, H, W), each upsampled to full resolution, where MONAI's
    loss takes a list; in eval mode, only the full-resolution scores (B, K, D, H, W), which get
    `base` alone (the validation loss). MONAI's loss computes each term in fp32 (it casts the
    logits), and in fp32 its sum is bit for bit the hand-written one it replaced."""

    def __init__(self, base: nn.Module, weights: Sequence[float]):
        super().__init__(base, weights=list(weights))

    def forward(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(list(outputs.unbind(1)) if outputs.ndim > labels.ndim else outputs, labels)


def make_loss(name: str = "dicece", class_weights: list[float] | None = None, outputs: int = 1) -> nn.Module:
    """-loss `name` (default Dice + cross-entropy) with `class_weights` on its cross-entropy or
    focal term. With several training outputs (a DynUNet's deep supervision), the loss of each,
    weighted as nnU-Net weights them."""
    loss = segmentation_loss(name, class_weights)
    return loss if outputs == 1 else DeepSupervisionLoss(loss, deep_supervision_weights(outputs))


def class_weights_of_run(choice, info, train_cases, resumed: dict | None, say) -> dict:
    """-class_weights as the run keeps them ({"class_weights", "class_frequencies"}: config.json,
    checkpoints); -resume continues with the weights of its checkpoint, so with the same loss."""
    if resumed is not None:
        return {key: resumed.get(key) for key in ("class_weights", "class_frequencies")}
    return choose_class_weights(choice, info.label_names, train_cases.native_labels, say)
