"""The data set's fingerprint: each case's spacing, shape and foreground intensities, and the
target spacing they call for (nnU-Net's rule), computed once from the cases as they are read.

utils/data/preprocessing.py resamples every case to `target_spacing`. The fingerprint is saved with the
run (config.json and the checkpoints); its foreground percentiles are what nnU-Net v2 uses to
normalise CT (not done here: MRI is z-scored per case).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torchio as tio

# nnU-Net v2's nnunetv2/configuration.py: an axis is "very coarse" if its spacing is more than
# this many times the others'.
ANISO_THRESHOLD = 3
PERCENTILES = (0.5, 99.5)            # nnU-Net's CT normalisation clips to these foreground percentiles
# Foreground voxels sampled per channel over the whole data set, shared equally by the cases
# (nnU-Net samples 10e7; 10**6 gives the same percentiles to a fraction of a grey level and keeps
# reading a data set fast).
FOREGROUND_SAMPLES = 10 ** 6
SAMPLING_SEED = 1234                 # nnU-Net's seed: the fingerprint is the same on every run


def intensity_stats(values: np.ndarray) -> dict | None:
    """Mean, std and the 0.5/99.5 percentiles of some voxel values; None if there are none."""
    if values.size == 0:
        return None
    low, high = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "percentile_00_5": float(low), "percentile_99_5": float(high)}


def foreground_values(subject: tio.Subject) -> list[np.ndarray]:
    """The image's values where the label is > 0, one float64 array per channel."""
    mask = subject.label.data[0].numpy() > 0
    image = subject.image.data.numpy()
    return [image[channel][mask].astype(np.float64) for channel in range(len(image))]


def case_fingerprint(case_id: str, subject: tio.Subject) -> dict:
    """One case as read (canonical orientation, native grid): its spacing in mm and shape in
    voxels along the canonical axes, and its foreground intensity statistics per channel (None
    for a channel of a case without foreground)."""
    return {"id": case_id, "spacing": [float(s) for s in subject.image.spacing],
            "shape": [int(s) for s in subject.spatial_shape],
            "foreground": [intensity_stats(values) for values in foreground_values(subject)]}


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """The spacing (mm, per axis) to resample every case to: nnU-Net's rule.

    As nnU-Net v2's `ExperimentPlanner.determine_fullres_target_spacing`
    (nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py): the median
    spacing of each axis, unless the axis of the coarsest median spacing is more than
    ANISO_THRESHOLD times coarser than every other axis and has fewer than 1/ANISO_THRESHOLD as
    many voxels (median shape) as each of them (e.g. MRI of 5 mm slices, 0.8 mm in plane). That
    axis then takes the 10th percentile of its spacings, so that the thicker-sliced cases are
    interpolated rather than most cases losing slices, though never finer than the other axes.
    (nnU-Net adds 1e-5 to that floor to keep the axis the coarsest one for its transposes; there
    are none here.)
    """
    spacings, shapes = np.asarray(spacings, dtype=float), np.asarray(shapes, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    coarse = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != coarse]
    anisotropic_spacing = target[coarse] > ANISO_THRESHOLD * max(target[others])
    few_voxels = median_shape[coarse] * ANISO_THRESHOLD < min(median_shape[others])
    if anisotropic_spacing and few_voxels:
        target[coarse] = max(np.percentile(spacings[:, coarse], 10), max(target[others]))
    return [float(s) for s in target]


def case_summary(case_id: str, subject: tio.Subject, samples_per_case: int) -> tuple[dict, list[np.ndarray]]:
    """What the fingerprint keeps of one case, so that cases can be read one at a time: its
    `case_fingerprint` and `samples_per_case` of its foreground values per channel, drawn as
    nnU-Net does (with replacement, so that a case of little foreground counts as much as a large
    one, from a generator seeded the same for every case)."""
    rng = np.random.RandomState(SAMPLING_SEED)
    samples = [rng.choice(v, samples_per_case, replace=True) if v.size else v for v in foreground_values(subject)]
    return case_fingerprint(case_id, subject), samples


def samples_per_case(num_cases: int) -> int:
    return max(1, FOREGROUND_SAMPLES // num_cases)


def fingerprint(summaries: Sequence[tuple[dict, list[np.ndarray]]]) -> dict:
    """The fingerprint of every case's `case_summary`, JSON-serialisable:

    {"cases": [case_fingerprint, ...], "median_spacing": [3 floats], "median_shape": [3 floats],
     "target_spacing": [3 floats], "foreground": [per channel: mean, std, percentile_00_5,
     percentile_99_5 over foreground voxels sampled equally from every case, or None]}
    """
    cases = [case for case, _ in summaries]
    spacings, shapes = [c["spacing"] for c in cases], [c["shape"] for c in cases]
    channels = len(summaries[0][1])
    pooled = [np.concatenate([samples[channel] for _, samples in summaries]) for channel in range(channels)]
    return {"cases": cases,
            "median_spacing": [float(s) for s in np.median(spacings, axis=0)],
            "median_shape": [float(s) for s in np.median(shapes, axis=0)],
            "target_spacing": target_spacing(spacings, shapes),
            "foreground": [intensity_stats(values) for values in pooled]}
