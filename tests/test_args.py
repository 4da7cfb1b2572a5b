import dataclasses
import json
from pathlib import Path

import pytest

from utils.args import (Config, build_parser, config_from_dict, declared, for_device, layered, options, options_table,
                        parse_args, refuse_mode_combinations, refuse_options_that_do_not_apply, str2bool)
from utils.errors import UserError


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_documented_ones():
    c = parse_args([])
    assert (c.task, c.google_id, c.train_val_ratio, c.epochs, c.lr, c.momentum, c.weight_decay) == (
        "Task04_Hippocampus", "1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C", 0.8, 100, 0.01, 0.99, 3e-5)
    assert c.early_stopping is None and c.train_from_checkpoint is None and c.Nit is None
    assert (c.fine_tune, c.best_models_dir, c.mixed_precision, c.random_seed) == (False, "best_models", True, 42)
    assert (c.data_dir, c.device, c.num_workers, c.resume) == ("data", "auto", 0, False)
    # Chosen by the 10-minute experiments of benchmarks/README.md:
    assert (c.channels, c.num_res_units, c.patch_size, c.tta) == ([16, 32, 64, 128], 1, [40, 56, 40], True)
    assert c.channels_last
    assert (c.architecture, c.deep_supervision, c.loss, c.class_weights) == ("unet", True, "dicece", None)


@pytest.mark.parametrize("word, expected", [("True", True), ("false", False), ("YES", True), ("no", False),
                                            ("1", True), ("0", False)])
def test_boolean_words(word, expected):
    assert parse_args(["-mixed_precision", word]).mixed_precision is expected
    assert parse_args(["-fine_tune", word]).fine_tune is expected


def test_bare_boolean_flag_means_true():
    assert parse_args(["-resume"]).resume is True


def test_unknown_boolean_word(capsys):
    assert "'maybe' is not a boolean" in usage_error(["-fine_tune", "maybe"], capsys)


def test_batch_size_depends_on_the_device_unless_given():
    assert parse_args([]).batch_size is None                          # filled in once the device is known
    assert for_device(parse_args([]), "cuda").batch_size == 16
    assert for_device(parse_args([]), "cpu").batch_size == 2
    assert for_device(parse_args(["-batch_size", "5"]), "cuda").batch_size == 5
    assert for_device(parse_args(["-batch_size", "5"]), "cpu").batch_size == 5
    assert "(default: 16 on a GPU, 2 on a CPU" in " ".join(build_parser().format_help().split())


@pytest.mark.parametrize("argv, message", [
    (["-Nit", "0"], "0 is too small"),
    (["-batch_size", "0"], "0 is too small"),
    (["-epochs", "0"], "0 is too small"),
    (["-train_val_ratio", "1.5"], "outside (0, 1)"),
    (["-train_val_ratio", "0"], "outside (0, 1)"),
    (["-lr", "-1"], "greater than 0"),
    (["-lr", "0"], "greater than 0"),
    (["-batch_size", "two"], "'two' is not a whole number"),
    (["-device", "tpu"], "invalid choice"),
    (["-channels", "8"], "at least 2 levels"),
    (["-momentum", "0"], "outside (0, 1)"),
    (["-momentum", "1"], "outside (0, 1)"),
    (["-weight_decay", "-0.1"], "0 or more"),
    (["-weight_decay", "nan"], "0 or more"),
    (["-random_seed", "-1"], "outside 0 to 2**32 - 1"),
    (["-max_minutes", "inf"], "finite"),
    (["-label_names", "background"], "at least 2 names"),
    (["-label_names", "background", "a", "a"], "names a class twice"),
])
def test_bad_values_get_a_sentence(argv, message, capsys):
    error = usage_error(argv, capsys)
    assert argv[0] in error and message in error


def test_missing_checkpoint_file(tmp_path, capsys):
    assert "no file at" in usage_error(["-train_from_checkpoint", str(tmp_path / "nope.pt")], capsys)


def test_none_words():
    c = parse_args(["-Nit", "None", "-early_stopping", "none", "-train_from_checkpoint", "None",
                    "-label_names", "None"])
    assert c.Nit is None and c.early_stopping is None and c.train_from_checkpoint is None
    assert c.label_names is None


