"""The networks: MONAI's segmentation networks by name, each built from a small dict that checkpoints keep.

For each -architecture this module knows, and nothing else in the package asks which network it is:
  - what every input side must be a multiple of (`input_multiples`), known before any data is read,
    because preprocessing pads the volumes to it;
  - how the options become that dict (`model_config`) and the dict a network (`build_model`);
  - which layer produces the class scores (`last_layer`), the one that fine-tuning trains.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR, UNet
from torch import nn

from utils.errors import CheckpointError, UserError

# -architecture names and the MONAI classes they build.
ARCHITECTURES = {"unet": "UNet", "dynunet": "DynUNet", "segresnet": "SegResNet", "unetr": "UNETR",
                 "swinunetr": "SwinUNETR"}

# -channels when not given: the U-Net's measured default for the CNNs; SwinUNETR's width must be a
# multiple of 12 (its attention heads), and MONAI's default 24 is the smallest it documents.
DEFAULT_CHANNELS = {"unet": (16, 32, 64, 128), "dynunet": (16, 32, 64, 128), "segresnet": (16, 32, 64, 128),
                    "unetr": (16, 32, 64, 128), "swinunetr": (24, 48, 96, 192, 384)}

# The DynUNet is planned as nnU-Net plans its U-Net (nnunetv2 get_pool_and_conv_props; MONAI's
# DynUNet tutorial plans alike): an axis is halved while it keeps at least MIN_FEATURE_MAP voxels
# and its spacing is less than ANISOTROPY_RATIO times the finest, at most MAX_DOWNSAMPLINGS times.
MIN_FEATURE_MAP = 4
ANISOTROPY_RATIO = 2
MAX_DOWNSAMPLINGS = 5
MAX_FILTERS = 320                     # nnU-Net's widest 3D level
SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)  # MONAI's residual blocks per level (4 levels); deeper levels get 4
SEGRESNET_GROUPS = 8                  # SegResNet's group normalisation: 8 groups of channels
UNETR_PATCH = 16                      # the ViT patch of MONAI's UNETR (fixed there)
UNETR_HIDDEN_PER_FEATURE = 12         # ViT width = 12 x feature_size (192 at 16); MONAI's default 768
                                      # (about 90 M parameters) is too slow for a CPU
UNETR_HEADS = 12
UNETR_MLP_RATIO = 4
SWIN_DIVISOR = 32                     # SwinUNETR halves the resolution 5 times
SWIN_FEATURE_MULTIPLE = 12            # its attention heads (3, 6, 12, 24) split feature_size x 1, 2, 4, 8


# ---------------------------------------------------------------- input sides


def halvings(side: int) -> int:
    """How often nnU-Net's plan may halve a side of `side` voxels, at most: while it keeps at
    least MIN_FEATURE_MAP voxels, and at most MAX_DOWNSAMPLINGS times."""
    count = 0
    while side >= 2 * MIN_FEATURE_MAP and count < MAX_DOWNSAMPLINGS:
        side, count = math.ceil(side / 2), count + 1
    return count


def input_multiples(architecture: str, channels: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    """What each side of an input (the patch, a volume, a prediction window) must be a multiple of.

    unet and segresnet halve every side once per level after the first; unetr cuts the input into
    16-voxel ViT patches; swinunetr halves it 5 times. A DynUNet's strides depend on the voxel
    spacing, which is known only after preprocessing, which needs this number first: so each side
    is taken as a multiple of 2 ** halvings(side), what its plan would be for isotropic voxels.
    No spacing halves a side more often, so the plan for any spacing fits.
    """
    if architecture in ("unet", "segresnet"):
        return [2 ** (len(channels) - 1)] * 3
    if architecture == "dynunet":
        return [2 ** halvings(side) for side in patch_size]
    return [UNETR_PATCH if architecture == "unetr" else SWIN_DIVISOR] * 3


def downsampling_factor(config: dict) -> int:
    """One number every input side must be a multiple of, for the network of `config` (volumes are
    padded to it). The multiples of `input_multiples` are powers of 2, so their largest is a
    multiple of all of them."""
    return config["input_divisor"]


def nearest_fitting(patch_size: Sequence[int], multiples: Sequence[int]) -> list[int]:
    """Each side rounded to the nearest multiple of its own (halves up). (A DynUNet may halve a
    rounded side once more than before, but only when it is 4x its new multiple: it still fits.)"""
    return [max(m, math.floor(side / m + 0.5) * m) for side, m in zip(patch_size, multiples)]


def check_network_options(architecture: str, channels: Sequence[int], patch_size: Sequence[int]) -> None:
    """Refuse, before any data is read, a width or patch size that the network cannot take."""
    width = channels[0]
    if architecture == "segresnet" and width % SEGRESNET_GROUPS:
        raise UserError(f"-architecture segresnet normalises {SEGRESNET_GROUPS} groups of channels, so -channels' "
                        f"first value (its init_filters) must be a multiple of {SEGRESNET_GROUPS}, not {width}; "
                        f"e.g. -channels {max(SEGRESNET_GROUPS, round(width / SEGRESNET_GROUPS) * SEGRESNET_GROUPS)}.")
    if architecture == "swinunetr" and width % SWIN_FEATURE_MULTIPLE:
        nearest = max(SWIN_FEATURE_MULTIPLE, round(width / SWIN_FEATURE_MULTIPLE) * SWIN_FEATURE_MULTIPLE)
        raise UserError(f"-architecture swinunetr splits its width (feature_size, -channels' first value) among "
                        f"attention heads, so it must be a multiple of {SWIN_FEATURE_MULTIPLE}, not {width}; "
                        f"pass e.g. -channels {nearest} (MONAI's default is 24).")
    if architecture == "swinunetr" and max(patch_size) < 2 * SWIN_DIVISOR:
        raise UserError(f"-architecture swinunetr normalises its deepest features, 1/{SWIN_DIVISOR} of the patch, "
                        f"which needs more than one voxel: a side of -patch_size must be {2 * SWIN_DIVISOR} or more; "
                        f"got -patch_size {' '.join(map(str, patch_size))}.")
    if architecture == "dynunet" and max(halvings(side) for side in patch_size) < 2:
        raise UserError(f"-architecture dynunet needs two levels below the first (MONAI's DynUNet does), so a "
                        f"side of -patch_size must have {4 * MIN_FEATURE_MAP} voxels or more, to be halved twice "
                        f"and keep {MIN_FEATURE_MAP}; got -patch_size {' '.join(map(str, patch_size))}.")
    multiples = input_multiples(architecture, channels, patch_size)
    if any(side % m for side, m in zip(patch_size, multiples)):
        why = {"unet": f"the U-Net halves it {len(channels) - 1} times, once per level after the first",
               "segresnet": f"SegResNet halves it {len(channels) - 1} times, once per level after the first",
               "dynunet": f"the DynUNet may halve a side while it keeps {MIN_FEATURE_MAP} voxels, at most "
                          f"{MAX_DOWNSAMPLINGS} times",
               "unetr": f"UNETR's ViT cuts it into {UNETR_PATCH}-voxel patches",
               "swinunetr": f"SwinUNETR halves it {int(math.log2(SWIN_DIVISOR))} times"}[architecture]
        raise UserError(f"-patch_size {' '.join(map(str, patch_size))} does not fit -architecture {architecture}: "
                        f"its sides must be multiples of {' '.join(map(str, multiples))} ({why}). The nearest "
                        f"that fits: -patch_size {' '.join(map(str, nearest_fitting(patch_size, multiples)))}")


# ---------------------------------------------------------------- the DynUNet's plan


def plan_dynunet(patch_size: Sequence[int], spacing: Sequence[float]) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides, one of each per level (the first level has stride 1), as nnU-Net
    plans them for a patch of `patch_size` voxels of `spacing` mm.

    At each level, the axes that still have at least 2 x MIN_FEATURE_MAP voxels and a spacing less
    than ANISOTROPY_RATIO times the finest of those are halved (each at most MAX_DOWNSAMPLINGS
    times), so the voxels become more isotropic level by level. A kernel is 1 along an axis while
    its spacing is ANISOTROPY_RATIO or more times the finest, then 3 (no in-plane smoothing across
    thick slices); the bottom level's kernel is 3 on every axis. (nnU-Net also stops when only one
    axis could be halved and it has fewer than 3 x MIN_FEATURE_MAP voxels; that rule is left out.)
    """
    sizes, spacing = [float(side) for side in patch_size], [float(mm) for mm in spacing]
    kernel, pooled = [1] * len(sizes), [0] * len(sizes)
    kernels, strides = [], [[1] * len(sizes)]
    while True:
        large = [axis for axis, side in enumerate(sizes) if side >= 2 * MIN_FEATURE_MAP]
        if not large:
            break
        finest = min(spacing[axis] for axis in large)
        halved = [axis for axis in large if spacing[axis] / finest < ANISOTROPY_RATIO and pooled[axis] < MAX_DOWNSAMPLINGS]
        if not halved:
            break
        kernel = [3 if k == 3 or mm / min(spacing) < ANISOTROPY_RATIO else 1 for k, mm in zip(kernel, spacing)]
        kernels.append(kernel)
        strides.append([2 if axis in halved else 1 for axis in range(len(sizes))])
        for axis in halved:
            pooled[axis] += 1
            sizes[axis], spacing[axis] = math.ceil(sizes[axis] / 2), spacing[axis] * 2
    kernels.append([3] * len(sizes))
    return kernels, strides


