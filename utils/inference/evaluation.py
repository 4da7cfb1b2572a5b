"""Inference and metrics, shared by validation during training, -evaluate and -predict.

Each case is predicted on the window of its padded volume that holds it (`Cases.windows`), window
by window (sliding) where that is larger than the training patch, and metrics are computed on its
own voxel grid: the prediction is cropped back (TorchIO's inverse of CropOrPad) and, for a
resampled case, its probabilities resampled onto the case's grid (`Cases.to_native`) before it
meets the original label; distances are in mm, from the voxel spacing.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.networks.utils import one_hot
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import convert_to_tensor
from torch import nn

from utils.data.augmentation import LEFT_RIGHT
from utils.data.cache import Cases
from utils.training.distributed import Place, gather

Autocast = Callable[[], contextlib.AbstractContextManager]
SLIDING_WINDOW_OVERLAP = 0.25
# A fully convolutional network predicts a volume a little larger than its training patch in one
# pass, in memory proportional to its voxels; sliding windows would cover it with 2-8 overlapping
# patches instead. Up to this many times the patch's voxels, one pass: Task04's largest windows
# (48x64x48, 1.6x the 40x56x40 patch) measured 0.8 s a validation slower and no more accurate
# with windows (benchmarks/README.md).
ONE_PASS_FACTOR = 2


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512 and newer). Elsewhere bf16 is
    emulated: a training step measured 10x slower than fp32 on an AVX2-only CPU (benchmarks/)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The low precision that -mixed_precision uses on `device`, or None for plain fp32.

    fp16 on CUDA (with a GradScaler when training); bf16 on a CPU that computes it natively, where
    fp16 is slow and bf16 keeps fp32's range, so no scaler is needed; None on other CPUs.
    """
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def precision_name(device: torch.device, mixed_precision: bool) -> str:
    """In words, the arithmetic that -mixed_precision gives on `device`, e.g. to print at start."""
    dtype = amp_dtype(device) if mixed_precision else None
    return {torch.float16: "fp16 autocast with a GradScaler", torch.bfloat16: "bf16 autocast",
            None: "fp32"}[dtype]


def precision_note(device: torch.device, config) -> str:
    """Why -mixed_precision trains in fp32 on a CPU without native bf16 (on a new line), or ""."""
    if config.mixed_precision and amp_dtype(device) is None:
        return ("\nNote: this CPU has no native bf16 (it needs AVX-512), so -mixed_precision is off and "
                "training runs in fp32, about 10x faster here than emulated bf16.")
    return ""


def autocast_for(device: torch.device, enabled: bool) -> Autocast:
    dtype = amp_dtype(device)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=enabled and dtype is not None)


def mirrored(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Test-time mirroring (as nnU-Net): the mean of the model's scores for a batch and, flipped
    back, for its left-right mirror image, the one flip used in training. Both go through the
    model as one batch, which is faster on a CPU than two calls."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        plain, flipped = model(torch.cat([x, x.flip(LEFT_RIGHT)])).chunk(2)
        return (plain + flipped.flip(LEFT_RIGHT)) / 2
    return predict


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, device: torch.device, autocast: Autocast,
                   roi_size: Sequence[int] | None = None, mirror: bool = False) -> torch.Tensor:
    """Class scores (1, K, D, H, W), float32 on the CPU, for a preprocessed image (1, C, D, H, W)
    whose sides are multiples of the U-Net's downsampling factor.

    An image of at most ONE_PASS_FACTOR times the voxels of `roi_size` (the training patch) is
    predicted in one pass; a larger one window by window with MONAI's sliding-window inference.
    With `mirror`, scores are averaged with those of the mirror image (twice the work).
    """
    model.eval()
    predictor = mirrored(model) if mirror else model
    image = image.to(device)
    with autocast():
        if roi_size is None or image.shape[2:].numel() <= ONE_PASS_FACTOR * math.prod(roi_size):
            scores = predictor(image)
        else:
            scores = sliding_window_inference(image, roi_size, 1, predictor, overlap=SLIDING_WINDOW_OVERLAP)
    return scores.float().cpu()


