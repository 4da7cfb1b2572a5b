"""Training time to reach a validation Dice: the TorchIO tutorial's pipeline against this project's.

    python benchmarks/time_to_dice.py -data_dir ../shared/data/Task04_Hippocampus --minutes 8

benchmark.py compares iterations per second, but the two pipelines do different iterations (whole
volumes against 40x56x40 crops, another loss and optimizer), so its ratio is not what a user
feels. Here each pipeline trains for the same budget of training time, in its own process:

(a) the TorchIO tutorial's pipeline as benchmark.py builds it (`tutorial_pipeline`): whole
    volumes, its augmentation, 2 loader workers, Dice loss, AdamW at a constant 1e-2, fp32;
(b) this project's Trainer with its defaults (SGD with Nesterov momentum, poly decay over the
    budget, given to it as -max_minutes; -mixed_precision as main.py would resolve it here).

Both have the same model and batch size and are validated after every epoch on the same
validation cases with the same `evaluate(...)` call as the Trainer's validation, each on its own
preprocessing and in the precision it trains in, with and without test-time mirroring: (b)
trains with left-right flips and mirrors by default (-tta), while (a) never sees a flipped image
and loses about 0.1 mean Dice to mirroring, so it is compared as it would predict, unmirrored (the
tables without and with mirroring for both are printed too). Validation is not training: the
clock, and with it (b)'s budget and learning rate, stops while validating. The tables give, for a
few Dice thresholds, the training seconds each pipeline took to reach it first, and their ratio.
Other options of main.py (e.g. -batch_size, -channels) change both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import project_trainer, settings, tutorial_pipeline  # noqa: E402  (after the path)
from utils.data.cache import Cases  # noqa: E402
from utils.training.environment import seed_everything  # noqa: E402
from utils.inference.evaluation import Autocast, amp_dtype, autocast_for, evaluate  # noqa: E402

PIPELINES = {"a": "TorchIO tutorial pipeline (whole volumes, Dice loss, AdamW 1e-2, fp32, 2 workers)",
             "b": "this project's Trainer, defaults (crops, Dice+CE, SGD with poly decay over the budget)"}
THRESHOLDS = [0.70, 0.80, 0.85]      # mean validation Dice; the best of the slower pipeline is added


def tutorial_val_cases(tutorial) -> Cases:
    """The validation cases as the tutorial's pipeline sees them (its rescaling and padding), each
    predicted on its whole padded volume, as it is trained, and measured on its own voxel grid."""
    subjects = tutorial.val_subjects
    done = [tutorial.preprocess(subject) for subject in subjects]
    whole_volume = (slice(None), slice(None), slice(None))
    return Cases(ids=[subject["id"] for subject in subjects],
                 images=[d.image.data.float() for d in done],
                 labels=[d.label.data.to(torch.uint8) for d in done],
                 native_labels=[subject.label.data.to(torch.uint8) for subject in subjects],
                 uncrop=[d.get_inverse_transform(warn=False) for d in done],
                 grids=[None] * len(done),                       # Task04 is all 1 mm: nothing resampled
                 spacings=[subject.label.spacing for subject in subjects],
                 windows=[whole_volume] * len(done),
                 foreground=[None] * len(done))                  # not trained from: no crops


def validate(model: torch.nn.Module, cases: Cases, autocast: Autocast, class_names: list[str]) -> dict:
    """The Trainer's validation (`Trainer.validate`, without the loss), with and without test-time
    mirroring: {'mirrored': mean Dice, 'plain': mean Dice}."""
    return {name: evaluate(model, cases, torch.device("cpu"), autocast, class_names, mirror=mirror)["dice"].mean().item()
            for name, mirror in (("mirrored", True), ("plain", False))}


def train_tutorial(config, seconds: float) -> list[dict]:
    """(a): epochs of the tutorial's loop until `seconds` of training, validated after each.
    Returns [{'seconds': training seconds, 'mirrored', 'plain': mean Dice, 'load': 1-minute load}]."""
    seed_everything(config.random_seed)
    tutorial = tutorial_pipeline(config)
    val_cases = tutorial_val_cases(tutorial)
    fp32 = autocast_for(torch.device("cpu"), enabled=False)
    curve, trained = [], 0.0
    while trained < seconds:
        tutorial.model.train()
        started = time.monotonic()
        # Validation waits for the epoch's end: then the loader's workers have stopped, and
        # cannot prepare batches while the clock is stopped.
        for batch in tutorial.loader:
            tutorial.step(batch)
            if trained + time.monotonic() - started >= seconds:
                break
        trained += time.monotonic() - started
        dice = validate(tutorial.model, val_cases, fp32, tutorial.class_names)
        curve.append({"seconds": trained, **dice, "load": os.getloadavg()[0]})
    return curve


def train_project(config, seconds: float) -> list[dict]:
    """(b): Trainer.train_one_epoch, validated after each epoch, until `seconds` (config.max_minutes)
    of training. Returns [{'seconds', 'mirrored', 'plain', 'load'}] as `train_tutorial`."""
    trainer = project_trainer(config, Nit=config.Nit)
    curve = []
    while not trainer.time_is_up():
        trainer.train_one_epoch()              # it stops mid-epoch when the budget is used up
        trainer.epoch += 1
        trainer.scheduler.step()
        validating = time.monotonic()
        dice = validate(trainer.network, trainer.val_cases, trainer.autocast, trainer.class_names)
        # The Trainer's clock (the budget, and the learning rate's decay) counts training only.
        trainer.started += time.monotonic() - validating
        curve.append({"seconds": trainer.minutes_trained() * 60, **dice, "load": os.getloadavg()[0]})
    return curve


def first_reached(curve: list[dict], key: str, threshold: float) -> float | None:
    """Training seconds at the first validation whose mean Dice (`key`: mirrored or plain) is
    at least `threshold`, or None."""
    return next((point["seconds"] for point in curve if point[key] >= threshold), None)


def table(curves: dict[str, list[dict]], keys: dict[str, str]) -> list[str]:
    """Markdown rows: for each threshold, the seconds each pipeline took, and their ratio.
    `keys` says which Dice of each pipeline counts: {'a': 'plain', 'b': 'mirrored'}, say."""
    best = {p: max(point[keys[p]] for point in curve) for p, curve in curves.items()}
    slower = min(best, key=best.get)
    lines = ["| mean val Dice | (a) tutorial, s | (b) project, s | (a) / (b) |", "|---|---|---|---|"]
    for threshold in [*THRESHOLDS, best[slower]]:
        times = [first_reached(curves[p], keys[p], threshold) for p in "ab"]
        ratio = f"{times[0] / times[1]:.1f}x" if None not in times else "-"
        name = f"{threshold:.2f}" if threshold in THRESHOLDS else f"{threshold:.4f} (best of ({slower}))"
        cells = [f"{t:.0f}" if t is not None else "not reached" for t in times]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), help="train one pipeline (used internally)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget of each pipeline (default: 8)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of each pipeline (default: 1)")
    parser.add_argument("--order", choices=["ab", "ba"], default="ab",
                        help="which pipeline goes first; the order alternates over the rounds (default: ab)")
    known, main_options = parser.parse_known_args()
    # (b) decays its learning rate over the budget, as main.py does with -max_minutes.
    config = settings([*main_options, "-max_minutes", str(known.minutes)])
    if known.pipeline:
        train = train_tutorial if known.pipeline == "a" else train_project
        print(json.dumps(train(config, known.minutes * 60)))
        return

    precision = amp_dtype(torch.device("cpu")) if config.mixed_precision else None
    print(f"batch {config.batch_size}, channels {config.channels}, num_res_units {config.num_res_units}; "
          f"(b): patch {config.patch_size}, lr {config.lr}, momentum {config.momentum}, "
          f"{precision or torch.float32}, channels_last {config.channels_last}; budget {known.minutes:g} "
          f"minutes of training each, validation after every epoch", flush=True)
    for round_ in range(known.rounds):
        curves = {}
        for pipeline in (known.order if round_ % 2 == 0 else known.order[::-1]):
            done = subprocess.run([sys.executable, __file__, "--pipeline", pipeline, "--minutes", str(known.minutes),
                                   *main_options], capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"pipeline {pipeline} failed:\n{done.stderr[-3000:]}")
            curves[pipeline] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\nround {round_ + 1}")
        for pipeline, curve in sorted(curves.items()):
            loads = [point["load"] for point in curve]
            # A pipeline's own load is about 2 ((b): 2 threads) or 3 ((a): also 2 loader workers).
            print(f"({pipeline}) {PIPELINES[pipeline]}: {len(curve)} epochs; 1-minute load average "
                  f"{min(loads):.1f} to {max(loads):.1f}; seconds, mean Dice mirrored / plain:")
            print("    " + ", ".join(f"{p['seconds']:.0f} {p['mirrored']:.3f}/{p['plain']:.3f}" for p in curve))
        # (a) never trains with flips, so mirroring hurts it; (b) trains with them and mirrors by default.
        own = "mirrored" if config.tta else "plain"
        views = {f"each as it predicts: (a) plain, (b) {own} (-tta {config.tta})": {"a": "plain", "b": own},
                 "both plain (no mirroring)": {"a": "plain", "b": "plain"},
                 "both mirrored": {"a": "mirrored", "b": "mirrored"}}
        for title, keys in views.items():
            print(f"\n{title}:")
            print("\n".join(table(curves, keys)), flush=True)


if __name__ == "__main__":
    main()
