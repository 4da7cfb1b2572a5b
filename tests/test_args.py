import pytest

from utils.args import build_parser, config_from_dict, explicit_options, parse_args


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_documented_ones():
    c = parse_args([])
    assert (c.task, c.google_id, c.batch_size, c.train_val_ratio, c.epochs, c.lr) == (
        "Task04_Hippocampus", "1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C", 2, 0.8, 100, 0.01)
    assert c.early_stopping is None and c.train_from_checkpoint is None and c.Nit is None
    assert (c.fine_tune, c.best_models_dir, c.mixed_precision, c.random_seed) == (False, "best_models", True, 42)
    assert (c.data_dir, c.device, c.num_workers, c.resume) == ("data", "auto", 0, False)
    # Chosen by the 10-minute experiments of benchmarks/README.md:
    assert (c.channels, c.num_res_units, c.patch_size, c.tta) == ([16, 32, 64, 128], 1, [40, 56, 40], True)
    assert c.channels_last


@pytest.mark.parametrize("word, expected", [("True", True), ("false", False), ("YES", True), ("no", False),
                                            ("1", True), ("0", False)])
def test_boolean_words(word, expected):
    assert parse_args(["-mixed_precision", word]).mixed_precision is expected
    assert parse_args(["-fine_tune", word]).fine_tune is expected


def test_bare_boolean_flag_means_true():
    assert parse_args(["-resume"]).resume is True


def test_unknown_boolean_word(capsys):
    assert "'maybe' is not a boolean" in usage_error(["-fine_tune", "maybe"], capsys)


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
])
def test_bad_values_get_a_sentence(argv, message, capsys):
    error = usage_error(argv, capsys)
    assert argv[0] in error and message in error


def test_missing_checkpoint_file(tmp_path, capsys):
    assert "no file at" in usage_error(["-train_from_checkpoint", str(tmp_path / "nope.pt")], capsys)


def test_none_words():
    c = parse_args(["-Nit", "None", "-early_stopping", "none", "-train_from_checkpoint", "None"])
    assert c.Nit is None and c.early_stopping is None and c.train_from_checkpoint is None


def test_every_option_has_help_with_its_default():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help, action.dest
    assert "(default: 0.01)" in build_parser().format_help()            # -lr


def test_config_from_dict_goes_through_the_same_checks():
    c = config_from_dict({"batch_size": 4, "Nit": 3, "mixed_precision": False, "channels": [4, 8]})
    assert (c.batch_size, c.Nit, c.mixed_precision, c.channels, c.epochs) == (4, 3, False, [4, 8], 100)
    with pytest.raises(ValueError, match="unknown option"):
        config_from_dict({"batchsize": 4})
    with pytest.raises(SystemExit):
        config_from_dict({"Nit": 0})


def test_explicit_options_are_only_the_typed_ones():
    assert explicit_options(["-epochs", "5", "-resume"]) == {"epochs": 5, "resume": True}


def test_a_time_limit_alone_lets_the_clock_end_the_run():
    assert parse_args(["-max_minutes", "10"]).epochs == 100_000
    assert parse_args(["-max_minutes", "10", "-epochs", "30"]).epochs == 30
    assert parse_args([]).epochs == 100
