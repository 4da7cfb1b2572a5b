"""Command-line options. Each one is declared once, as a field of `Config`: its name, type,
default, check, help and group. The parser, the typed `Config` and every "which options are X"
list (the network's, the sweep's, the modes) are derived from those declarations.

Every option is single-dash (``-batch_size 2``) because that is what users already type.
`parse_args` works out once which options were typed and keeps them in `Config.typed`;
`layered` is the one place where defaults, a saved run's values and typed options are combined.
The notebook builds the same `Config` from a dict with `config_from_dict`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from utils.errors import UserError
from utils.training.losses import CLASS_WEIGHT_POWER, LOSSES
from utils.training.networks import ARCHITECTURES, DEFAULT_CHANNELS, check_network_options
from utils.training.semi_supervised import CONSISTENCY_LOSSES

EPOCHS_UNDER_A_TIME_LIMIT = 100_000
TRUE_WORDS = {"true", "yes", "y", "1", "on"}
FALSE_WORDS = {"false", "no", "n", "0", "off"}
# -batch_size when it is not given: a GPU runs a batch of 16 about as fast as a batch of 2, while
# on a 2-core CPU more, smaller steps learn more in 10 minutes (benchmarks/README.md).
BATCH_SIZE_BY_DEVICE = {"cuda": 16, "cpu": 2}


# ---------------------------------------------------------------- value types and checks


def str2bool(text: str | bool) -> bool:
    """'True'/'False' (also yes/no/1/0, any case) -> bool."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean; use True or False (also yes/no/1/0)")


def optional(kind: Callable) -> Callable:
    """Wrap a type so that the word 'None' (or None itself) gives None (e.g. ``-Nit None``)."""
    def parse(text):
        return None if text is None or str(text).strip().lower() == "none" else kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def checked(kind: type, accept: Callable, requirement: str) -> Callable:
    """A type: `kind` (int or float) of a value for which `accept(value)` holds. It takes words
    from the command line and values from a dict (the notebook) alike."""
    noun = "whole number" if kind is int else "number"

    def parse(text):
        try:
            if kind is int and isinstance(text, float) and not text.is_integer():
                raise ValueError
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"'{text}' is not a {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{value} {requirement}")
        return value
    parse.__name__ = noun
    return parse


positive_int = checked(int, lambda v: v >= 1, "is too small; it must be 1 or more")
non_negative_int = checked(int, lambda v: v >= 0, "is negative; it must be 0 or more")
positive_float = checked(float, lambda v: 0 < v < float("inf"), "must be a finite number greater than 0")
non_negative_float = checked(float, lambda v: 0 <= v < float("inf"), "must be a finite number, 0 or more")
open_ratio = checked(float, lambda v: 0 < v < 1, "is outside (0, 1); use e.g. 0.8 for 80% training cases")
momentum_value = checked(float, lambda v: 0 < v < 1, "is outside (0, 1); Nesterov momentum needs more than 0 "
                         "and less than 1 (e.g. 0.99)")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "is outside [0, 1]; give a share such as 0.33")
labelled_share = checked(float, lambda v: 0 < v <= 1, "is outside (0, 1]; give a share such as 0.3")
decay_value = checked(float, lambda v: 0 <= v < 1, "is outside [0, 1); give e.g. 0.99")
seed_value = checked(int, lambda v: 0 <= v < 2 ** 32, "is outside 0 to 2**32 - 1, the seeds NumPy accepts")


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file at '{text}'; check the path")
    return str(text)


def class_weight_word(text: str | float) -> str | float:
    """One word of -class_weights: none, auto or a weight (a finite number greater than 0)."""
    word = str(text).strip().lower()
    if word in ("none", "auto"):
        return word
    try:
        value = float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not none, auto or a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number greater than 0")
    return value


# Checks of a whole list of values (argparse checks each word on its own).


def network_levels(channels: list[int]) -> list[int]:
    if len(channels) < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 levels, got {channels}")
    return channels


