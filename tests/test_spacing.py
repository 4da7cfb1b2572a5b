"""Scans of other voxel spacings: resampled to the data set's target spacing for training, and
predictions and metrics back on each scan's own grid, in mm (utils/data/preprocessing.py)."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from monai.networks.utils import one_hot

import main as entry
from conftest import TINY, synthetic_case, write_task
from utils.data.cache import load_cases
from utils.training.checkpoint import load_checkpoint
from utils.inference.evaluation import CaseMetrics
from utils.data.layouts import read_task
from utils.data.preprocessing import Preprocessing, ResampleTo, crop_or_pad_bounds, resampled_shape, uncrop_transform

THICK = np.diag([0.8, 0.8, 2.0, 1.0])         # 0.8 mm in plane, 2 mm slices: the median, so the target


def anisotropic_task(root, thin_cases=(0, 3, 6)):
    """An MSD task of 8 cases: most of 0.8 x 0.8 x 2 mm voxels, `thin_cases` of 1 mm; each with two
    blocks of 6 x 10 x 6 voxels (labels 1 and 2) in an image that follows them, plus noise."""
    task = write_task(root, n_cases=8)
    rng = np.random.default_rng(0)
    for number, (image_path, label_path) in enumerate(read_task(task).pairs):
        shape = tuple(int(side) for side in rng.integers([20, 20, 10], [25, 25, 13]))
        label = np.zeros(shape, np.uint8)
        label[6:12, 6:16, 3:9] = 1
        label[12:18, 6:16, 3:9] = 2
        image = (100 + 60 * label + rng.normal(0, 10, shape)).astype(np.float32)
        affine = np.eye(4) if number in thin_cases else THICK
        nib.save(nib.Nifti1Image(image, affine), image_path)
        nib.save(nib.Nifti1Image(label, affine), label_path)
    return task


@pytest.mark.parametrize("spacing, target", [((1, 1, 1), (1.5, 1.5, 1.5)), ((1, 1, 1), (0.8, 0.8, 2.0)),
                                             ((0.8, 0.8, 2.0), (1, 1, 1)), ((1, 1, 1), (1, 1, 1.0000001))])
def test_resampled_shape_is_torchios(spacing, target):
    image = tio.ScalarImage(tensor=torch.rand(1, 13, 17, 9), affine=np.diag([*spacing, 1]))
    out = ResampleTo(target)(image)
    assert out.spatial_shape == resampled_shape((13, 17, 9), spacing, target)


@pytest.mark.parametrize("shape, target", [((9, 12, 7), (12, 12, 12)), ((15, 12, 10), (12, 16, 8))])
def test_crop_or_pad_bounds_are_torchios_and_uncrop_undoes_them(shape, target):
    data = torch.rand(1, *shape)
    done = tio.CropOrPad(target)(tio.ScalarImage(tensor=data))
    padding, cropping = crop_or_pad_bounds(shape, target)
    assert torch.equal(tio.Crop(cropping)(tio.Pad(padding)(tio.ScalarImage(tensor=data))).data, done.data)
    back = uncrop_transform(padding, cropping)(done.data)
    kept = tuple(slice(first, side - last) for first, last, side in zip(cropping[::2], cropping[1::2], shape))
    assert back.shape[1:] == shape and torch.equal(back[(slice(None), *kept)], data[(slice(None), *kept)])


@pytest.mark.parametrize("thin_cases, target, dice", [
    ((0, 3, 6), (0.8, 0.8, 2.0), 0.8),           # 1 mm cases lose half their slices (a block edge may move one)
    ((0, 1, 2, 3, 4), (1.0, 1.0, 1.0), 0.8),     # 0.8 x 0.8 x 2 mm cases go to 1 mm and back
])
def test_cases_are_resampled_to_the_median_spacing_and_mapped_back_to_their_own_grid(tmp_path, thin_cases,
                                                                                      target, dice):
    info = read_task(anisotropic_task(tmp_path / "data", thin_cases))
    cases, preprocessing = load_cases(info, divisor=2, progress=False)
    assert preprocessing.spacing == pytest.approx(target)
    assert cases.fingerprint["target_spacing"] == pytest.approx(list(target))
    for index, (_, label_path) in enumerate(info.pairs):
        native = np.asarray(nib.load(label_path).dataobj)
        assert cases.native_labels[index].shape[1:] == native.shape            # metrics on the file's grid
        assert cases.spacings[index] == pytest.approx(nib.load(label_path).header.get_zooms())
        if np.allclose(cases.spacings[index], target):
            assert cases.grids[index] is None                                   # already at the target
            assert torch.equal(cases.uncrop[index](cases.labels[index]), cases.native_labels[index])
            continue
        assert cases.grids[index] is not None
        # A prediction that is the training label itself comes back onto the case's own grid.
        window = (slice(None), *cases.windows[index])
        scores = one_hot(cases.labels[index][window][None].long(), 3)[0].float() * 10
        back, truth = cases.to_native(index, scores), cases.native_labels[index]
        assert back.shape == truth.shape
        for value in (1, 2):
            overlap = ((back == value) & (truth == value)).sum()
            assert 2 * overlap / ((back == value).sum() + (truth == value).sum()) > dice


def test_scans_at_the_target_spacing_keep_their_voxels(task_dir):
    """Task04's case: every scan already 1 mm, nothing is resampled and nothing changes."""
    cases, preprocessing = load_cases(read_task(task_dir), divisor=4, progress=False)
    assert preprocessing.spacing == (1.0, 1.0, 1.0) and cases.grids == [None] * len(cases)


