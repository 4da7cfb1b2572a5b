"""Metrics against hand-built volumes whose Dice and distances are known."""
import contextlib
import math

import pytest
import torch

from utils.evaluation import CaseMetrics, keep_largest_component, label_map, predict_logits, summarise

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
    cleaned = keep_largest_component(prediction, num_classes=3)
    assert cleaned.dtype == torch.uint8 and type(cleaned) is torch.Tensor
    assert torch.equal(cleaned, truth)
    assert measure(cleaned, truth, (1, 1, 1))["dice_Posterior"] == 1.0


def test_summary_is_mean_and_std_ignoring_nan():
    rows = [{"dice_A": 0.5}, {"dice_A": 1.0}, {"dice_A": float("nan")}]
    mean, std = summarise(rows, ["dice_A"])["dice_A"]
    assert mean == pytest.approx(0.75) and std == pytest.approx(0.25)


def test_label_map_is_the_class_of_highest_score():
    scores = torch.randn(3, 6, 7, 5)
    scores[:, 0, 0, 0] = torch.tensor([1.0, 1.0, 0.0])   # a tie goes to the first class, as argmax
    labels = label_map(scores)
    assert labels.shape == (1, 6, 7, 5) and labels.dtype == torch.uint8
    assert torch.equal(labels, scores.argmax(0, keepdim=True).to(torch.uint8))
    assert labels[0, 0, 0, 0] == 0


@pytest.mark.parametrize("shape", [(6, 8, 6), (10, 8, 6)])   # one pass; sliding windows (wider than roi)
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
