"""What a training run writes as it goes, outside the Trainer's story: the epoch's line on the
screen, metrics.csv, curves.png, TensorBoard event files, and at the end predictions.png and
progress.gif. Only the first process of a torchrun job writes. It keeps what these are drawn
from: the epochs' rows (`history`) and the progress frames, which checkpoints save.

TensorBoard: when the `tensorboard` package is installed (requirements.txt has it), each epoch's
scalars (losses, Dice per class and mean, learning rate, peak memory) and, at the end, the
predictions picture go to event files in the run folder, so that
`tensorboard --logdir best_models` overlays every run below that folder (the trials of a sweep).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from utils.files import written_atomically
from utils.outputs.plots import mid_slices, plot_curves, plot_predictions, write_progress_gif
from utils.training.memory import peak_memory

PICTURE_CASES = 3          # validation cases shown in predictions.png
CURVES_EVERY_SECONDS = 30  # curves.png is redrawn at most this often (0.3 s a drawing) and at the end


def tensorboard_writer(run_dir: Path, first_step: int):
    """A SummaryWriter for `run_dir`, or None when tensorboard is not installed. Events of steps
    from `first_step` on, left by an interrupted session, are purged (-resume writes them again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir), purge_step=first_step)


class RunLog:
    def __init__(self, run_dir: str | Path, class_names: Sequence[str], device: torch.device,
                 epochs: int | None = None, is_main: bool = True, tensorboard: bool = True):
        self.run_dir, self.class_names, self.is_main = Path(run_dir), list(class_names), is_main
        self.device = device                    # whose peak memory each row gives
        self.epochs = epochs                    # None when the time budget ends the run
        self.tensorboard = tensorboard
        self.writer = None                      # opened at the first epoch written
        self.curves_drawn = -float("inf")       # when curves.png was last drawn (monotonic s)
        self.history: list[dict] = []           # one row of metrics.csv per epoch
        self.progress_frames: list[list[torch.Tensor]] = []   # mid-slices of the first validation
                                                              # case's prediction, after each epoch

    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)

    def epoch_name(self, number: int) -> str:
        """'epoch  12/100', or 'epoch  12' when the time budget, not -epochs, ends the run."""
        return f"epoch {number:3d}" if self.epochs is None else f"epoch {number:3d}/{self.epochs}"

    def epoch(self, epoch: int, train_loss: float, metrics: dict, lr: float, improved: bool, minutes: float,
              extra: dict | None = None) -> dict:
        """Record the epoch just finished and return its row of metrics.csv: losses, validation
        Dice per class and mean, learning rate, the process's peak memory so far, and `extra`
        columns (e.g. the mean teacher's). Prints its line, rewrites metrics.csv, redraws the
        curves now and then, and writes the TensorBoard scalars."""
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(metrics["loss"], 6),
               **{f"dice_{name}": round(d, 6) for name, d in zip(self.class_names, metrics["dice"].tolist())},
               "dice_mean": round(metrics["dice"].mean().item(), 6), "lr": lr, **peak_memory(self.device),
               **(extra or {})}
        self.history.append(row)
        if not self.is_main:
            return row
        # Only the mid-slices: checkpoints keep every epoch's frame.
        self.progress_frames.append([torch.as_tensor(s).to(torch.uint8) for s in mid_slices(metrics["predictions"][0])])
        dice_text = " ".join(f"{name} {row[f'dice_{name}']:.4f}" for name in self.class_names)
        self.say(f"{self.epoch_name(epoch)}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
                 f"Dice {dice_text}  mean {row['dice_mean']:.4f}  ({minutes:.1f} min)"
                 + ("  *best*" if improved else ""))
        self.write_metrics_csv(self.history)
        # With 10-second epochs, drawing every epoch would cost 3 % of the training time.
        if time.monotonic() - self.curves_drawn >= CURVES_EVERY_SECONDS:
            self.draw_curves(self.history)
        self.write_scalars(row)
        return row

    def write_metrics_csv(self, history: list[dict]) -> None:
        # Rewritten whole from the history every epoch, so after -resume it holds exactly the
        # epochs of the checkpoint, never a duplicate row from an interrupted epoch. Columns are
        # those of any row (a run resumed from before a column existed leaves it empty there).
        path = self.run_dir / "metrics.csv"
        columns = list(dict.fromkeys(key for row in history for key in row))
        with written_atomically(path, newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(history)

    def draw_curves(self, history: list[dict]) -> None:
        plot_curves(history, self.class_names, self.run_dir / "curves.png")
        self.curves_drawn = time.monotonic()

    def write_scalars(self, row: dict) -> None:
        if not self.tensorboard:
            return
        if self.writer is None:
            self.writer = tensorboard_writer(self.run_dir, first_step=row["epoch"])
            if self.writer is None:
                self.tensorboard = False
                return
        step = row["epoch"]
        self.writer.add_scalar("loss/train", row["train_loss"], step)
        self.writer.add_scalar("loss/validation", row["val_loss"], step)
        for name in [*self.class_names, "mean"]:
            self.writer.add_scalar(f"dice/{name}", row[f"dice_{name}"], step)
        self.writer.add_scalar("lr", row["lr"], step)
        for key, value in row.items():
            if key.endswith("_mb"):
                self.writer.add_scalar(f"memory/{key}", value, step)
        self.writer.flush()

    def end(self, metrics: dict, val_cases) -> None:
        """At the end of training: the curves, predictions.png (a few validation cases of the last
        validation) and progress.gif (the first of them across epochs)."""
        if not self.is_main:
            return
        history, progress_frames = self.history, self.progress_frames
        self.draw_curves(history)
        shown = metrics["prediction_ids"][:PICTURE_CASES]
        cases = val_cases.subset(shown)
        native_images = [cases.native_image(i) for i in range(len(cases))]
        figure = plot_predictions(native_images, cases.native_labels, metrics["predictions"][:len(shown)], shown,
                                  self.run_dir / "predictions.png")
        write_progress_gif(native_images[0], progress_frames, self.run_dir / "progress.gif", cases.ids[0])
        if self.writer is not None:
            self.writer.add_figure("predictions", figure, history[-1]["epoch"])
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

