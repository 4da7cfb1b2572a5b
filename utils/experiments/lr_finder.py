"""The learning-rate range test (-lr_find): MONAI's LearningRateFinder, stepping with the run's own
training step.

From START_LR, the learning rate grows exponentially over at most STEPS training steps towards
END_LR, and the smoothed loss of each step is recorded; the test stops early once the loss
diverges (DIVERGED times its best, or not finite). Each step is the Trainer's own forward_pass and
backward_pass, so it has the run's model, loss (deep supervision included), autocast, GradScaler
and augmented batches. Afterwards MONAI puts the model and the optimizer back as they were.

The suggestion is MONAI's `get_steepest_gradient`: the learning rate where the smoothed loss falls
fastest (per step, so per factor of learning rate), between step SKIP_START (before it, the
smoothing has not settled) and the loss's minimum. After the minimum the loss turns towards
divergence, and on Task04 a DynUNet's loss dips once more on the way there: without that limit
the suggestion was lr 1.87, in the blow-up.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.optimizers import LearningRateFinder

from utils.errors import UserError
from utils.outputs.plots import plot_range_test

START_LR = 1e-5
END_LR = 10.0
STEPS = 100
SMOOTHING = 0.05           # MONAI's default: loss_i = 0.05 * loss + 0.95 * loss_(i-1)
DIVERGED = 5               # MONAI's default: stop when the loss exceeds 5x its best
SKIP_START = 10
SUGGESTION_RULE = (f"the steepest fall of the smoothed loss before its minimum, MONAI's get_steepest_gradient "
                   f"from step {SKIP_START} to the minimum")


@dataclass
class RangeTestResult:
    lrs: list[float]
    losses: list[float]            # smoothed, one per learning rate
    suggestion: float | None       # None when the loss fell nowhere
    diverged: bool                 # stopped before STEPS because the loss diverged


class RunStepFinder(LearningRateFinder):
    """MONAI's finder, each of whose steps is `trainer.forward_pass` then `trainer.backward_pass`."""

    def __init__(self, trainer):
        # MONAI refuses an optimizer that a scheduler has marked ("initial_lr"): the range test
        # sets the learning rate itself. This process does not train afterwards.
        for group in trainer.optimizer.param_groups:
            group.pop("initial_lr", None)
        super().__init__(trainer.model, trainer.optimizer, trainer.loss_fn, device=trainer.device, verbose=False)
        self.trainer = trainer

    def _train_batch(self, train_iter, accumulation_steps: int, non_blocking_transfer: bool = True) -> float:
        loss, _ = self.trainer.forward_pass(next(train_iter))
        self.trainer.backward_pass(loss)
        value = loss.item()
        return value if math.isfinite(value) else math.inf      # infinity ends the test as diverged


def range_test(trainer) -> RangeTestResult:
    """Run the range test with `trainer`'s model, loss, precision and training batches."""
    finder = RunStepFinder(trainer)
    trainer.model.train()
    finder.range_test(trainer.train_loader, start_lr=START_LR, end_lr=END_LR, num_iter=STEPS,
                      smooth_f=SMOOTHING, diverge_th=DIVERGED)
    steps = len(finder.history["lr"])
    kept = [(lr, loss) for lr, loss in zip(finder.history["lr"], finder.history["loss"]) if math.isfinite(loss)]
    lrs, losses = [lr for lr, _ in kept], [loss for _, loss in kept]
    suggestion = None
    lowest = int(np.argmin(losses)) if losses else 0
    if lowest - SKIP_START >= 3:                # enough steps between the first ones and the minimum
        finder.history = {"lr": lrs, "loss": losses}
        # MONAI's skip_end counts from the last step: leave out everything after the minimum
        # (after it the loss rises, and may dip again on its way to divergence).
        lr, _ = finder.get_steepest_gradient(skip_start=SKIP_START, skip_end=len(losses) - lowest - 2)
        if lr is not None and np.gradient(losses[SKIP_START:lowest + 1]).min() < 0:
            suggestion = lr
    return RangeTestResult(lrs, losses, suggestion, diverged=steps < STEPS)


def write_range_test(result: RangeTestResult, run_dir: Path) -> tuple[Path, Path]:
    """lr_find.csv (lr, loss) and lr_find.png (loss against lr, log scale, the suggestion marked)."""
    csv_path, png_path = Path(run_dir) / "lr_find.csv", Path(run_dir) / "lr_find.png"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["lr", "loss"])
        writer.writerows(zip(result.lrs, result.losses))
    plot_range_test(result.lrs, result.losses, result.suggestion, png_path)
    return csv_path, png_path


def find_learning_rate(trainer) -> float:
    """-lr_find: the range test with `trainer`'s model, loss, precision and augmented batches;
    lr_find.csv and lr_find.png in its run folder; prints and returns the suggested -lr."""
    test = range_test(trainer)
    csv_path, png_path = write_range_test(test, trainer.run_dir)
    print(f"Range test: {len(test.lrs)} steps from lr {test.lrs[0]:.2g} to {test.lrs[-1]:.2g}"
          + (" (stopped: the loss diverged)" if test.diverged else "") + f"; {csv_path}, {png_path}")
    if test.suggestion is None:
        raise UserError("The range test's loss did not fall anywhere, so it suggests no learning rate. "
                        f"Look at {png_path}; try -lr_find with more data per step (-batch_size) or check the data.")
    print(f"suggested -lr {test.suggestion:.3g} ({SUGGESTION_RULE})")
    return test.suggestion
