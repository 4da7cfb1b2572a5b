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
validation cases with the same `evaluate(...)` call as the Trainer's validation (with `-tta`
mirroring), each on its own preprocessing and in the precision it trains in. Validation is not
training: the clock, and with it (b)'s budget and learning rate, stops while validating. The
table gives, for a few Dice thresholds, the training seconds each pipeline took to reach it
first, and their ratio. Other options of main.py (e.g. -batch_size, -channels) change both.
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
from utils.data_class import Cases  # noqa: E402
from utils.environment import seed_everything  # noqa: E402
from utils.evaluation import Autocast, amp_dtype, autocast_for, evaluate  # noqa: E402

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
                 images=torch.stack([d.image.data.float() for d in done]),
                 labels=torch.stack([d.label.data.to(torch.uint8) for d in done]),
                 native_labels=[subject.label.data.to(torch.uint8) for subject in subjects],
                 uncrop=[d.get_inverse_transform(warn=False) for d in done],
                 spacings=[subject.label.spacing for subject in subjects],
                 windows=[whole_volume] * len(done))


def mean_dice(model: torch.nn.Module, cases: Cases, autocast: Autocast, class_names: list[str],
              mirror: bool) -> float:
    """The Trainer's validation (`Trainer.validate`) without the loss: mean Dice over classes."""
    metrics = evaluate(model, cases, torch.device("cpu"), autocast, class_names, mirror=mirror)
    return metrics["dice"].mean().item()


def train_tutorial(config, seconds: float) -> list[tuple[float, float, float]]:
    """(a): epochs of the tutorial's loop until `seconds` of training, validated after each.
    Returns [(training seconds, mean Dice, 1-minute load average)]."""
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
        dice = mean_dice(tutorial.model, val_cases, fp32, tutorial.class_names, config.tta)
        curve.append((trained, dice, os.getloadavg()[0]))
    return curve


def train_project(config, seconds: float) -> list[tuple[float, float, float]]:
    """(b): Trainer.train_one_epoch, validated after each epoch, until `seconds` (config.max_minutes)
    of training. Returns [(training seconds, mean Dice, 1-minute load average)]."""
    trainer = project_trainer(config, Nit=config.Nit)
    curve = []
    while not trainer.time_is_up():
        trainer.train_one_epoch()              # it stops mid-epoch when the budget is used up
        trainer.epoch += 1
        trainer.scheduler.step()
        validating = time.monotonic()
        dice = mean_dice(trainer.network, trainer.val_cases, trainer.autocast, trainer.class_names, config.tta)
        # The Trainer's clock (the budget, and the learning rate's decay) counts training only.
        trainer.started += time.monotonic() - validating
        curve.append((trainer.minutes_trained() * 60, dice, os.getloadavg()[0]))
    return curve


def first_reached(curve: list[tuple[float, float, float]], threshold: float) -> float | None:
    """Training seconds at the first validation with mean Dice >= threshold, or None."""
    return next((seconds for seconds, dice, _ in curve if dice >= threshold), None)


def table(curves: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    best = {pipeline: max(dice for _, dice, _ in curve) for pipeline, curve in curves.items()}
    slower = min(best, key=best.get)
    lines = ["| mean val Dice | (a) tutorial, s | (b) project, s | (a) / (b) |", "|---|---|---|---|"]
    for threshold in [*THRESHOLDS, best[slower]]:
        times = [first_reached(curves[p], threshold) for p in "ab"]
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
          f"minutes of training each, validation after every epoch, mirroring {config.tta}", flush=True)
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
            seconds, dice, _ = max(curve, key=lambda point: point[1])
            loads = [load for _, _, load in curve]
            # A pipeline's own load is about 2 ((b): 2 threads) or 3 ((a): also 2 loader workers).
            print(f"({pipeline}) {PIPELINES[pipeline]}: {len(curve)} epochs, best {dice:.4f} at {seconds:.0f} s; "
                  f"1-minute load average {min(loads):.1f} to {max(loads):.1f}")
            print("    " + ", ".join(f"{s:.0f} s {d:.3f}" for s, d, _ in curve))
        print("\n".join(table(curves)), flush=True)


if __name__ == "__main__":
    main()