def test_label_names_are_a_list():
    assert parse_args(["-label_names", "background", "anterior", "posterior"]).label_names == [
        "background", "anterior", "posterior"]
    assert config_from_dict({"label_names": ["bg", "fg"]}).label_names == ["bg", "fg"]
    assert config_from_dict({"label_names": None}).label_names is None


def test_every_option_has_help_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for field in declared():
        assert field.metadata["help"] and f"-{field.name}" in text, field.name
    assert "(default: 0.01)" in text and "-patch_size PATCH_SIZE PATCH_SIZE PATCH_SIZE" in text   # -lr


def test_config_from_dict_goes_through_the_same_checks():
    c = config_from_dict({"batch_size": 4, "Nit": 3, "mixed_precision": False, "channels": [4, 8]})
    assert (c.batch_size, c.Nit, c.mixed_precision, c.channels, c.epochs) == (4, 3, False, [4, 8], 100)
    with pytest.raises(UserError, match="unknown option"):
        config_from_dict({"batchsize": 4})
    with pytest.raises(UserError, match="-Nit 0: 0 is too small"):
        config_from_dict({"Nit": 0})
    with pytest.raises(UserError, match="-Nit 2.5: '2.5' is not a whole number"):
        config_from_dict({"Nit": 2.5})
    with pytest.raises(UserError, match="invalid choice 'vnet'"):
        config_from_dict({"architecture": "vnet"})
    with pytest.raises(UserError, match="at least 2 levels"):
        config_from_dict({"channels": [8]})


def test_class_weights_are_none_auto_or_one_number_per_class(capsys):
    assert parse_args(["-class_weights", "none"]).class_weights is None
    assert parse_args(["-class_weights", "AUTO"]).class_weights == "auto"
    assert parse_args(["-class_weights", "0.2", "1.4", "1.4"]).class_weights == [0.2, 1.4, 1.4]
    assert config_from_dict({"class_weights": [0.2, 1.4]}).class_weights == [0.2, 1.4]
    assert config_from_dict({"class_weights": "auto"}).class_weights == "auto"
    assert "not ['auto', 1.0]" in usage_error(["-class_weights", "auto", "1"], capsys)
    assert "0.0 must be a finite number greater than 0" in usage_error(["-class_weights", "1", "0"], capsys)


def test_the_typed_options_are_worked_out_once_and_kept():
    config = parse_args(["-epochs", "5", "-resume"])
    assert config.typed == {"epochs": 5, "resume": True}
    # Words mean the same typed on top of a resumed run as in a new one.
    config = parse_args(["-label_names", "None", "-class_weights", "auto"])
    assert config.typed == {"label_names": None, "class_weights": "auto"}
    assert (config.label_names, config.class_weights) == (None, "auto")


def test_layering_is_defaults_then_saved_values_then_typed_ones():
    saved = {**parse_args([]).to_dict(), "lr": 0.5, "epochs": 7, "architecture": "dynunet", "channels": [8, 16],
             "removed_option": 1}
    config = layered({"epochs": 3}, saved)
    assert (config.lr, config.epochs, config.architecture, config.channels) == (0.5, 3, "dynunet", [8, 16])
    assert config.typed == {"epochs": 3}
    assert layered({"architecture": "swinunetr"}).channels == [24, 48, 96, 192, 384]   # its own default width
    assert layered({"max_minutes": 5}, saved).epochs == 7                                # the saved run's


def test_a_config_file_is_layered_under_the_typed_options(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {**parse_args(["-lr", "0.02", "-Nit", "7"]).to_dict(), "config": "x"}}))
    config = parse_args(["-config", str(path), "-Nit", "3"])
    assert (config.lr, config.Nit, config.config) == (0.02, 3, str(path))      # the file it came from
    path.write_text(json.dumps({"config": {**parse_args(["-resume", "-lr", "0.03"]).to_dict()}}))
    config = parse_args(["-config", str(path)])                    # a resumed run's config.json repeats as a new run
    assert (config.lr, config.resume) == (0.03, False)


