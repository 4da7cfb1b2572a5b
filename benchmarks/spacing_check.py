"""Validation Dice of a model trained on 1 mm scans, on the same scans at other spacings:
resampled to the training spacing before prediction (new) against taken as they come (old).

    python benchmarks/spacing_check.py -checkpoint /tmp/bench/run_before/best.pt -data_dir ../shared/data/Task04_Hippocampus

Each validation case of the checkpoint (its "split") is read in canonical orientation and, with
its label, resampled by TorchIO (image linear, label nearest) to each spacing of SPACINGS, kept
in memory. Every copy is predicted twice by `predict_volume`, as -predict does: with the
checkpoint's preprocessing given `spacing` = the training data's, 1 mm (new: the copy is
resampled to 1 mm, predicted, and its probabilities resampled back onto the copy's grid), and
with `spacing` None (old: the copy's voxels are taken as if they were 1 mm ones). Both
predictions are on the copy's own grid (shape and affine checked) and are measured against the
copy's label. Mirroring (-tta) and mixed precision are the checkpoint's. -limit N keeps the
first N validation cases. The table gives, per spacing, the mean Dice (mean over the classes of
the per-class means over the cases; NaN, a class absent from both, ignored) and per-class Dice,
old and new, and the seconds spent predicting. At the native spacing old and new are the same
computation (a 1 mm scan is not resampled), so they must agree.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torchio as tio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.training.checkpoint import load_checkpoint  # noqa: E402  (after the path above)
from utils.inference.evaluation import CaseMetrics, autocast_for, precision_name, summarise  # noqa: E402
from utils.data.layouts import case_id, read_task  # noqa: E402
from utils.training.networks import build_model, downsampling_factor  # noqa: E402
from utils.inference.prediction import predict_volume  # noqa: E402
from utils.data.preprocessing import Preprocessing  # noqa: E402
from utils.data.scans import read_scan  # noqa: E402

SPACINGS = {"native 1 mm": None, "1.5 x 1.5 x 1.5 mm": (1.5, 1.5, 1.5), "1 x 1 x 2.5 mm": (1.0, 1.0, 2.5)}
TRAINING_SPACING = (1.0, 1.0, 1.0)       # Task04's, the spacing the checkpoint was trained on
MODES = {"old": None, "new": TRAINING_SPACING}    # Preprocessing.spacing of each way of predicting


class RecordedOrientation(tio.ToOrientation):
    """predict_volume's last step (back to the scan's own orientation), keeping the image it
    returns: predict_volume returns only its tensor, and this is where its affine can be read."""
    last: tio.Image | None = None

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        subject = super().apply_transform(subject)
        RecordedOrientation.last = subject.get_first_image()
        return subject


def copies(image: Path, label: Path) -> dict[str, tio.Subject]:
    """{spacing name: Subject(image, label)} of one case in canonical orientation, resampled."""
    subject = tio.ToCanonical()(tio.Subject(image=read_scan(image, "image"), label=read_scan(label, "label")))
    return {name: subject if spacing is None else tio.Resample(spacing)(subject) for name, spacing in SPACINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-checkpoint", required=True, help="a best.pt or last.pt written by main.py")
    parser.add_argument("-data_dir", required=True, help="the MSD task folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("-limit", type=int, default=None, help="use only the first N validation cases (default: all)")
    args = parser.parse_args()

    started = time.perf_counter()
    state = load_checkpoint(args.checkpoint)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    config = state.get("config", {})
    device, mirror = torch.device("cpu"), bool(config.get("tta", True))
    mixed_precision = bool(config.get("mixed_precision", True))
    autocast = autocast_for(device, mixed_precision)
    checkpoint_preprocessing = Preprocessing.from_dict(state["preprocessing"])
    preprocessing = {mode: dataclasses.replace(checkpoint_preprocessing, spacing=spacing)
                     for mode, spacing in MODES.items()}
    divisor = downsampling_factor(state["model_config"])
    num_classes = state["model_config"]["out_channels"]
    patch = config.get("patch_size")

    info = read_task(args.data_dir)
    pairs = {case_id(image): (image, label) for image, label in info.pairs}
    val_ids = state["split"]["val"][:args.limit]
    class_names = info.foreground_names
    measure = CaseMetrics(class_names, distances=False)
    print(f"{args.checkpoint}: {len(val_ids)} validation cases, checkpoint spacing "
          f"{checkpoint_preprocessing.spacing}, mirror {mirror}, {precision_name(device, mixed_precision)}, "
          f"patch {patch}, {torch.get_num_threads()} threads", flush=True)

    rows = {(name, mode): [] for name in SPACINGS for mode in MODES}
    seconds = {key: 0.0 for key in rows}
    largest_affine_difference = 0.0
    for number, case in enumerate(val_ids, 1):
        for name, copy in copies(*pairs[case]).items():
            for mode in MODES:
                RecordedOrientation.last = None
                tick = time.perf_counter()
                with mock.patch.object(tio, "ToOrientation", RecordedOrientation):
                    prediction = predict_volume(model, copy.image, preprocessing[mode], divisor, device, autocast,
                                                num_classes, postprocess=False, mirror=mirror, roi_size=patch)
                seconds[name, mode] += time.perf_counter() - tick
                grid = RecordedOrientation.last
                assert prediction.shape == (1, *copy.image.spatial_shape) == grid.shape, \
                    f"{case} {name} {mode}: prediction {tuple(prediction.shape)} vs copy {copy.image.shape}"
                difference = float(np.abs(grid.affine - copy.image.affine).max())
                assert difference < 1e-5, f"{case} {name} {mode}: affine\n{grid.affine}\nvs copy's\n{copy.image.affine}"
                largest_affine_difference = max(largest_affine_difference, difference)
                rows[name, mode].append(measure(prediction, copy.label.data, copy.label.spacing))
        print(f"  {number}/{len(val_ids)} {case}", end="\r", flush=True)

    print(f"\nEvery prediction ({len(val_ids) * len(SPACINGS) * len(MODES)}) has its copy's shape and affine "
          f"(largest affine difference {largest_affine_difference:.1e}).")
    keys = [f"dice_{c}" for c in class_names]
    header = ["spacing", "cases", "old mean", "new mean", *[f"{m} {c}" for c in class_names for m in MODES],
              "old s", "new s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in SPACINGS:
        summary = {mode: summarise(rows[name, mode], keys) for mode in MODES}
        mean = {mode: np.mean([summary[mode][k][0] for k in keys]) for mode in MODES}
        cells = [name, str(len(rows[name, "old"])), f"{mean['old']:.4f}", f"{mean['new']:.4f}",
                 *[f"{summary[m][f'dice_{c}'][0]:.4f}" for c in class_names for m in MODES],
                 f"{seconds[name, 'old']:.1f}", f"{seconds[name, 'new']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"old: Preprocessing.spacing None (voxels taken as 1 mm); new: resampled to {TRAINING_SPACING} mm and "
          f"back. Seconds: predict_volume only. Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