def dynunet_filters(channels: Sequence[int], levels: int) -> list[int]:
    """-channels as a DynUNet's filters per level: cut to `levels`, or extended by doubling the
    last, at most MAX_FILTERS (as nnU-Net widens its levels)."""
    filters = list(channels[:levels])
    while len(filters) < levels:
        filters.append(min(2 * filters[-1], MAX_FILTERS))
    return filters


# ---------------------------------------------------------------- configs and networks


def model_config(in_channels: int, num_classes: int, channels: Sequence[int], num_res_units: int = 1,
                 architecture: str = "unet", patch_size: Sequence[int] = (40, 56, 40),
                 spacing: Sequence[float] | None = None, deep_supervision: bool = True) -> dict:
    """Everything needed to rebuild the same network; stored in every checkpoint and config.json.

    `channels` sets the width (see -channels); `num_res_units` is the U-Net's; `patch_size` and
    `spacing` (mm, None: 1 mm) plan the DynUNet, and `patch_size` is the transformers' input size;
    `deep_supervision` adds the DynUNet's heads.
    """
    width = channels[0]
    if architecture == "unet":
        network = {"channels": list(channels), "strides": [2] * (len(channels) - 1),
                   "num_res_units": num_res_units, "norm": "instance"}
    elif architecture == "dynunet":
        kernels, strides = plan_dynunet(patch_size, spacing or (1.0, 1.0, 1.0))
        # nnU-Net supervises every decoder output but the lowest, which it weights 0: a network
        # of n downsamplings gets heads on the n - 2 outputs between the lowest and the full one.
        heads = max(len(strides) - 3, 0) if deep_supervision else 0
        network = {"patch_size": list(patch_size), "kernel_size": kernels, "strides": strides,
                   "filters": dynunet_filters(channels, len(strides)), "deep_supervision_heads": heads}
    elif architecture == "segresnet":
        levels = len(channels)
        blocks_down = [SEGRESNET_BLOCKS_DOWN[min(level, len(SEGRESNET_BLOCKS_DOWN) - 1)] for level in range(levels)]
        network = {"init_filters": width, "blocks_down": blocks_down, "blocks_up": [1] * (levels - 1)}
    elif architecture == "unetr":
        hidden = UNETR_HIDDEN_PER_FEATURE * width
        network = {"img_size": list(patch_size), "feature_size": width, "hidden_size": hidden,
                   "mlp_dim": UNETR_MLP_RATIO * hidden, "num_heads": UNETR_HEADS}
    elif architecture == "swinunetr":
        network = {"input_size": list(patch_size), "feature_size": width}
    else:
        raise ValueError(f"unknown architecture {architecture!r}; known: {list(ARCHITECTURES)}")
    return {"architecture": architecture, "in_channels": in_channels, "out_channels": num_classes, **network,
            "input_divisor": max(input_multiples(architecture, channels, patch_size))}