def label_name_list(names: list[str]) -> list[str] | None:
    if [str(name).lower() for name in names] == ["none"]:
        return None
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 names, background first and then one per "
                                         f"class, got {names}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"names a class twice: {names}")
    return list(names)


def class_weight_list(words: list) -> list[float] | str | None:
    if not any(isinstance(word, str) for word in words):
        return list(words)
    if len(words) > 1:
        raise argparse.ArgumentTypeError(f"give none, auto, or one number per class, not {words}")
    return None if words[0] == "none" else "auto"


# ---------------------------------------------------------------- the declaration


DATA, TRAINING, MODEL, CHECKPOINTS, USE, SEMI, EXPERIMENTS = (
    "data", "training", "model", "checkpoints", "evaluation and prediction",
    "unlabelled scans (semi-supervised)", "experiments")


def option(default: Any, help: str, group: str, type: Callable = str, nargs: str | int | None = None,
           choices: Sequence[str] | None = None, metavar: str | None = None, whole: Callable | None = None,
           only_with: tuple[str, Any] | None = None, **role: bool) -> Any:
    """One option, declared as a `Config` field. `type` checks each word, `whole` the list of them;
    `only_with` (option, value) says which setting the option belongs to (it is refused without
    it); `role` marks the lists an option belongs to (see `options`): network (it decides the
    network), mode (it chooses what a run is), sweepable=False, machine (it may differ per machine,
    so it is not part of a sweep's identity), kept_on_resume (-resume refuses another value)."""
    metadata = dict(help=help, group=group, type=type, nargs=nargs, choices=choices, metavar=metavar,
                    whole=whole, only_with=only_with, role=role)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(default: bool, help: str, group: str, **more: Any) -> Any:
    """A True/False option; the bare flag (``-resume``) means True."""
    return option(default, help, group, type=str2bool, nargs="?", metavar="BOOL", **more)