def test_option_lists_come_from_the_declarations():
    assert options(network=True) == ["patch_size", "architecture", "channels", "num_res_units", "deep_supervision"]
    assert set(options(mode=True)) == {"resume", "evaluate", "predict", "lr_find", "sweep"}
    assert set(options(sweepable=False)) >= {"sweep", "best_models_dir", "resume", "config"}
    assert "lr" in options(sweepable=True) and "device" in options(machine=True)
    assert [f.name for f in dataclasses.fields(Config)] == [*options(), "typed"]


@pytest.mark.parametrize("argv, message", [
    (["-trials", "3"], "-trials applies to -sweep a space.json only"),
    (["-ema_decay", "0.9"], "-ema_decay applies to -mean_teacher True only"),
    (["-mean_teacher", "-pseudo_label_threshold", "0.5"], "applies to -consistency_loss pseudo_label only"),
    (["-num_res_units", "2", "-architecture", "dynunet"], "-num_res_units applies to -architecture unet only"),
    (["-deep_supervision", "False"], "-deep_supervision applies to -architecture dynunet only"),
    (["-loss", "dice", "-class_weights", "auto"], "-loss dice has neither"),
])
def test_options_of_a_setting_the_run_does_not_have_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        refuse_options_that_do_not_apply(parse_args(argv))


def test_before_anything_is_read_only_settled_options_are_checked():
    with pytest.raises(UserError, match="-trials applies to -sweep"):
        refuse_mode_combinations(parse_args(["-trials", "3"]))
    # The network comes from the checkpoint, and -resume's settings from its run: checked later.
    refuse_mode_combinations(parse_args(["-deep_supervision", "False", "-train_from_checkpoint", "None"]))
    refuse_mode_combinations(parse_args(["-ema_decay", "0.9", "-resume"]))


def test_a_time_limit_alone_lets_the_clock_end_the_run():
    assert parse_args(["-max_minutes", "10"]).epochs == 100_000
    assert parse_args(["-max_minutes", "10", "-epochs", "30"]).epochs == 30
    assert parse_args([]).epochs == 100


# One bad value for every option that takes a number or a path: a new option must be added here.
BAD_VALUES = {
    "-train_val_ratio": "1", "-num_workers": "-1", "-batch_size": "0", "-epochs": "-3", "-Nit": "0",
    "-lr": "nan", "-momentum": "1.5", "-weight_decay": "-1e-5", "-early_stopping": "0",
    "-max_minutes": "-5", "-random_seed": "4294967296", "-split_seed": "-1", "-patch_size": "0", "-channels": "-16",
    "-num_res_units": "-1", "-train_from_checkpoint": "/no/such/file.pt", "-config": "/no/such/config.json",
    "-device": "gpu", "-evaluate_split": "test", "-label_names": "background", "-foreground_crops": "1.5",
    "-architecture": "vnet", "-loss": "mse", "-class_weights": "heavy", "-sweep": "/no/such/space.json",
    "-trials": "0", "-labelled_fraction": "0", "-consistency_weight": "-1", "-consistency_rampup": "2",
    "-ema_decay": "1", "-consistency_loss": "kl", "-pseudo_label_threshold": "1.5",
}
FREE_TEXT = {"-task", "-google_id", "-data_dir", "-best_models_dir", "-predict", "-predictions_dir", "-cache_dir",
             "-sweep_storage", "-unlabelled_dir"}


def test_every_option_that_takes_a_value_refuses_a_bad_one(capsys):
    valued = {f"-{field.name}" for field in declared() if field.metadata["type"] is not str2bool}
    assert valued - FREE_TEXT == set(BAD_VALUES), "give each new option a bad value in BAD_VALUES"
    for option, value in BAD_VALUES.items():
        argv = [option, value] + (["8", "8"] if option == "-patch_size" else [])
        with_others = argv + (["16"] if option == "-channels" else [])
        error = usage_error(with_others, capsys)
        assert option in error and "error:" in error, option


def test_the_options_page_is_made_from_the_declarations():
    page = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    assert options_table() in page, ("docs/options.md's table is out of date: replace it with the output of "
                                     "python -c 'from utils.args import options_table; print(options_table())'")
    assert all(f"| -{name} |" in options_table() for name in options())
