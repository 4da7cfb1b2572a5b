"""The network: a MONAI 3D U-Net built from a small dict that checkpoints keep."""
from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn


def model_config(in_channels: int, num_classes: int, channels: list[int], num_res_units: int) -> dict:
    """Everything needed to rebuild the same network; stored in every checkpoint."""
    return {"in_channels": in_channels, "out_channels": num_classes, "channels": list(channels),
            "strides": [2] * (len(channels) - 1), "num_res_units": num_res_units, "norm": "instance"}


def downsampling_factor(config: dict) -> int:
    """Input sides must be multiples of this (the product of the strides)."""
    factor = 1
    for stride in config["strides"]:
        factor *= stride
    return factor


def build_model(config: dict) -> nn.Module:
    return UNet(spatial_dims=3, in_channels=config["in_channels"], out_channels=config["out_channels"],
                channels=config["channels"], strides=config["strides"],
                num_res_units=config["num_res_units"], norm=config["norm"])


def last_layer(model: nn.Module) -> nn.Module:
    """The final convolution, the one that produces the class scores."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return convolutions[-1]


def freeze_all_but_last_layer(model: nn.Module) -> tuple[int, int]:
    """Freeze every parameter except the last layer's; return (trainable, total) counts."""
    model.requires_grad_(False)
    last_layer(model).requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))
