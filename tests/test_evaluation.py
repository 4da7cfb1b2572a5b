"""Metrics against hand-built volumes whose Dice and distances are known, and -evaluate's single
inference on a checkpoint trained on tiny synthetic data."""
import contextlib
import csv
import math
import warnings

import pytest
import torch
from monai.metrics import HausdorffDistanceMetric
from monai.networks.utils import one_hot

import main as entry
import utils.inference.evaluation
from conftest import TINY, write_task
from utils.training.checkpoint import load_checkpoint
from utils.data.cache import load_cases
from utils.inference.evaluation import CaseMetrics, autocast_for, evaluate, keep_largest_component, predict_logits, summarise
from utils.data.layouts import read_task
from utils.data.preprocessing import Preprocessing, label_map
from utils.training.networks import build_model, downsampling_factor

NAMES = ["Anterior", "Posterior"]


def empty(shape=(20, 20, 20)):
    return torch.zeros(1, *shape, dtype=torch.uint8)


def test_dice_of_a_cube_missing_one_slab():
    truth, prediction = empty(), empty()
    truth[0, 10:14, 10:14, 10:14] = 2          # 64 voxels
    prediction[0, 10:13, 10:14, 10:14] = 2     # 48 of them
    row = CaseMetrics(NAMES)(prediction, truth, (1, 1, 1))
    assert row["dice_Posterior"] == pytest.approx(2 * 48 / (64 + 48))
    assert row["hd95_Posterior"] == pytest.approx(1.0)
    assert math.isnan(row["dice_Anterior"])    # absent from both: no value, not a perfect score


def test_distances_are_in_mm_from_the_spacing():
    truth, prediction = empty(), empty()
    truth[0, 5, 5, 5] = 1
    prediction[0, 8, 5, 5] = 1                 # 3 voxels away along the first axis
    row = CaseMetrics(NAMES)(prediction, truth, (2.0, 1.0, 1.0))
    assert row["dice_Anterior"] == 0
    assert row["hd95_Anterior"] == pytest.approx(6.0) and row["asd_Anterior"] == pytest.approx(6.0)
    row = CaseMetrics(NAMES)(prediction, truth, (1.0, 1.0, 1.0))
    assert row["hd95_Anterior"] == pytest.approx(3.0)


def test_perfect_prediction():
    truth = empty()
    truth[0, 2:6, 2:6, 2:6], truth[0, 10:15, 10:15, 10:15] = 1, 2
    row = CaseMetrics(NAMES)(truth.clone(), truth, (1, 1, 1))
    assert row == {"dice_Anterior": 1.0, "dice_Posterior": 1.0, "hd95_Anterior": 0.0,
                   "hd95_Posterior": 0.0, "asd_Anterior": 0.0, "asd_Posterior": 0.0}


def test_largest_component_removes_a_planted_island():
    truth = empty()
    truth[0, 2:6, 2:6, 2:6], truth[0, 10:15, 10:15, 10:15] = 1, 2
    prediction = truth.clone()
    prediction[0, 18, 18, 18] = 2               # an island of the posterior class
    prediction[0, 18, 2, 18] = 1                # and of the anterior class
    measure = CaseMetrics(NAMES)
    raw = measure(prediction, truth, (1, 1, 1))
    assert raw["dice_Posterior"] < 1 and raw["asd_Posterior"] > 0
    kept = prediction.clone()
    cleaned = keep_largest_component(prediction, num_classes=3)
    assert cleaned.dtype == torch.uint8 and type(cleaned) is torch.Tensor
    assert torch.equal(cleaned, truth)
    assert torch.equal(prediction, kept)        # the raw prediction is left as it was
    assert measure(cleaned, truth, (1, 1, 1))["dice_Posterior"] == 1.0


def test_summary_is_mean_and_std_over_the_cases_where_it_is_defined():
    rows = [{"dice_A": 0.5, "asd_A": 2.0}, {"dice_A": 1.0, "asd_A": float("inf")}, {"dice_A": float("nan"), "asd_A": 4.0}]
    summary = summarise(rows, ["dice_A", "asd_A"])
    assert summary["dice_A"] == pytest.approx((0.75, 0.25, 2))
    assert summary["asd_A"] == pytest.approx((3.0, 1.0, 2))      # an empty prediction's inf left out, counted


def test_label_map_is_the_class_of_highest_score():
    scores = torch.randn(3, 6, 7, 5)
    scores[:, 0, 0, 0] = torch.tensor([1.0, 1.0, 0.0])   # a tie goes to the first class, as argmax
    labels = label_map(scores)
    assert labels.shape == (1, 6, 7, 5) and labels.dtype == torch.uint8
    assert torch.equal(labels, scores.argmax(0, keepdim=True).to(torch.uint8))
    assert labels[0, 0, 0, 0] == 0


@pytest.mark.parametrize("shape", [(6, 8, 6), (14, 8, 6)])   # one pass; sliding windows (> 2x the roi)
def test_mirrored_prediction_is_left_right_equivariant(shape):
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, 3, padding=1)               # not symmetric: its kernel is random
    images = torch.randn(2, 1, *shape)
    no_autocast = lambda: contextlib.nullcontext()
    predict = lambda x, mirror: torch.cat([predict_logits(model, one[None], torch.device("cpu"), no_autocast,
                                                          roi_size=(6, 8, 6), mirror=mirror) for one in x])
    plain, mirrored_scores = predict(images, False), predict(images, True)
    assert mirrored_scores.shape == plain.shape == (2, 3, *shape)
    assert not torch.allclose(mirrored_scores, plain)
    # The mirror image of a scan gets the mirror image of its prediction, and vice versa.
    assert torch.allclose(predict(images.flip(2), True), mirrored_scores.flip(2), atol=1e-5)
    assert not torch.allclose(predict(images.flip(2), False), plain.flip(2), atol=1e-3)