def keep_largest_component(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep the largest connected component of each foreground class of a (1, D, H, W) label map.
    Returns a new tensor: MONAI's transform edits its input in place, and -evaluate still needs
    the raw prediction."""
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), independent=True)
    return convert_to_tensor(keep(label_map.clone()), dtype=label_map.dtype, track_meta=False)


# Warnings that MONAI's distance metrics give for every case and class, expected here and silenced
# in CaseMetrics only (regular expressions matched at the start of the message; others still show):
EXPECTED_METRIC_WARNINGS = [
    # MONAI 1.5+ passes its own deprecated argument to get_mask_edges; nothing to do on our side.
    (r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy: Argument `always_return_as_numpy` "
     r"has been deprecated", FutureWarning),
    # A class missing from a prediction (common in early epochs) or from a label: its distances
    # are then NaN (hd95) or inf (asd), which is the result, not a problem to report.
    (r"the (prediction|ground truth) of class \S+ is all 0, this may result in nan/inf distance",
     UserWarning),
]


class CaseMetrics:
    """Per-class Dice, 95th-percentile Hausdorff distance and average surface distance (mm)."""

    def __init__(self, class_names: Sequence[str], distances: bool = True):
        self.class_names = list(class_names)          # foreground classes
        self.metrics = {"dice": DiceMetric(include_background=False, reduction="none")}
        if distances:
            self.metrics["hd95"] = HausdorffDistanceMetric(include_background=False, percentile=95,
                                                           reduction="none")
            self.metrics["asd"] = SurfaceDistanceMetric(include_background=False, symmetric=True,
                                                        reduction="none")

    def __call__(self, prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float]) -> dict:
        """Label maps (1, D, H, W) -> {'dice_Anterior': ..., 'hd95_Anterior': ..., ...}."""
        k = len(self.class_names) + 1
        y_pred, y = one_hot(prediction[None].long(), k), one_hot(truth[None].long(), k)
        row = {}
        with warnings.catch_warnings():
            for message, category in EXPECTED_METRIC_WARNINGS:
                warnings.filterwarnings("ignore", message, category, module=r"monai\.")
            for name, metric in self.metrics.items():
                kwargs = {} if name == "dice" else {"spacing": list(spacing)}
                values = metric(y_pred, y, **kwargs)[0]
                row.update({f"{name}_{c}": float(v) for c, v in zip(self.class_names, values)})
        return row


def summarise(rows: list[dict], keys: Sequence[str]) -> dict:
    """{key: (mean, std, cases)} over the cases where the value is defined: Dice is NaN for a class
    absent from both truth and prediction, and the distances NaN (hd95) or inf (asd) for a class
    absent from either. `cases` counts the cases measured, so one empty prediction leaves the others'
    mean intact and says so."""
    summary = {}
    for key in keys:
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        values = values[values.isfinite()]
        mean = values.mean().item() if len(values) else math.nan
        std = values.std(unbiased=False).item() if len(values) else math.nan
        summary[key] = (mean, std, len(values))
    return summary


def predict_cases(model: nn.Module, cases: Cases, device: torch.device, autocast: Autocast,
                  loss_fn: nn.Module | None = None, mirror: bool = False,
                  roi_size: Sequence[int] | None = None) -> tuple[list[torch.Tensor], float]:
    """Label maps (1, X, Y, Z) of `cases` on their own voxel grids, each predicted on the window of
    its padded volume that holds it (by sliding windows of `roi_size`, the training patch, where
    it is larger), and the sum over cases of `loss_fn` on those windows (0.0 without one)."""
    predictions, loss_sum = [], 0.0
    for index in range(len(cases)):
        window = (slice(None), *cases.windows[index])                     # (C, D, H, W) indices
        scores = predict_logits(model, cases.images[index][window][None], device, autocast, roi_size, mirror)
        if loss_fn is not None:
            loss_sum += loss_fn(scores, cases.labels[index][window][None].long()).item()
        predictions.append(cases.to_native(index, scores[0]))
    return predictions, loss_sum


def evaluate(model: nn.Module, cases: Cases, device: torch.device, autocast: Autocast,
             class_names: Sequence[str], loss_fn: nn.Module | None = None, distances: bool = False,
             also_postprocessed: bool = False, mirror: bool = False, place: Place = Place(),
             roi_size: Sequence[int] | None = None) -> dict:
    """Predict every case (the window of its padded volume that holds it, by sliding windows of
    `roi_size` where it is larger) and measure it on its own voxel grid.

    Under DDP each process measures every world_size-th case, and the per-case results are
    gathered, so every process returns the figures of a single-process evaluation.

    Returns {'loss': mean loss over the cases' windows (or None), 'rows': one dict per case,
    'dice': tensor of per-class mean Dice, 'summary': {metric_class: (mean, std)},
    'predictions': label maps (1, X, Y, Z) on their own grids of this process's cases,
    'prediction_ids': those cases' ids}. With `also_postprocessed`, also 'postprocessed': the
    same 'rows', 'dice', 'summary' and 'predictions' after keeping the largest connected
    component of each class of those same predictions (one inference for both).
    """
    mine = cases.subset(cases.ids[place.rank::place.world_size]) if place.distributed else cases
    predictions, loss_sum = predict_cases(model, mine, device, autocast, loss_fn, mirror, roi_size)
    variants = {"raw": predictions}
    if also_postprocessed:
        variants["postprocessed"] = [keep_largest_component(p, len(class_names) + 1) for p in predictions]
    measure = CaseMetrics(class_names, distances)
    rows = {variant: [{"case": case, **measure(label, truth, spacing)}
                      for case, label, truth, spacing in zip(mine.ids, labels, mine.native_labels, mine.spacings)]
            for variant, labels in variants.items()}
    parts = gather((rows, loss_sum), place)
    order = {case: i for i, case in enumerate(cases.ids)}

    def scored(variant: str) -> dict:
        every = sorted((row for part_rows, _ in parts for row in part_rows[variant]),
                       key=lambda row: order[row["case"]])
        summary = summarise(every, [key for key in every[0] if key != "case"])
        dice = torch.tensor([summary[f"dice_{name}"][0] for name in class_names])
        return {"rows": every, "dice": dice, "summary": summary, "predictions": variants[variant]}

    loss = sum(part_loss for _, part_loss in parts) / len(cases) if loss_fn is not None else None
    result = {"loss": loss, **scored("raw"), "prediction_ids": mine.ids}
    if also_postprocessed:
        result["postprocessed"] = scored("postprocessed")
    return result

