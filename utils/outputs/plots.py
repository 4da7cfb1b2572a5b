"""Pictures: training curves, predictions over ground truth, progress across epochs, augmentations.

Figures are built with matplotlib's object interface (no global pyplot state), so they can be
written to files from a training run and shown in the notebook alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

# background transparent, anterior orange, posterior blue
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (1.0, 0.55, 0.0, 0.6), (0.1, 0.5, 1.0, 0.6)])
VIEWS = ("sagittal", "coronal", "axial")


def mid_slices(volume: torch.Tensor) -> list[np.ndarray]:
    """The three orthogonal middle slices of a (C, D, H, W) or (D, H, W) volume; of its first
    channel (modality) when it has several."""
    v = volume.reshape(-1, *volume.shape[-3:])[0].float().numpy()
    d, h, w = (s // 2 for s in v.shape)
    return [v[d].T, v[:, h].T, v[:, :, w].T]


def as_slices(volume) -> list[np.ndarray]:
    """Mid-slices of a volume, or the slices themselves if it is already a list of three."""
    if isinstance(volume, (list, tuple)):
        return [torch.as_tensor(s).float().numpy() for s in volume]
    return mid_slices(volume)


def show_slices(axes, image, label=None) -> None:
    """Draw the three mid-slices of `image` with `label` overlaid (volumes or lists of slices)."""
    for ax, image_slice, label_slice in zip(axes, as_slices(image),
                                            as_slices(label) if label is not None else [None] * 3):
        ax.imshow(image_slice, cmap="gray", origin="lower")
        if label_slice is not None:
            ax.imshow(label_slice, cmap=LABEL_COLOURS, vmin=0, vmax=2, origin="lower", interpolation="nearest")
        ax.set_axis_off()


def plot_curves(history: Sequence[dict], class_names: Sequence[str], path: str | Path | None = None) -> Figure:
    """Train/val loss, per-class validation Dice and the learning rate against epoch."""
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    loss_ax, dice_ax, lr_ax = figure.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="Dice + cross-entropy loss", title="loss")
    for name in class_names:
        dice_ax.plot(epochs, [row[f"dice_{name}"] for row in history], label=name)
    dice_ax.plot(epochs, [row["dice_mean"] for row in history], label="mean", color="black", lw=1)
    dice_ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    lr_ax.plot(epochs, [row["lr"] for row in history], color="tab:green")
    lr_ax.set(xlabel="epoch", ylabel="learning rate (after the epoch)", title="learning rate")
    for ax in (loss_ax, dice_ax):
        ax.legend()
    for ax in (loss_ax, dice_ax, lr_ax):
        ax.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=80)
    return figure


def plot_range_test(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None,
                    path: str | Path | None = None) -> Figure:
    """The learning-rate range test: smoothed training loss against learning rate (log scale),
    the suggested learning rate marked."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot(lrs, losses)
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested -lr {suggestion:.3g}")
        ax.legend()
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    if path is not None:
        figure.savefig(path, dpi=80)
    return figure


def plot_predictions(images: torch.Tensor, truths: torch.Tensor, predictions: torch.Tensor,
                     ids: Sequence[str], path: str | Path | None = None) -> Figure:
    """Orthogonal mid-slices of a few cases: ground truth (left) and prediction (right) overlaid.

    images (N, C, D, H, W), of which the first channel is shown; truths, predictions (N, 1, D, H, W).
    """
    figure = Figure(figsize=(12, 2.2 * len(ids)), layout="constrained")
    axes = figure.subplots(len(ids), 6, squeeze=False)
    for row, case in enumerate(ids):
        show_slices(axes[row, :3], images[row], truths[row])
        show_slices(axes[row, 3:], images[row], predictions[row])
        axes[row, 0].set_title(f"{case}: ground truth", loc="left", fontsize=9)
        axes[row, 3].set_title("prediction", loc="left", fontsize=9)
    if path is not None:
        figure.savefig(path, dpi=80)
    return figure


