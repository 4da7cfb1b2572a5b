"""The networks of -architecture, their planning and fine-tuning layer, the losses and class weights."""
import json
import re

import monai
import nibabel as nib
import pytest
import torch
from monai.losses import DiceCELoss

import main as entry
from utils.training.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.args import parse_args
from utils.training.losses import (DeepSupervisionLoss, choose_class_weights, class_frequencies, deep_supervision_weights, segmentation_loss,
                          weights_from_frequencies)
from utils.training.networks import (ARCHITECTURES, DEFAULT_CHANNELS, build_model, check_network_options, downsampling_factor, input_multiples,
                         last_layer, model_config, plan_dynunet)

# TINY (conftest) without its network options, which each network below gives its own; and one
# epoch of one step, one validation case, no mirroring, for SwinUNETR's sake (seconds a step on a CPU).
RUN = ["-batch_size", "2", "-Nit", "1", "-epochs", "1", "-lr", "0.01", "-device", "cpu", "-tta", "False",
       "-train_val_ratio", "0.875"]
# Small widths. The synthetic volumes of about 12x14x12 voxels are padded to multiples of the
# network's divisor: 2 (unet, segresnet), 8 (dynunet: 16^3), 16 (unetr: 16^3 crops, which it pads
# to its 32^3 input) and 32 (swinunetr: 32^3 crops, padded to its 64x32x32 input).
NETWORKS = {
    "unet": ["-channels", "4", "8", "-num_res_units", "0"],
    "dynunet": ["-architecture", "dynunet", "-channels", "4", "8", "-patch_size", "32", "32", "32"],
    "segresnet": ["-architecture", "segresnet", "-channels", "8", "16"],
    "unetr": ["-architecture", "unetr", "-channels", "4", "8", "-patch_size", "32", "32", "32"],
    "swinunetr": ["-architecture", "swinunetr", "-channels", "12", "24", "-patch_size", "64", "32", "32"],
}


def train(task_dir, run_dir, *options) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *RUN, *options])


def last_layer_keys(config: dict) -> set[str]:
    model = build_model(config)
    return {f"{name}.{p}" for name, module in model.named_modules() if module is last_layer(model)
            for p, _ in module.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_network_trains_resumes_fine_tunes_evaluates_and_predicts(name, task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(task_dir, run, *NETWORKS[name]) == 0
    assert f"Model: MONAI {ARCHITECTURES[name]}, " in capsys.readouterr().out
    best = load_checkpoint(run / "best.pt")
    assert best["model_config"]["architecture"] == name
    divisor = downsampling_factor(best["model_config"])        # the volumes are padded to it
    assert all(side % divisor == 0 for side in best["preprocessing"]["target_shape"])
    assert json.loads((run / "config.json").read_text())["model_config"] == best["model_config"]

    # -resume continues the run with no network options
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2

    # -fine_tune from the checkpoint, again with no network options: one step changes only the
    # layer that makes the class scores
    tuned, start = tmp_path / "tuned", load_checkpoint(run / "best.pt")
    assert train(task_dir, tuned, "-fine_tune", "True", "-train_from_checkpoint", str(run / "best.pt")) == 0
    after = load_checkpoint(tuned / "last.pt")
    assert after["model_config"] == start["model_config"]
    changed = {k for k in start["model"] if not torch.equal(start["model"][k], after["model"][k])}
    assert changed == last_layer_keys(start["model_config"]) and changed

    # -evaluate and -predict rebuild it from the checkpoint alone
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(run / "best.pt"), "-tta", "False"]) == 0
    assert (run / "evaluation_val.csv").is_file()
    scan = sorted((task_dir / "imagesTr").iterdir())[0]
    out = tmp_path / "predicted"
    assert entry.main(["-predict", str(scan), "-train_from_checkpoint", str(run / "best.pt"),
                       "-predictions_dir", str(out), "-tta", "False"]) == 0
    assert nib.load(out / scan.name).shape == nib.load(scan).shape


def test_the_dynunet_trains_with_deep_supervision_by_default(task_dir, tmp_path, capsys):
    assert train(task_dir, tmp_path / "run", *NETWORKS["dynunet"]) == 0
    out = capsys.readouterr().out
    assert "has 4 levels and -channels gives 2, so its filters are [4, 8, 16, 32]" in out
    assert "deep supervision on 2 outputs" in out
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["deep_supervision_heads"] == 1
    assert train(task_dir, tmp_path / "plain", *NETWORKS["dynunet"], "-deep_supervision", "False") == 0
    assert "deep supervision off" in capsys.readouterr().out
    # -config repeats the run, network included
    assert entry.main(["-config", str(tmp_path / "run" / "config.json"), "-best_models_dir", str(tmp_path / "again")]) == 0
    assert (load_checkpoint(tmp_path / "again" / "best.pt")["model_config"]
            == load_checkpoint(tmp_path / "run" / "best.pt")["model_config"])


# ---------------------------------------------------------------- planning and input sides


def test_dynunet_plan_for_task04_is_nnunets():
    kernels, strides = plan_dynunet([40, 56, 40], [1.0, 1.0, 1.0])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]        # down to 5x7x5
    assert kernels == [[3, 3, 3]] * 4