@dataclasses.dataclass
class Config:
    """Every option, typed; field names are the option names without the dash. `typed` holds the
    options typed on the command line (or given to config_from_dict), {name: value}."""
    # -- data
    task: str = option("Task04_Hippocampus", "Medical Segmentation Decathlon task to download when -data_dir "
                       "does not hold it yet: Task01_BrainTumour ... Task10_Colon, fetched from MONAI's public "
                       "mirror and checked with MONAI's md5", DATA)
    google_id: str = option("1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C", "Google Drive id of the task's archive, tried "
                            "before the mirror (default: 1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C, Task04_Hippocampus's "
                            "archive, which is used only for Task04; other tasks go straight to the mirror unless "
                            "you give another id)", DATA)
    data_dir: str = option("data", "where the data is, or goes: an extracted task folder, the task's .tar, a CSV "
                           "list (columns image,label and optionally split), a folder with imagesTr/ and labelsTr/ "
                           "of matching file names, or a folder to download into", DATA, machine=True)
    label_names: list[str] | None = option(None, "class names, one per label value 0, 1, ..., background first "
                                           "(default: dataset.json's, else background class_1 class_2 ... for the "
                                           "values in the label files)", DATA, nargs="+", metavar="NAME",
                                           whole=label_name_list)
    train_val_ratio: float = option(0.8, "fraction of labelled cases used for training", DATA, type=open_ratio)
    split_seed: int | None = option(None, "seed of the training/validation split, so that runs with different "
                                    "-random_seed can be compared on the same validation cases (default: None, the "
                                    "-random_seed)", DATA, type=optional(seed_value))
    cache_dir: str = option("preprocessed", "folder for the preprocessed cases (.npy files, memory-mapped, so a "
                            "data set larger than memory trains); built once, reused by later runs and -evaluate, "
                            "rebuilt when a file or option changes", DATA, machine=True)
    num_workers: int = option(0, "DataLoader worker processes for augmentation (0: in the main process)", DATA,
                              type=non_negative_int, machine=True)
    # -- training
    batch_size: int | None = option(None, "samples per iteration, per process (default: 16 on a GPU, 2 on a CPU, "
                                    "where 2 is the most accurate in 10 minutes, benchmarks/README.md)", TRAINING,
                                    type=optional(positive_int))
    epochs: int = option(100, "number of epochs; with -max_minutes and no -epochs, as many as the time allows",
                         TRAINING, type=positive_int)
    Nit: int | None = option(None, "iterations per epoch; None means one pass over the training set", TRAINING,
                             type=optional(positive_int))
    lr: float = option(0.01, "initial learning rate of SGD (Nesterov momentum), decayed to 0 as nnU-Net's poly "
                        "schedule over -epochs, or over -max_minutes if that comes first", TRAINING, type=positive_float)
    momentum: float = option(0.99, "SGD (Nesterov) momentum", TRAINING, type=momentum_value)
    weight_decay: float = option(3e-5, "SGD weight decay", TRAINING, type=non_negative_float)
    early_stopping: int | None = option(None, "patience in epochs; None disables it", TRAINING,
                                        type=optional(positive_int))
    max_minutes: float | None = option(None, "stop after this many minutes of wall time (validating and saving "
                                       "as usual); None means no limit", TRAINING, type=optional(positive_float))
    mixed_precision: bool = flag(True, "automatic mixed precision (fp16 + GradScaler on CUDA, bf16 on a CPU with "
                                 "native bf16, else fp32)", TRAINING)
    channels_last: bool = flag(True, "keep weights and batches in the channels_last_3d memory layout, which "
                               "measured 1.14x faster fp32 training steps on a CPU, and no slower in bf16 "
                               "(benchmarks/README.md)", TRAINING)
    augment: bool = flag(True, "random augmentation of training batches: crops of -patch_size, left-right flips, "
                         "rotations and scalings, brightness and noise", TRAINING)
    random_seed: int = option(42, "seed of every random generator", TRAINING, type=seed_value, kept_on_resume=True)
    device: str = option("auto", "where to train; auto picks cuda when available", TRAINING,
                         choices=["auto", "cpu", "cuda"], machine=True)
    patch_size: list[int] = option([40, 56, 40], "training crop (voxels); each side a multiple of what the network "
                                   "needs: unet, segresnet 2 ** (levels - 1), dynunet 2 for each time nnU-Net's plan "
                                   "may halve it (while it keeps 4 voxels, at most 5 times), unetr 16, swinunetr 32. "
                                   "Random crops of the preprocessed volumes, capped at their shape; also the window "
                                   "of sliding-window inference on larger volumes, and unetr's input size", TRAINING,
                                   type=positive_int, nargs=3, network=True)
    foreground_crops: float = option(0.33, "share of training crops centred on a foreground voxel, the rest "
                                     "anywhere (nnU-Net: a third); matters only where volumes are larger than "
                                     "-patch_size", TRAINING, type=unit_interval)
    loss: str = option("dicece", "dicece: soft Dice + cross-entropy; dice; ce: cross-entropy; dicefocal: soft Dice "
                       "+ focal loss (gamma 2); MONAI's Dice and focal terms, on softmax scores", TRAINING,
                       choices=list(LOSSES))
    class_weights: list[float] | str | None = option(
        None, "class weights (background first) of the cross-entropy or focal term: none; auto: from each class's "
        f"share f of the training cases' voxels, (1/f)^{CLASS_WEIGHT_POWER:g} scaled to average 1 (printed, and "
        "saved in config.json); or one number per class (default: none)", TRAINING, type=class_weight_word,
        nargs="+", metavar="WEIGHT", whole=class_weight_list)
    # -- model
    architecture: str = option("unet", "MONAI network: unet (UNet), dynunet (DynUNet, planned from the patch size "
                               "and spacing as nnU-Net), segresnet (SegResNet), unetr (UNETR), swinunetr (SwinUNETR)",
                               MODEL, choices=list(ARCHITECTURES), network=True)
    channels: list[int] | None = option(
        None, "the network's width. unet: feature channels per level, each level after the first halving the "
        "resolution; dynunet: filters per level, cut to the planned levels or extended by doubling (at most 320); "
        "segresnet: init_filters is the first (a multiple of 8), levels the count; unetr: feature_size is the first "
        "(ViT hidden size 12x it); swinunetr: feature_size is the first (a multiple of 12) (default: "
        + "; ".join(f"{name} {' '.join(map(str, widths))}" for name, widths in DEFAULT_CHANNELS.items()) + ")",
        MODEL, type=positive_int, nargs="+", whole=network_levels, network=True)
    num_res_units: int = option(1, "unet only: residual units per level (0, 1 and 2 measured: 1 is the most "
                                "accurate in 10 CPU minutes, benchmarks/README.md)", MODEL, type=non_negative_int,
                                only_with=("architecture", "unet"), network=True)
    deep_supervision: bool = flag(True, "dynunet only: the loss on every decoder output but the lowest, weighted "
                                  "1/2^i and normalised as nnU-Net does (it needs 3 or more downsamplings); "
                                  "predictions use the full-resolution output only", MODEL, network=True,
                                  only_with=("architecture", "dynunet"))
    # -- checkpoints
    best_models_dir: str = option("best_models", "run folder: checkpoints, metrics.csv, config.json", CHECKPOINTS,
                                  sweepable=False, machine=True)
    train_from_checkpoint: str | None = option(None, "path of weights to start from; None means random weights",
                                               CHECKPOINTS, type=optional(existing_file))
    fine_tune: bool = flag(False, "train only the last layer (the one that produces the class scores, per network: "
                          "docs/networks-and-losses.md), freezing all others", CHECKPOINTS)
    resume: bool = flag(False, "continue the interrupted run in -best_models_dir from its last.pt, exactly where it "
                        "stopped", CHECKPOINTS,
                        mode=True, sweepable=False)
    # -- evaluation and prediction
    evaluate: bool = flag(False, "evaluate -train_from_checkpoint (default: <best_models_dir>/best.pt) on its run's "
                          "split instead of training", USE, mode=True, sweepable=False)
    evaluate_split: str = option("val", "which cases of the run's split -evaluate measures", USE,
                                 choices=["val", "train"], sweepable=False)
    predict: str | None = option(None, "a NIfTI file or a folder of them to segment with -train_from_checkpoint",
                                 USE, type=optional(str), mode=True, sweepable=False)
    predictions_dir: str = option("predictions", "where -predict writes label maps, under the input file names",
                                  USE, sweepable=False)
    tta: bool = flag(True, "test-time mirroring in validation, -evaluate and -predict: average the prediction with "
                     "that of the left-right mirrored image (twice the work)", USE)
    postprocess: bool = flag(False, "keep the largest connected component of each class in predictions", USE)
    config: str | None = option(None, "a run's config.json to repeat; options on the command line override it",
                                USE, type=optional(existing_file), sweepable=False)
    # -- unlabelled scans
    mean_teacher: bool = flag(False, "also learn from unlabelled scans: the network is trained to agree with a "
                              "teacher (its exponential moving average) on them (utils/training/semi_supervised.py)",
                              SEMI, kept_on_resume=True)
    unlabelled_dir: str | None = option(None, "a folder of unlabelled NIfTI scans, or auto for the task's imagesTs/; "
                                        "read, checked and preprocessed like the labelled ones. With -mean_teacher and "
                                        "no unlabelled scans, the training scans serve (consistency on them alone)",
                                        SEMI, type=optional(str), only_with=("mean_teacher", True), kept_on_resume=True)
    labelled_fraction: float = option(1.0, "keep the labels of only this share of the training cases (a seeded "
                                      "choice) and use the others as unlabelled scans: to measure what -mean_teacher "
                                      "gains", SEMI, type=labelled_share, kept_on_resume=True)
    consistency_loss: str = option("mse", "how the network learns to agree with the teacher on unlabelled crops: "
                                   "mse of the softmax scores, or pseudo_label: cross-entropy towards the teacher's "
                                   "labels where it is sure (-pseudo_label_threshold)", SEMI,
                                   choices=list(CONSISTENCY_LOSSES), only_with=("mean_teacher", True))
    consistency_weight: float = option(0.1, "weight of the consistency loss once ramped up (Yu et al. 2019's 0.1; on "
                                       "Task04 0.1 to 10 measured alike and 100 worse: docs/unlabelled-scans.md)", SEMI,
                                       type=non_negative_float, only_with=("mean_teacher", True))
    pseudo_label_threshold: float = option(0.9, "-consistency_loss pseudo_label: the voxels whose teacher softmax "
                                           "reaches this are learnt from; the others are left out", SEMI,
                                           type=unit_interval, only_with=("consistency_loss", "pseudo_label"))
    consistency_rampup: float = option(0.4, "share of the run (epochs, or -max_minutes) over which the consistency "
                                       "weight rises from 0 as exp(-5 (1 - t)^2)", SEMI, type=unit_interval,
                                       only_with=("mean_teacher", True))
    ema_decay: float = option(0.99, "the teacher's weights: decay * teacher + (1 - decay) * network after every step",
                              SEMI, type=decay_value, only_with=("mean_teacher", True))
    # -- experiments
    lr_find: bool = flag(False, "instead of training, the learning-rate range test (MONAI's LearningRateFinder) on "
                         "this run's model, loss, precision and batches: writes lr_find.csv and lr_find.png to "
                         "-best_models_dir and prints the suggested -lr", EXPERIMENTS, mode=True, sweepable=False)
    sweep: str | None = option(None, "a JSON file of options to sweep: a list of values is a grid, "
                               '{"low": ..., "high": ..., "log": true} a range; each trial is a run in '
                               "<best_models_dir>/trial_<number>/ with the other options of this command",
                               EXPERIMENTS, type=optional(existing_file), mode=True, sweepable=False, machine=True)
    trials: int | None = option(None, "trials of a -sweep in all (every process together); None means every point "
                                "of a grid, or 10 when the space has a range", EXPERIMENTS,
                                type=optional(positive_int), only_with=("sweep", "a space.json"), sweepable=False,
                                machine=True)
    sweep_storage: str | None = option(None, "where the sweep's study lives, shared by every process that runs the "
                                       "same command: a database URL (sqlite:///file.db, postgresql://...) or "
                                       "journal:PATH (a file on a shared folder); None means "
                                       "sqlite:///<best_models_dir>/sweep.db", EXPERIMENTS, type=optional(str),
                                       only_with=("sweep", "a space.json"), sweepable=False, machine=True)

    typed: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """{option: value}, every option (what config.json and checkpoints keep)."""
        return {name: getattr(self, name) for name in OPTIONS}


