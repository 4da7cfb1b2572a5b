"""The losses: MONAI's Dice + cross-entropy with class weights on the cross-entropy only, the
automatic class weights, and deep supervision with nnU-Net's weights."""
import json

import monai
import pytest
import torch
from monai.losses import DiceCELoss

import main as entry
from test_networks import NETWORKS, train
from utils.training.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.training.losses import (DeepSupervisionLoss, choose_class_weights, class_frequencies, deep_supervision_weights,
                                   segmentation_loss, weights_from_frequencies)


def test_deep_supervision_weights_are_nnunets():
    # nnU-Net weights its 4 decoder outputs 1, 1/2, 1/4 and (the lowest) 0, normalised to sum 1
    nnunet = torch.tensor([1, 0.5, 0.25, 0])
    assert deep_supervision_weights(3) == pytest.approx((nnunet / nnunet.sum())[:3].tolist())
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_loss_is_monais_weighs_each_output_and_is_plain_on_one():
    base = segmentation_loss("dicece")
    outputs, labels = torch.randn(2, 3, 3, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = DeepSupervisionLoss(base, [0.5, 0.3, 0.2])
    assert isinstance(loss, monai.losses.DeepSupervisionLoss)
    expected = sum(w * base(outputs[:, i], labels) for i, w in enumerate([0.5, 0.3, 0.2]))
    assert torch.equal(loss(outputs, labels), expected)      # bit for bit the hand-written sum it replaced
    assert torch.equal(loss(outputs[:, 0], labels), base(outputs[:, 0], labels))


def test_deep_supervision_loss_computes_in_fp32_and_passes_gradients_to_every_output():
    base = segmentation_loss("dicece")
    outputs = torch.randn(2, 3, 3, 8, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = DeepSupervisionLoss(base, deep_supervision_weights(3))
    half = loss(outputs.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert torch.equal(half, loss(outputs.bfloat16().float(), labels))
    loss(outputs, labels).backward()
    assert all(outputs.grad[:, i].abs().sum() > 0 for i in range(3))


def test_class_weights_auto_rule_on_a_known_histogram():
    labels = [torch.tensor([0] * 60 + [1] * 5), torch.tensor([0] * 30 + [1] * 4 + [2] * 1).view(1, 5, 7)]
    frequencies = class_frequencies(labels, 3)
    assert frequencies == pytest.approx([0.9, 0.09, 0.01])
    raw = [(1 / 0.9) ** 0.5, (1 / 0.09) ** 0.5, 10.0]
    assert weights_from_frequencies(frequencies) == pytest.approx([3 * w / sum(raw) for w in raw])
    assert sum(weights_from_frequencies(frequencies)) == pytest.approx(3)


def test_dicece_is_monais_and_class_weights_reach_only_the_cross_entropy():
    logits, labels = torch.randn(2, 3, 6, 6, 6), torch.randint(0, 3, (2, 1, 6, 6, 6))
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    assert segmentation_loss("dicece")(logits, labels).item() == pytest.approx(monai.item(), rel=1e-5)
    assert segmentation_loss("dicece", [1.0, 1.0, 1.0])(logits, labels).item() == pytest.approx(monai.item(), rel=1e-5)
    weights = [0.2, 1.4, 1.4]
    dice = segmentation_loss("dice")(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0], weight=torch.tensor(weights))
    assert segmentation_loss("dicece", weights)(logits, labels).item() == pytest.approx((dice + ce).item(), rel=1e-5)
    assert segmentation_loss("ce", weights)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-5)
    for name in ("dice", "dicefocal"):
        assert torch.isfinite(segmentation_loss(name, weights)(logits, labels))


def test_class_weights_auto_are_printed_saved_and_kept_by_resume(task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(task_dir, run, *NETWORKS["unet"], "-class_weights", "auto") == 0
    assert "Class weights (auto, (1/f)^0.5" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    frequencies, weights = saved["class_frequencies"], saved["class_weights"]
    assert sum(frequencies) == pytest.approx(1) and frequencies[0] > 0.5
    assert weights == pytest.approx(weights_from_frequencies(frequencies)) and weights[0] < 1 < weights[1]
    assert saved["config"]["class_weights"] == "auto"
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["class_weights"] == weights and state["class_frequencies"] == frequencies
    assert "Class weights" not in capsys.readouterr().out      # read back, not computed again


def test_choose_class_weights_refuses_a_missing_class_and_a_wrong_count():
    names = {0: "background", 1: "left", 2: "right"}
    labels = [torch.tensor([0, 0, 1, 1])]                       # no voxel of "right"
    with pytest.raises(UserError, match="training cases have no voxel of right"):
        choose_class_weights("auto", names, labels, say=lambda *a: None)
    with pytest.raises(UserError, match=r"gives 2 weights, but the data has 3 classes \(background, left, right\)"):
        choose_class_weights([1.0, 2.0], names, labels)
    assert choose_class_weights(None, names, labels) == {"class_weights": None, "class_frequencies": None}
    assert choose_class_weights([1, 2, 3], names, labels)["class_weights"] == [1, 2, 3]
