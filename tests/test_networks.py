"""The networks of -architecture, their planning, their refusals and their fine-tuning layer."""
import json
import re

import nibabel as nib
import pytest
import torch

import main as entry
from utils.training.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.args import parse_args
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


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_network_takes_its_own_default_width(name):
    channels = parse_args(["-architecture", name]).channels
    assert channels == list(DEFAULT_CHANNELS[name])
    check_network_options(name, channels, [64, 64, 64])        # no refusal of a default
    assert parse_args(["-architecture", name, "-channels", "24", "48"]).channels == [24, 48]
