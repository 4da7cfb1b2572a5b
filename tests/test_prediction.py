"""-predict and -evaluate on a checkpoint trained once on tiny synthetic data."""
import csv
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import main as entry
from conftest import TINY, synthetic_case, write_task
from utils.training.checkpoint import load_checkpoint
from utils.inference.evaluation import CaseMetrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    task = write_task(root / "data", n_cases=8)
    run = root / "run"
    assert entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY,
                       "-epochs", "10", "-Nit", "4", "-lr", "0.05"]) == 0
    return task, run / "best.pt"


def scan(path, shape=(11, 17, 9), affine=None, seed=1):
    image, label = synthetic_case(np.random.default_rng(seed), shape, as_uint8=False)
    nib.save(nib.Nifti1Image(image, np.eye(4) if affine is None else affine), path)
    return label


ODD_AFFINE = np.array([[0, -1.2, 0, 30.5], [0.9, 0, 0, -12.0], [0, 0, 1.5, 7.25], [0, 0, 0, 1]])


def test_prediction_has_the_input_shape_and_affine(trained, tmp_path):
    _, checkpoint = trained
    (tmp_path / "in").mkdir()
    scan(tmp_path / "in" / "subject_a.nii.gz", affine=ODD_AFFINE)
    code = entry.main(["-predict", str(tmp_path / "in" / "subject_a.nii.gz"), "-train_from_checkpoint",
                       str(checkpoint), "-predictions_dir", str(tmp_path / "out")])
    assert code == 0
    written = nib.load(tmp_path / "out" / "subject_a.nii.gz")
    original = nib.load(tmp_path / "in" / "subject_a.nii.gz")
    assert written.shape == original.shape == (11, 17, 9)
    assert np.allclose(written.affine, original.affine, atol=1e-6)
    assert written.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