@pytest.mark.parametrize("shape, slides", [((8, 8, 6), False), ((12, 8, 6), False), ((14, 8, 6), True)])
def test_sliding_windows_only_beyond_twice_the_patch(shape, slides, monkeypatch):
    import utils.inference.evaluation as evaluation
    calls, real = [], evaluation.sliding_window_inference
    monkeypatch.setattr(evaluation, "sliding_window_inference", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    scores = predict_logits(torch.nn.Conv3d(1, 3, 3, padding=1), torch.randn(1, 1, *shape), torch.device("cpu"),
                            contextlib.nullcontext, roi_size=(6, 8, 6))
    assert scores.shape == (1, 3, *shape) and calls == ([(6, 8, 6)] if slides else [])


# ------------------------------------------------------------------ warnings of the distance metrics

def two_cubes():
    truth = empty()
    truth[0, 2:6, 2:6, 2:6], truth[0, 10:15, 10:15, 10:15] = 1, 2
    return truth


def silenced(caught) -> list[str]:
    return [str(w.message) for w in caught
            if "is all 0, this may result in nan/inf distance" in str(w.message)
            or "always_return_as_numpy" in str(w.message)]


def test_monai_warns_about_an_empty_prediction_when_asked_directly():
    """The warnings that CaseMetrics silences do come from MONAI (so the next test means something)."""
    truth = two_cubes()
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hd95(one_hot(empty()[None].long(), 3), one_hot(truth[None].long(), 3), spacing=[1, 1, 1])
    assert any("the prediction of class" in message for message in silenced(caught))


@pytest.mark.parametrize("which", ["prediction", "truth"])
def test_an_empty_prediction_or_truth_is_scored_without_warnings(which):
    prediction, truth = (empty(), two_cubes()) if which == "prediction" else (two_cubes(), empty())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = CaseMetrics(NAMES)(prediction, truth, (1, 1, 1))
    assert silenced(caught) == []
    assert math.isnan(row["hd95_Anterior"]) and math.isinf(row["asd_Posterior"])   # the result, as before
    # Silenced around the metrics only, not for the whole process.
    filters = list(warnings.filters)
    CaseMetrics(NAMES)(prediction, truth, (1, 1, 1))
    assert warnings.filters == filters


def test_other_warnings_from_the_metrics_still_show():
    measure = CaseMetrics(NAMES)
    real_hd95 = measure.metrics["hd95"]

    def hd95_that_also_warns(*args, **kwargs):
        warnings.warn("something else went wrong", UserWarning)
        warnings.warn("another argument is deprecated", FutureWarning)
        return real_hd95(*args, **kwargs)

    measure.metrics["hd95"] = hd95_that_also_warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure(empty(), two_cubes(), (1, 1, 1))
    shown = [(w.category, str(w.message)) for w in caught]
    assert (UserWarning, "something else went wrong") in shown
    assert (FutureWarning, "another argument is deprecated") in shown
    assert silenced(caught) == []


# ------------------------------------------------------------------ -evaluate

def test_evaluate_predicts_each_case_once_and_scores_it_raw_and_postprocessed(tmp_path, monkeypatch):
    task = write_task(tmp_path / "data", n_cases=8)
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY,
                       "-epochs", "4", "-Nit", "4", "-lr", "0.05"]) == 0
    state = load_checkpoint(run / "best.pt")
    val_ids = state["split"]["val"]

    calls, forwards = [], []
    real_predict_logits = utils.inference.evaluation.predict_logits

    def counted_with_an_island(model, image, *args, **kwargs):
        """predict_logits, counting its calls and the network's forward passes, with a one-voxel
        island of the posterior class planted, away from everything else, for post-processing
        to remove."""
        hook = model.register_forward_hook(lambda *_: forwards.append(1))
        try:
            scores = real_predict_logits(model, image, *args, **kwargs)
        finally:
            hook.remove()
        calls.append(tuple(image.shape))
        scores[0, :, 1:4, 1:4, 1:4] = torch.tensor([10.0, 0.0, 0.0])[:, None, None, None]
        scores[0, 2, 2, 2, 2] = 20.0
        return scores

    monkeypatch.setattr("utils.inference.evaluation.predict_logits", counted_with_an_island)
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(run / "best.pt"),
                       "-data_dir", str(task), "-device", "cpu"]) == 0
    assert len(calls) == len(val_ids) and len(forwards) == len(val_ids)    # one inference per case
    written = list(csv.DictReader(open(run / "evaluation_val.csv")))

    # What evaluating raw and then post-processed separately gives, from the same predictions.
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    cases, _ = load_cases(read_task(task), downsampling_factor(state["model_config"]), progress=False,
                          preprocessing=Preprocessing.from_dict(state["preprocessing"]))
    cases = cases.subset(val_ids)
    raw = evaluate(model, cases, torch.device("cpu"), autocast_for(torch.device("cpu"), True),
                   NAMES, distances=True, mirror=True)
    measure = CaseMetrics(NAMES)
    postprocessed = [{"case": case, **measure(keep_largest_component(prediction, 3), truth, spacing)}
                     for case, prediction, truth, spacing
                     in zip(raw["prediction_ids"], raw["predictions"], cases.native_labels, cases.spacings)]
    as_written = lambda rows, flag: [{"postprocessed": str(flag), **{k: str(v) for k, v in row.items()}}
                                     for row in rows]
    assert written == as_written(raw["rows"], False) + as_written(postprocessed, True)
    assert any(a != b for a, b in zip(raw["rows"], postprocessed))       # post-processing did something