def test_distances_are_in_mm_of_the_cases_own_grid():
    truth = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    truth[0, 4:8, 4:8, 4:8] = 1
    shifted = torch.roll(truth, 1, dims=3)                   # one voxel along the third axis
    metrics = CaseMetrics(["a"])
    assert metrics(shifted, truth, (0.8, 0.8, 2.0))["hd95_a"] == pytest.approx(2.0)
    assert metrics(shifted, truth, (1.0, 1.0, 1.0))["hd95_a"] == pytest.approx(1.0)


def test_a_run_on_anisotropic_data_predicts_and_evaluates_on_each_scans_grid(tmp_path):
    task = anisotropic_task(tmp_path / "data")
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY, "-epochs", "3",
                       "-Nit", "4", "-cache_dir", str(tmp_path / "cache")]) == 0
    state = load_checkpoint(run / "best.pt")
    assert Preprocessing.from_dict(state["preprocessing"]).spacing == pytest.approx((0.8, 0.8, 2.0))
    assert json.loads((run / "config.json").read_text())["fingerprint"]["target_spacing"] == pytest.approx([0.8, 0.8, 2.0])
    # -evaluate reuses the run's cache and scores each case on its own grid.
    caches = list((tmp_path / "cache").iterdir())
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(run / "best.pt")]) == 0
    assert list((tmp_path / "cache").iterdir()) == caches
    with open(run / "evaluation_val.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(row["dice_Anterior"]) >= 0 for row in rows)
    # -predict: a 1 mm scan with an oblique, permuted affine, and a 0.8 x 0.8 x 2 mm one.
    odd = np.array([[0, -1.2, 0, 30.5], [0.9, 0, 0, -12.0], [0, 0, 1.5, 7.25], [0, 0, 0, 1]])
    (tmp_path / "in").mkdir()
    for name, affine in (("odd.nii.gz", odd), ("thick.nii.gz", THICK)):
        image, _ = synthetic_case(np.random.default_rng(5), (13, 17, 9), as_uint8=False)
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "in" / name)
    assert entry.main(["-predict", str(tmp_path / "in"), "-train_from_checkpoint", str(run / "best.pt"),
                       "-predictions_dir", str(tmp_path / "out")]) == 0
    for name, affine in (("odd.nii.gz", odd), ("thick.nii.gz", THICK)):
        written = nib.load(tmp_path / "out" / name)
        assert written.shape == (13, 17, 9) and np.allclose(written.affine, affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