def declared() -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(Config) if "group" in field.metadata]


OPTIONS = [field.name for field in declared()]
DEFAULTS = {field.name: (field.default_factory() if field.default is dataclasses.MISSING else field.default)
            for field in declared()}


def options(**role: bool) -> list[str]:
    """The names of the options with these roles, e.g. options(network=True); an option not
    marked with a role has it False, except sweepable, which is True unless marked."""
    def has(field: dataclasses.Field, name: str) -> bool:
        return field.metadata["role"].get(name, name == "sweepable")
    return [field.name for field in declared() if all(has(field, name) == wanted for name, wanted in role.items())]


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The command line, from the declarations. Only typed options end up in the parsed namespace
    (argument_default=SUPPRESS): the defaults are added by `layered`."""
    parser = argparse.ArgumentParser(
        description="Train a 3D U-Net to segment the hippocampus (MSD Task04) with plain PyTorch.",
        argument_default=argparse.SUPPRESS)
    groups = {}                     # group title -> its argument group
    for field in declared():
        meta = field.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        group = groups[meta["group"]]
        default = DEFAULTS[field.name]
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = meta["help"] if "(default:" in meta["help"] else f"{meta['help']} (default: {shown})"
        extra = {"const": True} if meta["type"] is str2bool else {}
        group.add_argument(f"-{field.name}", type=meta["type"], nargs=meta["nargs"], choices=meta["choices"],
                           metavar=meta["metavar"], help=help_text.replace("%", "%%"), **extra)
    return parser


def options_table() -> str:
    """docs/options.md's table, from the declarations: each option, its default and its help."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in declared():
        text = field.metadata["help"]
        default = DEFAULTS[field.name]
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        if text.endswith(")") and "(default: " in text:       # a default the help explains itself
            text, shown = text[:text.rindex("(default: ")].rstrip(), text[text.rindex("(default: ") + 10:-1]
        rows.append(f"| -{field.name} | {shown} | {text} |".replace("\n", " "))
    return "\n".join(rows) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line words (default: sys.argv) into a Config; bad values exit with usage."""
    parser = build_parser()
    typed = vars(parser.parse_args(argv))
    try:
        typed = finished(typed)
        saved = read_config_file(typed["config"]) if typed.get("config") else {}
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return layered(typed, saved)


def finished(typed: dict[str, Any]) -> dict[str, Any]:
    """Typed values with each list checked whole (e.g. -channels needs 2 levels, -label_names None)."""
    typed = dict(typed)
    for field in declared():
        whole = field.metadata["whole"]
        if whole is not None and typed.get(field.name) is not None:
            try:
                typed[field.name] = whole(typed[field.name])
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(f"argument -{field.name}: {error}") from None
    return typed


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a run's config.json (or of a plain {option: value} file), but its mode
    (-resume, -evaluate, ...)."""
    try:
        with open(path) as file:
            saved = json.load(file)
        saved = saved.get("config", saved)
        if not isinstance(saved, dict):
            raise ValueError("it is not a JSON object")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"argument -config: {path} is not a config.json ({error})") from None
    # A run's settings, not what kind of run it was: a resumed run's config.json repeats as a new run.
    left_out = ("config", *options(mode=True))
    return {name: value for name, value in saved.items() if name in OPTIONS and name not in left_out}