class PadsToInputSize:
    """For a network of a fixed input size (`input_size`, the training patch): a smaller input (a
    crop of a smaller volume, a validation window) is padded to it with 0, the mean intensity of
    the z-scored image, and the scores are cropped back to the input's size."""
    input_size: tuple[int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        padding = [p for side, size in zip(reversed(shape), reversed(self.input_size)) for p in (0, max(size - side, 0))]
        scores = super().forward(F.pad(x, padding))
        return scores[..., :shape[0], :shape[1], :shape[2]]


class PaddedUNETR(PadsToInputSize, UNETR):
    """MONAI's UNETR, whose ViT has one position embedding per 16-voxel patch of `img_size`, so
    that it takes exactly that size."""

    def __init__(self, img_size: Sequence[int], **kwargs):
        super().__init__(img_size=img_size, **kwargs)
        self.input_size = tuple(img_size)


class PaddedSwinUNETR(PadsToInputSize, SwinUNETR):
    """MONAI's SwinUNETR, whose deepest features (1/32 of the input) are instance-normalised, which
    needs more than one voxel: an input of 32^3 fails, so inputs are padded to the patch."""

    def __init__(self, input_size: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.input_size = tuple(input_size)


def build_model(config: dict) -> nn.Module:
    """The network of a `model_config` dict."""
    name = config.get("architecture", "unet")
    io = {"in_channels": config["in_channels"], "out_channels": config["out_channels"]}
    if name == "unet":
        return UNet(spatial_dims=3, **io, channels=config["channels"], strides=config["strides"],
                    num_res_units=config["num_res_units"], norm=config["norm"])
    if name == "dynunet":
        heads = config["deep_supervision_heads"]
        return DynUNet(spatial_dims=3, **io, kernel_size=config["kernel_size"], strides=config["strides"],
                       upsample_kernel_size=config["strides"][1:], filters=config["filters"],
                       deep_supervision=heads > 0, deep_supr_num=max(heads, 1))   # (MONAI wants 1 or more,
                                                                                 # even without heads)
    if name == "segresnet":
        return SegResNet(spatial_dims=3, **io, init_filters=config["init_filters"],
                         blocks_down=tuple(config["blocks_down"]), blocks_up=tuple(config["blocks_up"]))
    if name == "unetr":
        return PaddedUNETR(**io, img_size=config["img_size"], feature_size=config["feature_size"],
                           hidden_size=config["hidden_size"], mlp_dim=config["mlp_dim"], num_heads=config["num_heads"])
    if name == "swinunetr":
        return PaddedSwinUNETR(**io, input_size=config["input_size"], feature_size=config["feature_size"])
    raise ValueError(f"unknown architecture {name!r}; known: {list(ARCHITECTURES)}")


def training_outputs(config: dict) -> int:
    """How many score maps the network returns in training mode: 1, or with deep supervision the
    full-resolution one and one per head, stacked (B, outputs, K, D, H, W) at full resolution."""
    return 1 + config.get("deep_supervision_heads", 0)


def describe(config: dict) -> str:
    """The network in a few words, for the start of a run."""
    name = config.get("architecture", "unet")
    details = {
        "unet": lambda: f"channels {config['channels']}",
        "dynunet": lambda: f"filters {config['filters']}, strides {config['strides'][1:]}, kernels "
                           f"{config['kernel_size']}, deep supervision "
                           + (f"on {training_outputs(config)} outputs" if config["deep_supervision_heads"] else "off"),
        "segresnet": lambda: f"init_filters {config['init_filters']}, blocks_down {config['blocks_down']}",
        "unetr": lambda: f"feature_size {config['feature_size']}, ViT hidden size {config['hidden_size']}, "
                         f"input {config['img_size']}",
        "swinunetr": lambda: f"feature_size {config['feature_size']}, input {config['input_size']}",
    }[name]()
    return f"MONAI {ARCHITECTURES[name]}, {details}"


# ---------------------------------------------------------------- fine-tuning


def last_layer(model: nn.Module) -> nn.Module:
    """The layer that produces the class scores. A DynUNet's deep-supervision heads are left out:
    they only shape the training loss, and never the predictions."""
    if isinstance(model, DynUNet):
        return model.output_block
    if isinstance(model, (UNETR, SwinUNETR)):
        return model.out
    if isinstance(model, SegResNet):
        return model.conv_final[-1]      # after its normalisation and activation
    convolutions = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return convolutions[-1]              # the U-Net's final convolution


def freeze_all_but_last_layer(model: nn.Module) -> tuple[int, int]:
    """Freeze every parameter except the last layer's; return (trainable, total) counts."""
    model.requires_grad_(False)
    last_layer(model).requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def check_same_model(state: dict, expected: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose network differs from the one built for this data and config."""
    saved = state["model_config"]
    if saved.get("architecture") != expected["architecture"]:
        raise CheckpointError(f"{path} holds a {saved.get('architecture')} network, not a "
                              f"{expected['architecture']}. Leave -architecture out to continue from it, or "
                              f"pass a checkpoint of a {expected['architecture']}.")
    different = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if different:
        lines = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in different.items())
        raise CheckpointError(f"{path} holds a different network ({lines}). Use a checkpoint trained "
                              f"for this task, or leave out (or set to match it) -channels, -num_res_units, "
                              f"-deep_supervision and -patch_size, which otherwise come from its run.")


def build_network(config, in_channels: int, num_classes: int, spacing: Sequence[float] | None,
                  saved: dict | None = None, saved_path: str | Path | None = None,
                  say: Callable = print) -> tuple[nn.Module, dict]:
    """The network of `config` (utils/args.py's Config) for this data, and its model_config (what
    checkpoints keep to rebuild it): a DynUNet is planned for the voxel `spacing` preprocessing
    chose. With `saved` (the checkpoint at `saved_path`), it must be that checkpoint's network;
    its weights are loaded unless it is being resumed (config.resume restores them later).
    -fine_tune freezes all but the last layer."""
    architecture = model_config(in_channels, num_classes, config.channels, config.num_res_units,
                                config.architecture, config.patch_size, spacing, config.deep_supervision)
    if config.architecture == "dynunet" and len(architecture["filters"]) != len(config.channels):
        say(f"Note: the DynUNet planned for this patch and spacing has {len(architecture['filters'])} levels "
            f"and -channels gives {len(config.channels)}, so its filters are {architecture['filters']}.")
    model = build_model(architecture)
    if saved is not None:
        check_same_model(saved, architecture, saved_path)
        if not config.resume:
            model.load_state_dict(saved["model"])
            say(f"Starting from the weights in {saved_path}")
    if config.fine_tune:
        trainable, total = freeze_all_but_last_layer(model)
        say(f"Fine-tuning the last layer only: {trainable:,} trainable of {total:,} parameters")
    else:
        trainable, total = count_parameters(model)
        say(f"Model: {describe(architecture)}, {total:,} parameters")
    return model, architecture
