"""The three exercises this package answers, each with the numbers and the picture that show why
the answer is right (the notebook draws them live; README: "The three exercises").

1. Mixed precision: why fp16 needs a GradScaler (`fp16_underflow`, `plot_underflow`).
2. Fine-tuning: which layers train and which are frozen (`layer_table`, `changed_by_one_step`,
   `plot_layers`).
3. Exactly Nit iterations per epoch, every case equally likely: the even sampler against a
   shuffled loader cut after Nit batches (`draw_counts`, `plot_draw_counts`).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from utils.data.sampling import EvenSampler

GRADSCALER_SCALE = 2.0 ** 16      # torch.amp.GradScaler's initial scale (init_scale=65536)
FP16_SMALLEST = 2.0 ** -24        # the smallest positive fp16 number (a subnormal); below half of it: 0


# ---------------------------------------------------------------- 1. GradScaler


def fp16_underflow(model: nn.Module, loss_fn: Callable, images: torch.Tensor, labels: torch.Tensor,
                   scale: float = GRADSCALER_SCALE) -> dict:
    """Real gradients of one training step (computed in fp32), and what fp16 makes of them.

    Returns {"gradients": every non-zero gradient value (1-D float64 array), "zero_unscaled": how
    many of them become 0 in fp16, "zero_scaled": how many become 0 once multiplied by `scale` (as
    GradScaler multiplies the loss, and so every gradient) first, "inf_scaled": how many overflow to
    infinity then (GradScaler would skip that step and lower its scale), "total"}.
    """
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    gradients = torch.cat([p.grad.detach().flatten().double() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    gradients = gradients[gradients != 0]
    unscaled, scaled = gradients.half(), (gradients * scale).half()
    return {"gradients": gradients.numpy(), "total": len(gradients),
            "zero_unscaled": int((unscaled == 0).sum()), "zero_scaled": int((scaled == 0).sum()),
            "inf_scaled": int(torch.isinf(scaled).sum()), "scale": scale}


def plot_underflow(result: dict, precision: str = "") -> Figure:
    """Histogram of |gradient| (log scale) with the fp16 limit, before and after scaling, and the
    count of gradients that fp16 turns into 0 either way."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    hist_ax, bar_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    magnitudes = np.abs(result["gradients"])
    bins = np.logspace(np.log10(magnitudes.min()), np.log10(magnitudes.max() * result["scale"]), 80)
    hist_ax.hist(magnitudes, bins=bins, alpha=0.7, label="gradients")
    hist_ax.hist(magnitudes * result["scale"], bins=bins, alpha=0.5, label=f"x {result['scale']:.0f} (GradScaler)")
    hist_ax.axvline(FP16_SMALLEST / 2, color="tab:red", ls="--", label="fp16 rounds below this to 0")
    hist_ax.axvline(65504, color="black", ls=":", label="fp16's largest (65504)")
    hist_ax.set(xscale="log", xlabel="|gradient|", ylabel="count", title="one training step's gradients")
    hist_ax.legend(fontsize=8)
    total = result["total"]
    counts = [result["zero_unscaled"], result["zero_scaled"]]
    bars = bar_ax.bar(["fp16", "fp16 after\nGradScaler"], counts, color=["tab:red", "tab:green"])
    for bar, count in zip(bars, counts):
        bar_ax.annotate(f"{count:,}\n({100 * count / total:.2f} %)", (bar.get_x() + bar.get_width() / 2, count),
                        ha="center", va="bottom", fontsize=9)
    bar_ax.set(ylabel=f"gradients that become 0 (of {total:,})", title="lost to underflow")
    bar_ax.set_ylim(0, max(counts) * 1.35 + 1)
    if precision:
        figure.suptitle(f"This machine trains in: {precision}", fontsize=10)
    return figure


# ---------------------------------------------------------------- 2. fine-tuning


def layer_table(model: nn.Module) -> list[dict]:
    """Every module that holds parameters itself: its name, parameter count and whether they train."""
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            rows.append({"layer": name, "type": type(module).__name__, "parameters": sum(p.numel() for p in own),
                         "trainable": all(p.requires_grad for p in own)})
    return rows


def changed_by_one_step(model: nn.Module, step: Callable[[], None]) -> list[str]:
    """The names of the parameters that `step` (one training step) changes."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step()
    return [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]


def plot_layers(rows: Sequence[dict]) -> Figure:
    """Parameters per layer (log scale), frozen grey and trainable green."""
    figure = Figure(figsize=(10, 0.22 * len(rows) + 1.2), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(rows))
    colours = ["tab:green" if row["trainable"] else "lightgray" for row in rows]
    ax.barh(y, [row["parameters"] for row in rows], color=colours)
    ax.set_yticks(y, [f"{row['layer']} ({row['type']})" for row in rows], fontsize=7)
    ax.invert_yaxis()
    trainable = sum(row["parameters"] for row in rows if row["trainable"])
    total = sum(row["parameters"] for row in rows)
    ax.set(xscale="log", xlabel="parameters",
           title=f"fine-tuning: {trainable:,} of {total:,} parameters train (green), the rest are frozen")
    return figure


# ---------------------------------------------------------------- 3. the even sampler


def draw_counts(n_cases: int, batch_size: int, Nit: int, epochs: int, seed: int = 0) -> dict:
    """How often each case is drawn over `epochs` epochs of exactly `Nit` batches:
    {"even": counts with this package's EvenSampler, "naive": counts with the obvious answer, a
    shuffled DataLoader (a new permutation every epoch) whose epoch is cut after Nit batches}.
    Each a list of n_cases counts."""
    even = EvenSampler(n_cases, Nit * batch_size, seed, batch_size)
    even_counts = Counter()
    for _ in range(epochs):
        even_counts.update(list(iter(even)))
    cases = list(range(n_cases))
    naive_loader = DataLoader(cases, batch_size=batch_size,
                              sampler=RandomSampler(cases, generator=torch.Generator().manual_seed(seed)))
    naive_counts = Counter()
    for _ in range(epochs):
        for step, batch in enumerate(naive_loader):
            if step == Nit:
                break
            naive_counts.update(batch.tolist())
    return {"even": [even_counts[i] for i in cases], "naive": [naive_counts[i] for i in cases],
            "expected": epochs * Nit * batch_size / n_cases}


def plot_draw_counts(counts: dict, title: str = "") -> Figure:
    """Per-case draw counts of both samplers, sorted, with the expected count; the cases the naive
    loader drew least are the ones it starves."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    ax = figure.subplots()
    for name, colour in (("naive", "tab:red"), ("even", "tab:blue")):
        values = sorted(counts[name])
        label = ("shuffled loader cut after Nit batches" if name == "naive" else "EvenSampler (this package)")
        ax.plot(values, drawstyle="steps-mid", color=colour,
                label=f"{label}: {min(values)} to {max(values)} draws, std {np.std(values):.2f}")
    ax.axhline(counts["expected"], color="black", ls=":", label=f"expected {counts['expected']:.2f}")
    ax.set(xlabel="cases, sorted by how often they were drawn", ylabel="draws", title=title or "draws per case")
    ax.legend(fontsize=8)
    return figure