def layered(typed: dict[str, Any], *saved: dict[str, Any]) -> Config:
    """The one place options are combined: the declared defaults, then each of `saved` in turn (a
    run's config.json or checkpoint, lowest first), then the `typed` options on top. Then the
    defaults that depend on other options: -channels on -architecture, and -epochs, which a time
    limit alone lifts so that the clock ends the run."""
    values = dict(DEFAULTS)
    for layer in saved:
        values.update({name: value for name, value in layer.items() if name in OPTIONS and name != "config"})
    values.update(typed)
    if values["channels"] is None:
        values["channels"] = list(DEFAULT_CHANNELS[values["architecture"]])
    if values["max_minutes"] is not None and not any("epochs" in layer for layer in (*saved, typed)):
        values["epochs"] = EPOCHS_UNDER_A_TIME_LIMIT
    return Config(**values, typed=dict(typed))


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from {option name: value}, as if each had been typed: through the same checks."""
    return with_typed(Config(), values)


def with_typed(config: Config, values: dict[str, Any]) -> Config:
    """`config` as if `values` had been typed on its command line too, checked as typed options
    are (a sentence names a bad one); -config's file, if typed, is read again underneath."""
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown option(s) {unknown}; known options are {sorted(OPTIONS)}")
    fields = {field.name: field for field in declared()}
    typed = dict(config.typed)
    try:
        for name, value in values.items():
            typed[name] = checked_value(fields[name], value)
        typed = finished(typed)
        saved = read_config_file(typed["config"]) if typed.get("config") else {}
    except argparse.ArgumentTypeError as error:
        raise UserError(f"-{name} {value}: {error}") from None
    return layered(typed, saved)