def test_prediction_is_mapped_back_to_the_file_orientation(trained, tmp_path):
    """The same scan stored with permuted and flipped voxel axes gets the same segmentation."""
    _, checkpoint = trained
    (tmp_path / "in").mkdir()
    truth = scan(tmp_path / "in" / "plain.nii.gz")                   # identity affine, (11, 17, 9)
    data = nib.load(tmp_path / "in" / "plain.nii.gz").get_fdata().astype(np.float32)
    swapped = np.ascontiguousarray(np.transpose(data, (1, 0, 2))[::-1])  # B[i, j, k] = A[j, 16 - i, k]
    affine = np.array([[0, 1, 0, 0], [-1, 0, 0, 16], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(swapped, affine), tmp_path / "in" / "swapped.nii.gz")
    assert entry.main(["-predict", str(tmp_path / "in"), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out")]) == 0
    plain = np.asarray(nib.load(tmp_path / "out" / "plain.nii.gz").dataobj)
    other = np.asarray(nib.load(tmp_path / "out" / "swapped.nii.gz").dataobj)
    assert other.shape == (17, 11, 9)
    assert np.array_equal(other, np.transpose(plain, (1, 0, 2))[::-1])
    # The model learnt the synthetic task, so the prediction overlaps the truth.
    overlap = [2 * ((plain == c) & (truth == c)).sum() / ((plain == c).sum() + (truth == c).sum()) for c in (1, 2)]
    assert min(overlap) > 0.7


def test_a_larger_scan_than_the_training_shape(trained, tmp_path):
    _, checkpoint = trained
    scan(tmp_path / "big.nii", shape=(30, 21, 25))
    assert entry.main(["-predict", str(tmp_path / "big.nii"), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out")]) == 0
    assert nib.load(tmp_path / "out" / "big.nii").shape == (30, 21, 25)


def test_bad_files_are_named_and_the_others_still_predicted(trained, tmp_path, capsys):
    _, checkpoint = trained
    folder = tmp_path / "in"
    folder.mkdir()
    scan(folder / "good_1.nii.gz")
    scan(folder / "good_2.nii.gz", seed=2)
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), folder / "flat_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10, 4), np.float32), np.eye(4)), folder / "series_4d.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    code = entry.main(["-predict", str(folder), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out")])
    assert code == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["good_1.nii.gz", "good_2.nii.gz"]
    out = capsys.readouterr()
    assert "flat_2d.nii.gz: is 2D" in out.out
    assert "series_4d.nii.gz: is 4D" in out.out
    assert "notes.txt: not a NIfTI file" in out.out
    assert "broken.nii.gz: cannot be read" in out.out
    assert "Predicted 2 of 6 volumes" in out.out and "volumes/s" in out.out


def test_unwritable_predictions_dir(trained, tmp_path, capsys):
    _, checkpoint = trained
    scan(tmp_path / "a.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code = entry.main(["-predict", str(tmp_path / "a.nii.gz"), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(blocker / "out")])
    assert code == 1 and "Cannot write predictions into" in capsys.readouterr().err


def test_evaluate_writes_per_case_and_summary_csv(trained, tmp_path, capsys):
    task, checkpoint = trained
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(checkpoint), "-data_dir", str(task),
                       "-device", "cpu"]) == 0     # the device of training, whose figures it repeats
    rows = list(csv.DictReader(open(checkpoint.parent / "evaluation_val.csv")))
    assert len(rows) == 2 * 2                                  # 2 validation cases, raw and post-processed
    assert {"case", "postprocessed", "dice_Anterior", "hd95_Posterior", "asd_Anterior"} <= set(rows[0])
    summary = list(csv.DictReader(open(checkpoint.parent / "evaluation_val_summary.csv")))
    assert {(r["metric"], r["class"]) for r in summary} == {(m, c) for m in ("dice", "hd95", "asd")
                                                           for c in ("Anterior", "Posterior")}
    assert all(0 <= int(r["cases"]) <= 2 for r in summary)     # the cases each mean is over
    # -evaluate and the training's own validation use the same code: the Dice agree.
    history = list(csv.DictReader(open(checkpoint.parent / "metrics.csv")))
    best = max(history, key=lambda r: float(r["dice_mean"]))
    raw = {r["class"]: float(r["mean"]) for r in summary if r["metric"] == "dice" and r["postprocessed"] == "False"}
    assert raw["Anterior"] == pytest.approx(float(best["dice_Anterior"]), abs=1e-3)
    assert "post-processed" in capsys.readouterr().out


def test_evaluate_on_the_training_split(trained):
    task, checkpoint = trained
    assert entry.main(["-evaluate", "True", "-evaluate_split", "train", "-train_from_checkpoint",
                       str(checkpoint), "-data_dir", str(task)]) == 0
    assert len(list(csv.DictReader(open(checkpoint.parent / "evaluation_train.csv")))) == 2 * 6


def test_a_run_repeats_from_its_config_json(trained, tmp_path):
    _, checkpoint = trained
    repeat = tmp_path / "repeat"
    assert entry.main(["-config", str(checkpoint.parent / "config.json"), "-best_models_dir", str(repeat),
                       "-epochs", "2"]) == 0
    first = list(csv.DictReader(open(checkpoint.parent / "metrics.csv")))[:1]
    assert list(csv.DictReader(open(repeat / "metrics.csv")))[:1][0]["train_loss"] == first[0]["train_loss"]


def test_predict_segments_a_validation_case_exactly_as_validation_does(trained, tmp_path):
    task, checkpoint = trained
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(checkpoint), "-data_dir", str(task),
                       "-device", "cpu"]) == 0     # the device of training, whose figures it repeats
    rows = [r for r in csv.DictReader(open(checkpoint.parent / "evaluation_val.csv")) if r["postprocessed"] == "False"]
    files = [task / "imagesTr" / f"{row['case']}.nii.gz" for row in rows]
    (tmp_path / "in").mkdir()
    for file in files:
        os.symlink(file, tmp_path / "in" / file.name)
    assert entry.main(["-predict", str(tmp_path / "in"), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out"), "-device", "cpu"]) == 0
    measure = CaseMetrics(["Anterior", "Posterior"], distances=False)
    for row, file in zip(rows, files):
        predicted = torch.as_tensor(np.asarray(nib.load(tmp_path / "out" / file.name).dataobj))[None]
        truth = torch.as_tensor(np.asarray(nib.load(task / "labelsTr" / file.name).dataobj))[None]
        dice = measure(predicted, truth, (1.0, 1.0, 1.0))
        assert dice["dice_Anterior"] == pytest.approx(float(row["dice_Anterior"]), abs=1e-6)
        assert dice["dice_Posterior"] == pytest.approx(float(row["dice_Posterior"]), abs=1e-6)


def test_read_volume_gives_channels_first_data_and_the_files_affine(tmp_path):
    from utils.inference.prediction import read_volume
    data = np.random.default_rng(0).integers(0, 255, (11, 17, 9)).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, ODD_AFFINE), tmp_path / "plain.nii.gz")
    nib.save(nib.Nifti1Image(data[..., None], ODD_AFFINE), tmp_path / "one_channel.nii.gz")
    for name in ("plain.nii.gz", "one_channel.nii.gz"):
        image = read_volume(tmp_path / name, in_channels=1)
        assert image.data.shape == (1, 11, 17, 9) and image.data.dtype == torch.float32
        assert torch.equal(image.data[0], torch.from_numpy(data.astype(np.float32)))
        assert np.array_equal(image.affine, nib.load(tmp_path / name).affine)   # as stored, exactly


def test_a_scan_far_larger_than_the_training_volumes_is_predicted_with_a_warning(trained, tmp_path, capsys):
    """A whole head given to a model trained on crops: the file is named, with its extent and the
    training's, and what to do; it is still predicted."""
    from utils.inference.prediction import FIELD_OF_VIEW_FACTOR
    _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)
    target, extent = state["preprocessing"]["target_shape"], state["training_extent_mm"]   # extent <= target
    folder = tmp_path / "in"
    folder.mkdir()
    long_side = int(FIELD_OF_VIEW_FACTOR * target[0]) + 6             # too long in x only, at 1 mm
    scan(folder / "whole_head.nii.gz", shape=(long_side, 17, 9))
    scan(folder / "coarse_voxels.nii.gz", affine=np.diag([5.0, 5.0, 5.0, 1.0]))   # few voxels, 5 mm each
    scan(folder / "hippocampus_crop.nii.gz")                                        # (11, 17, 9) at 1 mm
    code = entry.main(["-predict", str(folder), "-train_from_checkpoint", str(checkpoint),
                       "-predictions_dir", str(tmp_path / "out")])
    assert code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["coarse_voxels.nii.gz", "hippocampus_crop.nii.gz",
                                                    "whole_head.nii.gz"]
    assert nib.load(tmp_path / "out" / "whole_head.nii.gz").shape == (long_side, 17, 9)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    training = " x ".join(f"{side:.0f}" for side in extent)
    assert len(warnings) == 2
    assert f"whole_head.nii.gz covers {long_side} x 17 x 9 mm" in warnings[1]
    assert "coarse_voxels.nii.gz covers 55 x 85 x 45 mm" in warnings[0]
    assert all(f"the {training} mm of the training volumes" in w and "crop the scan to the hippocampus "
               "region first" in w for w in warnings)
    assert not any("hippocampus_crop" in w for w in warnings)


def test_the_extent_follows_the_canonical_axes_of_the_training_shape(tmp_path):
    from utils.inference.prediction import extent_mm, field_of_view_warning, read_volume
    scan(tmp_path / "odd.nii.gz", affine=ODD_AFFINE)           # voxel axes (11, 17, 9) run along y, x, z
    image = read_volume(tmp_path / "odd.nii.gz", in_channels=1)
    assert extent_mm(image) == pytest.approx((17 * 1.2, 11 * 0.9, 9 * 1.5))
    # Taken in the file's own voxel order, (9.9, 20.4, 13.5) mm, the two verdicts would swap.
    assert field_of_view_warning(tmp_path / "odd.nii.gz", image, (12.0, 6.0, 8.0)) is None
    warning = field_of_view_warning(tmp_path / "odd.nii.gz", image, (6.0, 12.0, 8.0))
    assert warning and "covers 20 x 10 x 14 mm" in warning and "the 6 x 12 x 8 mm" in warning


def test_a_model_trained_on_thick_slices_does_not_warn_about_scans_like_its_own(tmp_path, capsys):
    task = write_task(tmp_path / "data", n_cases=6, affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY, "-epochs", "1",
                       "-train_val_ratio", "0.67"]) == 0
    depths = [nib.load(path).shape[2] for path in sorted((task / "imagesTr").iterdir())]
    assert load_checkpoint(run / "best.pt")["training_extent_mm"][2] == pytest.approx(5.0 * max(depths))
    capsys.readouterr()
    scan(tmp_path / "like_training.nii.gz", shape=(11, 13, 10), affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    assert entry.main(["-predict", str(tmp_path / "like_training.nii.gz"), "-train_from_checkpoint",
                       str(run / "best.pt"), "-predictions_dir", str(tmp_path / "out")]) == 0
    assert "warning:" not in capsys.readouterr().out
