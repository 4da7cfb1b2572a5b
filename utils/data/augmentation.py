"""Random augmentation of training batches, done batch-wide with torch operations."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

LEFT_RIGHT = 2    # the left-right axis of a (B, C, D, H, W) batch in canonical (RAS) orientation


@dataclasses.dataclass
class BatchAugmentation:
    """Random augmentation drawn for each sample, applied to the whole batch with torch ops.

    Used as the loader's collate_fn, on crops (utils/data/sampling.py:patch_window). Per sample: a
    left-right flip, sometimes a small rotation and scaling, a brightness change, and Gaussian
    noise. Done batch-wide
    (one grid_sample call, a few tensor ops) because TorchIO's per-sample transforms cost about
    8 ms a sample here, a third of a training step at batch 16 on a 2-core CPU (benchmarks/).
    Flips are left-right only: an anterior-posterior flip would swap the meaning of the labels.
    The channels (modalities) of a sample share its flip, rotation and brightness factor.
    """
    flip_probability: float = 0.5
    affine_probability: float = 0.25
    degrees: float = 10.0
    scaling: float = 0.1
    brightness_probability: float = 0.3
    brightness: float = 0.25
    noise_probability: float = 0.3
    noise_std: float = 0.1

    def __call__(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.stack makes new tensors (never views of the memory-mapped cases): augment them in place.
        images = torch.stack([image for image, _ in samples])
        labels = torch.stack([label for _, label in samples])
        return self.augment_in_place(images, labels)

    def augment(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, D, H, W) float, labels (B, 1, D, H, W) uint8 -> augmented copies."""
        return self.augment_in_place(images.clone(), labels.clone())

    def augment_in_place(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(images)
        # Each step changes only the samples it draws, in place.
        flip = torch.nonzero(torch.rand(n) < self.flip_probability).flatten()
        images[flip], labels[flip] = images[flip].flip(LEFT_RIGHT), labels[flip].flip(LEFT_RIGHT)
        chosen = torch.nonzero(torch.rand(n) < self.affine_probability).flatten()
        if len(chosen):
            grid = F.affine_grid(self.random_affines(len(chosen), images.shape[2:]),
                                 [len(chosen), 1, *images.shape[2:]], align_corners=False)
            images[chosen] = F.grid_sample(images[chosen], grid, mode="bilinear", align_corners=False)
            labels[chosen] = F.grid_sample(labels[chosen].float(), grid, mode="nearest",
                                           align_corners=False).to(labels.dtype)
        brighter = torch.nonzero(torch.rand(n) < self.brightness_probability).flatten()
        factor = torch.empty(len(brighter)).uniform_(1 - self.brightness, 1 + self.brightness)
        images[brighter] *= factor.view(-1, 1, 1, 1, 1)
        noisy = torch.nonzero(torch.rand(n) < self.noise_probability).flatten()
        if len(noisy):
            images[noisy] += self.noise_std * torch.randn_like(images[noisy])
        return images, labels

    def random_affines(self, count: int, shape: Sequence[int]) -> torch.Tensor:
        """(count, 3, 4) affine_grid matrices: rotations about the three axes and an isotropic
        scaling, in voxel space (the conversion keeps them rigid on non-cubic volumes)."""
        angles = torch.deg2rad(torch.empty(count, 3).uniform_(-self.degrees, self.degrees))
        scales = torch.empty(count).uniform_(1 - self.scaling, 1 + self.scaling)
        cos, sin = angles.cos(), angles.sin()
        one, zero = torch.ones(count), torch.zeros(count)
        rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1)
        ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1)
        rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1)
        rotation = rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)
        # affine_grid works in coordinates normalised to [-1, 1] per axis, ordered (W, H, D).
        size = torch.tensor([float(s) for s in reversed(shape)])
        matrix = torch.diag(1 / size) @ (rotation / scales.view(-1, 1, 1)) @ torch.diag(size)
        return torch.cat([matrix, torch.zeros(count, 3, 1)], dim=2)