def write_progress_gif(image: torch.Tensor, frames: Sequence, path: str | Path, case: str) -> None:
    """One case's prediction after each epoch, as an animated GIF. frames: label maps, each a
    volume or its three mid-slices."""
    figure = Figure(figsize=(7.5, 2.8), layout="constrained")
    axes = figure.subplots(1, 3)

    def draw(epoch: int):
        for ax in axes:
            ax.clear()
        show_slices(axes, image, frames[epoch])
        figure.suptitle(f"{case}, epoch {epoch + 1}")

    FuncAnimation(figure, draw, frames=len(frames)).save(path, writer=PillowWriter(fps=4), dpi=60)


def plot_augmentations(image: torch.Tensor, label: torch.Tensor, augmentation, count: int = 4) -> Figure:
    """A preprocessed case (first row) and `count` random augmentations of it.

    `augmentation` is a augmentation.BatchAugmentation; image (C, D, H, W), label (1, D, H, W).
    """
    images, labels = augmentation.augment(image.expand(count, *image.shape).clone(),
                                          label.expand(count, *label.shape).clone())
    figure = Figure(figsize=(7.5, 2.3 * (count + 1)), layout="constrained")
    axes = figure.subplots(count + 1, 3)
    show_slices(axes[0], image, label)
    axes[0, 0].set_title("preprocessed", loc="left", fontsize=9)
    for row in range(1, count + 1):
        show_slices(axes[row], images[row - 1], labels[row - 1])
        axes[row, 0].set_title(f"augmented {row}", loc="left", fontsize=9)
    return figure


STATE_STYLES = {"complete": ("tab:blue", "o"), "pruned": ("tab:orange", "o"), "out of memory": ("tab:red", "x"),
                "failed": ("dimgray", "x"), "interrupted": ("silver", "x"), "running": ("tab:green", ".")}


def plot_sweep(rows: Sequence[dict], space: dict, path: str | Path | None = None) -> Figure:
    """A sweep: each trial's best validation mean Dice against each swept option, and against the
    time it started; one colour per state (trials without a Dice, e.g. out of memory, at 0)."""
    from datetime import datetime
    names = list(space)
    figure = Figure(figsize=(4 * (len(names) + 1), 3.6), layout="constrained")
    axes = figure.subplots(1, len(names) + 1, squeeze=False)[0]
    dice = [float(row["dice_mean"]) if row.get("dice_mean") not in ("", None) else 0.0 for row in rows]
    states = [str(row["state"]).split(":")[0] for row in rows]
    starts = [datetime.fromisoformat(row["started"]) for row in rows if row.get("started")]
    first = min(starts) if starts else None
    for ax, name in zip(axes, names):
        spec = space[name]
        values = [row[name] for row in rows]
        if isinstance(spec, list):                      # categorical: one position per listed value
            labels = [" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in spec]
            x = [labels.index(str(v)) if str(v) in labels else -1 for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
        else:
            x = [float(v) for v in values]
            if spec.get("log"):
                ax.set_xscale("log")
        for state, (colour, marker) in STATE_STYLES.items():
            points = [(xi, d) for xi, d, s in zip(x, dice, states) if s == state]
            if points:
                ax.scatter(*zip(*points), c=colour, marker=marker, label=state)
        ax.set(xlabel=name, ylabel="best validation mean Dice", title=f"Dice against {name}")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for state, (colour, marker) in STATE_STYLES.items():
        points = [((datetime.fromisoformat(row["started"]) - first).total_seconds() / 60, d)
                  for row, d, s in zip(rows, dice, states) if s == state and row.get("started")]
        if points:
            ax.scatter(*zip(*points), c=colour, marker=marker, label=state)
    ax.set(xlabel="minutes since the first trial started", ylabel="best validation mean Dice", title="trials over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        figure.savefig(path, dpi=80, format="png")      # `path` may be an open file (sweep.py)
    return figure