def test_dynunet_plan_for_thick_slices_halves_them_later_and_smooths_them_later():
    kernels, strides = plan_dynunet([160, 160, 20], [0.8, 0.8, 3.0])
    # 3 mm is 3.75x the in-plane 0.8 mm: only in-plane halving, and kernel 1 across slices, until
    # the in-plane spacing (1.6 mm) is within 2x; then all axes, until 20 slices are down to 5.
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1]]
    assert kernels == [[3, 3, 1]] + [[3, 3, 3]] * 5
    assert input_multiples("dynunet", [16], [160, 160, 20]) == [32, 32, 4]


def test_no_axis_is_halved_more_than_five_times():
    _, strides = plan_dynunet([512, 512, 512], [1.0, 1.0, 1.0])
    assert len(strides) == 6 and input_multiples("dynunet", [16], [512, 512, 512]) == [32, 32, 32]


@pytest.mark.parametrize("name, channels, patch, divisor", [
    ("unet", [16, 32, 64, 128], [40, 56, 40], 8), ("segresnet", [16, 32], [40, 56, 40], 2),
    ("dynunet", [16], [40, 56, 40], 8), ("dynunet", [16], [160, 160, 20], 32),
    ("unetr", [16], [64, 64, 64], 16), ("swinunetr", [24], [64, 64, 64], 32)])
def test_downsampling_factor_is_the_largest_input_multiple(name, channels, patch, divisor):
    config = model_config(1, 3, channels, architecture=name, patch_size=patch, spacing=[0.8, 0.8, 3.0])
    assert downsampling_factor(config) == max(input_multiples(name, channels, patch)) == divisor


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, channels, patch, message", [
    ("unetr", [16], [40, 56, 40], "multiples of 16 16 16 (UNETR's ViT cuts it into 16-voxel patches). "
                                  "The nearest that fits: -patch_size 48 64 48"),
    ("swinunetr", [24], [40, 72, 40], "multiples of 32 32 32 (SwinUNETR halves it 5 times). The nearest "
                                      "that fits: -patch_size 32 64 32"),
    ("swinunetr", [24], [32, 32, 32], "a side of -patch_size must be 64 or more"),
    ("dynunet", [16], [44, 56, 40], "multiples of 8 8 8 (the DynUNet may halve a side while it keeps 4 "
                                    "voxels, at most 5 times). The nearest that fits: -patch_size 48 56 40"),
    ("unet", [16, 32, 64, 128], [40, 50, 40], "The nearest that fits: -patch_size 40 48 40"),
    ("dynunet", [16], [12, 12, 12], "a side of -patch_size must have 16 voxels or more"),
    ("swinunetr", [16, 32], [64, 64, 64], "must be a multiple of 12, not 16; pass e.g. -channels 12"),
    ("segresnet", [4, 8], [40, 56, 40], "must be a multiple of 8, not 4; e.g. -channels 8"),
])
def test_a_network_refuses_what_it_cannot_take_with_a_sentence(name, channels, patch, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_network_options(name, channels, patch)


@pytest.mark.parametrize("options, message", [
    (["-architecture", "dynunet", "-num_res_units", "1"], "-num_res_units applies to -architecture unet only"),
    (["-deep_supervision", "True"], "-deep_supervision applies to -architecture dynunet only"),
    (["-class_weights", "1", "2"], "-class_weights gives 2 weights, but the data has 3 classes "
                                   "(background, Anterior, Posterior)"),
    (["-architecture", "unetr", "-patch_size", "40", "56", "40"], "The nearest that fits: -patch_size 48 64 48"),
    (["-loss", "dice", "-class_weights", "auto"], "-loss dice has neither"),
])
def test_options_that_do_not_fit_are_refused(options, message, task_dir, tmp_path, capsys):
    assert train(task_dir, tmp_path / "run", "-channels", "16", "32", *options) == 1
    assert message in capsys.readouterr().err


def test_a_checkpoint_of_another_network_is_named(task_dir, tmp_path, capsys):
    assert train(task_dir, tmp_path / "base", *NETWORKS["unet"]) == 0
    assert train(task_dir, tmp_path / "other", "-architecture", "segresnet", "-channels", "8", "16",
                 "-train_from_checkpoint", str(tmp_path / "base" / "best.pt")) == 1
    assert "holds a unet network, not a segresnet" in capsys.readouterr().err


# ---------------------------------------------------------------- losses and class weights


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


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_network_takes_its_own_default_width(name):
    channels = parse_args(["-architecture", name]).channels
    assert channels == list(DEFAULT_CHANNELS[name])
    check_network_options(name, channels, [64, 64, 64])        # no refusal of a default
    assert parse_args(["-architecture", name, "-channels", "24", "48"]).channels == [24, 48]


def test_choose_class_weights_refuses_a_missing_class_and_a_wrong_count():
    names = {0: "background", 1: "left", 2: "right"}
    labels = [torch.tensor([0, 0, 1, 1])]                       # no voxel of "right"
    with pytest.raises(UserError, match="training cases have no voxel of right"):
        choose_class_weights("auto", names, labels, say=lambda *a: None)
    with pytest.raises(UserError, match=r"gives 2 weights, but the data has 3 classes \(background, left, right\)"):
        choose_class_weights([1.0, 2.0], names, labels)
    assert choose_class_weights(None, names, labels) == {"class_weights": None, "class_frequencies": None}
    assert choose_class_weights([1, 2, 3], names, labels)["class_weights"] == [1, 2, 3]