def checked_value(field: dataclasses.Field, value: Any) -> Any:
    """`value` of the option `field` as the command line would have it, through the same checks."""
    kind, choices = field.metadata["type"], field.metadata["choices"]
    if isinstance(value, str) and field.metadata["nargs"] not in (None, "?"):
        value = value.split()               # e.g. a sweep's grid value "16 32 64"
    if field.metadata["nargs"] in (None, "?"):
        value = kind(value)
        values = [value]
    elif value is None:
        return None
    else:
        value = values = [kind(item) for item in (value if isinstance(value, (list, tuple)) else [value])]
    if choices is not None and any(item not in choices for item in values):
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(choices)})")
    return value


def command_line(config: Config) -> list[str]:
    """The words of main.py that give `config`'s typed options."""
    words = []
    for name, value in config.typed.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        words += [f"-{name}", *("None" if v is None else str(v) for v in values)]
    return words


def for_device(config: Config, device_type: str) -> Config:
    """`config` with the defaults that depend on the device filled in: -batch_size."""
    if config.batch_size is None:
        return dataclasses.replace(config, batch_size=BATCH_SIZE_BY_DEVICE[device_type])
    return config


# ---------------------------------------------------------------- combinations


def refuse_options_that_do_not_apply(config: Config, settled: Sequence[str] | None = None) -> None:
    """Refuse typed options that this run would ignore: a network's own option given for another
    network, a mean-teacher option without -mean_teacher, a sweep option without -sweep; class
    weights for a loss without a weighted term; and network options that do not fit together.
    `settled`: the options whose values are final (default: all); an option that belongs to one
    not yet settled (the network, before a checkpoint's is read) is checked later."""
    for field in declared():
        only_with = field.metadata["only_with"]
        if field.name not in config.typed or only_with is None:
            continue
        other, wanted = only_with
        if settled is not None and other not in settled:
            continue
        value = getattr(config, other)
        if value is not None if wanted == "a space.json" else value == wanted:
            continue
        raise UserError(f"-{field.name} applies to -{other} {wanted} only; this run has -{other} {value}. "
                        f"Leave -{field.name} out, or pass -{other} {wanted}.")
    if config.loss == "dice" and config.class_weights is not None:
        raise UserError("-class_weights weights the cross-entropy or focal term, and -loss dice has neither. "
                        "Leave -class_weights out, or pass -loss dicece, ce or dicefocal.")
    if settled is None:                     # the network's options fit together (e.g. its patch multiple)
        check_network_options(config.architecture, config.channels, config.patch_size)


def refuse_other_values(config: Config, saved: dict, names: Sequence[str]) -> None:
    """-resume continues with its run's own values of `names` (e.g. the unlabelled scans and the
    labelled share): typing others would change the run's data halfway."""
    for name in names:
        if name in config.typed and config.typed[name] != saved.get(name, DEFAULTS[name]):
            raise UserError(f"-{name} {config.typed[name]} differs from the run being resumed ({saved.get(name)}); "
                            f"-resume continues with the run's own. Leave -{name} out, or start a new run in "
                            f"another -best_models_dir.")


def modes_of(config: Config) -> list[str]:
    """The kinds of run `config` asks for (resume, evaluate, predict, lr_find, sweep)."""
    return [name for name in options(mode=True) if getattr(config, name) not in (None, False)]


def refuse_mode_combinations(config: Config) -> None:
    """Refuse what a run cannot be at once (e.g. a range test that resumes), and options that
    belong to a setting the command does not have, before anything is read. (The network's
    options wait for its checkpoint; under -resume, everything waits for the run's own config.)"""
    modes = modes_of(config)
    experiments = [mode for mode in modes if mode in ("lr_find", "sweep")]       # runs of runs
    if len(modes) > 1 and experiments:
        other = next(mode for mode in modes if mode != experiments[0])
        raise UserError(f"-{experiments[0]} and -{other} are different kinds of run; give one of them. (To range-test "
                        f"or sweep from trained weights, pass -train_from_checkpoint.)")
    if not config.resume:
        refuse_options_that_do_not_apply(config, settled=options(network=False))
