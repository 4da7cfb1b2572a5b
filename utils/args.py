"""Command-line options: their names, defaults, help texts and value checks. Nothing else.

Every option is single-dash (``-batch_size 2``) because that is what users already type.
`parse_args` returns a typed `Config`; the notebook builds the same `Config` from a dict with
`config_from_dict`, so both go through the defaults defined here and only here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Sequence

from utils.errors import UserError
from utils.training.losses import CLASS_WEIGHT_POWER, LOSSES
from utils.training.networks import ARCHITECTURES, DEFAULT_CHANNELS
from utils.training.semi_supervised import CONSISTENCY_LOSSES

EPOCHS_UNDER_A_TIME_LIMIT = 100_000
TRUE_WORDS = {"true", "yes", "y", "1", "on"}
FALSE_WORDS = {"false", "no", "n", "0", "off"}


def str2bool(text: str) -> bool:
    """'True'/'False' (also yes/no/1/0, any case) -> bool."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean; use True or False (also yes/no/1/0)")


def optional(kind):
    """Wrap a type so that the word 'None' gives None (e.g. ``-Nit None``)."""
    def parse(text: str):
        return None if str(text).strip().lower() == "none" else kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def checked(kind: type, accept, requirement: str):
    """An argparse type: `kind` (int or float) of a value for which `accept(value)` holds."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
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

# -batch_size when it is not given: a GPU runs a batch of 16 about as fast as a batch of 2, while
# on a 2-core CPU more, smaller steps learn more in 10 minutes (benchmarks/README.md).
BATCH_SIZE_BY_DEVICE = {"cuda": 16, "cpu": 2}
# Options that only one network takes: typed for another, they are refused rather than ignored.
ONLY_FOR = {"num_res_units": "unet", "deep_supervision": "dynunet"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each help text, unless the text already says its default."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file at '{text}'; check the path")
    return text


def class_weight_word(text: str) -> str | float:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a 3D U-Net to segment the hippocampus (MSD Task04) with plain PyTorch.",
        formatter_class=HelpFormatter,
    )
    flag = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")

    data = p.add_argument_group("data")
    data.add_argument("-task", type=str, default="Task04_Hippocampus",
                      help="Medical Segmentation Decathlon task to download when -data_dir does not "
                           "hold it yet: Task01_BrainTumour ... Task10_Colon, fetched from MONAI's "
                           "public mirror and checked with MONAI's md5")
    data.add_argument("-google_id", type=str, default="1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C",
                      help="Google Drive id of the task's archive, tried before the mirror (default: "
                           "1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C, Task04_Hippocampus's archive, which is "
                           "used only for Task04; other tasks go straight to the mirror unless you "
                           "give another id)")
    data.add_argument("-data_dir", type=str, default="data",
                      help="where the data is, or goes: an extracted task folder, the task's .tar, "
                           "a CSV list (columns image,label and optionally split), a folder with "
                           "imagesTr/ and labelsTr/ of matching file names, or a folder to download into")
    data.add_argument("-label_names", type=str, nargs="+", default=None, metavar="NAME",
                      help="class names, one per label value 0, 1, ..., background first (default: "
                           "dataset.json's, else background class_1 class_2 ... for the values in the "
                           "label files)")
    data.add_argument("-train_val_ratio", type=open_ratio, default=0.8,
                      help="fraction of labelled cases used for training")
    data.add_argument("-split_seed", type=optional(seed_value), default=None,
                      help="seed of the training/validation split, so that runs with different "
                           "-random_seed can be compared on the same validation cases (default: None, "
                           "the -random_seed)")
    data.add_argument("-cache_dir", type=str, default="preprocessed",
                      help="folder for the preprocessed cases (.npy files, memory-mapped, so a data set "
                           "larger than memory trains); built once, reused by later runs and -evaluate, "
                           "rebuilt when a file or option changes")
    data.add_argument("-num_workers", type=non_negative_int, default=0,
                      help="DataLoader worker processes for augmentation (0: in the main process)")

    train = p.add_argument_group("training")
    train.add_argument("-batch_size", type=optional(positive_int), default=None,
                       help="samples per iteration, per process (default: 16 on a GPU, 2 on a CPU, where "
                            "2 is the most accurate in 10 minutes, benchmarks/README.md)")
    train.add_argument("-epochs", type=positive_int, default=100,
                       help="number of epochs; with -max_minutes and no -epochs, as many as the time allows")
    train.add_argument("-Nit", type=optional(positive_int), default=None,
                       help="iterations per epoch; None means one pass over the training set")
    train.add_argument("-lr", type=positive_float, default=0.01, help="initial learning rate")
    train.add_argument("-momentum", type=momentum_value, default=0.99, help="SGD (Nesterov) momentum")
    train.add_argument("-weight_decay", type=non_negative_float, default=3e-5, help="SGD weight decay")
    train.add_argument("-early_stopping", type=optional(positive_int), default=None,
                       help="patience in epochs; None disables it")
    train.add_argument("-max_minutes", type=optional(positive_float), default=None,
                       help="stop after this many minutes of wall time (validating and saving as "
                            "usual); None means no limit")
    train.add_argument("-mixed_precision", default=True, help="automatic mixed precision "
                       "(fp16 + GradScaler on CUDA, bf16 on a CPU with native bf16, else fp32)", **flag)
    train.add_argument("-channels_last", default=True,
                       help="keep weights and batches in the channels_last_3d memory layout, which "
                            "measured 1.14x faster fp32 training steps on a CPU, and no slower in bf16 (benchmarks/README.md)", **flag)
    train.add_argument("-augment", default=True, help="random augmentation of training samples", **flag)
    train.add_argument("-random_seed", type=seed_value, default=42, help="seed of every random generator")
    train.add_argument("-device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                       help="where to train; auto picks cuda when available")

    train.add_argument("-patch_size", type=positive_int, nargs=3, default=[40, 56, 40],
                       help="training crop (voxels); each side a multiple of what the network needs: "
                            "unet, segresnet 2 ** (levels - 1), dynunet 2 for each time nnU-Net's plan "
                            "may halve it (while it keeps 4 voxels, at most 5 times), unetr 16, swinunetr "
                            "32. Random crops of the preprocessed volumes, capped at their shape; also "
                            "the window of sliding-window inference on larger volumes, and unetr's input size")
    train.add_argument("-foreground_crops", type=unit_interval, default=0.33,
                       help="share of training crops centred on a foreground voxel, the rest anywhere "
                            "(nnU-Net: a third); matters only where volumes are larger than -patch_size")

    train.add_argument("-loss", type=str, default="dicece", choices=list(LOSSES),
                       help="dicece: soft Dice + cross-entropy; dice; ce: cross-entropy; dicefocal: soft "
                            "Dice + focal loss (gamma 2); MONAI's Dice and focal terms, on softmax scores")
    train.add_argument("-class_weights", type=class_weight_word, nargs="+", default=None, metavar="WEIGHT",
                       help="class weights (background first) of the cross-entropy or focal term: none; "
                            f"auto: from each class's share f of the training cases' voxels, (1/f)^{CLASS_WEIGHT_POWER:g} "
                            "scaled to average 1 (printed, and saved in config.json); or one number per "
                            "class (default: none)")

    model = p.add_argument_group("model")
    model.add_argument("-architecture", type=str, default="unet", choices=list(ARCHITECTURES),
                       help="MONAI network: unet (UNet), dynunet (DynUNet, planned from the patch size "
                            "and spacing as nnU-Net), segresnet (SegResNet), unetr (UNETR), swinunetr (SwinUNETR)")
    model.add_argument("-channels", type=positive_int, nargs="+", default=None,
                       help="the network's width. unet: feature channels per level, each level after the "
                            "first halving the resolution; dynunet: filters per level, cut to the planned "
                            "levels or extended by doubling (at most 320); segresnet: init_filters is the "
                            "first (a multiple of 8), levels the count; unetr: feature_size is the first "
                            "(ViT hidden size 12x it); swinunetr: feature_size is the first (a multiple of 12) "
                            "(default: " + "; ".join(f"{name} {' '.join(map(str, widths))}"
                                                     for name, widths in DEFAULT_CHANNELS.items()) + ")")
    model.add_argument("-num_res_units", type=non_negative_int, default=1,
                       help="unet only: residual units per level (0, 1 and 2 measured: 1 is the most "
                            "accurate in 10 CPU minutes, benchmarks/README.md)")
    model.add_argument("-deep_supervision", default=True,
                       help="dynunet only: the loss on every decoder output but the lowest, weighted "
                            "1/2^i and normalised as nnU-Net does (it needs 3 or more downsamplings); "
                            "predictions use the full-resolution output only", **flag)

    run = p.add_argument_group("checkpoints")
    run.add_argument("-best_models_dir", type=str, default="best_models",
                     help="run folder: checkpoints, metrics.csv, config.json")
    run.add_argument("-train_from_checkpoint", type=optional(existing_file), default=None,
                     help="path of weights to start from; None means random weights")
    run.add_argument("-fine_tune", default=False,
                     help="train only the last layer, freezing all others", **flag)
    run.add_argument("-resume", default=False,
                     help="continue the interrupted run in -best_models_dir from its last.pt", **flag)

    use = p.add_argument_group("evaluation and prediction")
    use.add_argument("-evaluate", default=False, help="evaluate -train_from_checkpoint (default: "
                     "<best_models_dir>/best.pt) on its run's split instead of training", **flag)
    use.add_argument("-evaluate_split", type=str, default="val", choices=["val", "train"],
                     help="which cases of the run's split -evaluate measures")
    use.add_argument("-predict", type=optional(str), default=None,
                     help="a NIfTI file or a folder of them to segment with -train_from_checkpoint")
    use.add_argument("-predictions_dir", type=str, default="predictions",
                     help="where -predict writes label maps, under the input file names")
    use.add_argument("-tta", default=True,
                     help="test-time mirroring in validation, -evaluate and -predict: average the "
                          "prediction with that of the left-right mirrored image (twice the work)",
                     **flag)
    use.add_argument("-postprocess", default=False,
                     help="keep the largest connected component of each class in predictions", **flag)
    use.add_argument("-config", type=optional(existing_file), default=None,
                     help="a run's config.json to repeat; options on the command line override it")

    semi = p.add_argument_group("unlabelled scans (semi-supervised)")
    semi.add_argument("-mean_teacher", default=False,
                      help="also learn from unlabelled scans: the network is trained to agree with a "
                           "teacher (its exponential moving average) on them (utils/training/semi_supervised.py)", **flag)
    semi.add_argument("-unlabelled_dir", type=optional(str), default=None,
                      help="a folder of unlabelled NIfTI scans, or auto for the task's imagesTs/; read, "
                           "checked and preprocessed like the labelled ones. With -mean_teacher and no "
                           "unlabelled scans, the training scans serve (consistency on them alone)")
    semi.add_argument("-labelled_fraction", type=labelled_share, default=1.0,
                      help="keep the labels of only this share of the training cases (a seeded choice) and "
                           "use the others as unlabelled scans: to measure what -mean_teacher gains")
    semi.add_argument("-consistency_loss", type=str, default="mse", choices=list(CONSISTENCY_LOSSES),
                      help="how the network learns to agree with the teacher on unlabelled crops: mse of "
                           "the softmax scores, or pseudo_label: cross-entropy towards the teacher's labels "
                           "where it is sure (-pseudo_label_threshold)")
    semi.add_argument("-consistency_weight", type=non_negative_float, default=0.1,
                      help="weight of the consistency loss once ramped up (Yu et al. 2019's 0.1; on Task04 "
                           "0.1 to 10 measured alike and 100 worse: README, \"Unlabelled scans\")")
    semi.add_argument("-pseudo_label_threshold", type=unit_interval, default=0.9,
                      help="-consistency_loss pseudo_label: the voxels whose teacher softmax reaches this "
                           "are learnt from; the others are left out")
    semi.add_argument("-consistency_rampup", type=unit_interval, default=0.4,
                      help="share of the run (epochs, or -max_minutes) over which the consistency weight "
                           "rises from 0 as exp(-5 (1 - t)^2)")
    semi.add_argument("-ema_decay", type=decay_value, default=0.99,
                      help="the teacher's weights: decay * teacher + (1 - decay) * network after every step")

    experiments = p.add_argument_group("experiments")
    experiments.add_argument("-lr_find", default=False,
                             help="instead of training, the learning-rate range test (MONAI's "
                                  "LearningRateFinder) on this run's model, loss, precision and batches: "
                                  "writes lr_find.csv and lr_find.png to -best_models_dir and prints the "
                                  "suggested -lr", **flag)
    experiments.add_argument("-sweep", type=optional(existing_file), default=None,
                             help="a JSON file of options to sweep: a list of values is a grid, "
                                  '{"low": ..., "high": ..., "log": true} a range; each trial is a run in '
                                  "<best_models_dir>/trial_<number>/ with the other options of this command")
    experiments.add_argument("-trials", type=optional(positive_int), default=None,
                             help="trials of a -sweep in all (every process together); None means every "
                                  "point of a grid, or 10 when the space has a range")
    experiments.add_argument("-sweep_storage", type=optional(str), default=None,
                             help="where the sweep's study lives, shared by every process that runs the same "
                                  "command: a database URL (sqlite:///file.db, postgresql://...) or "
                                  "journal:PATH (a file on a shared folder); None means "
                                  "sqlite:///<best_models_dir>/sweep.db")
    return p


@dataclasses.dataclass
class Config:
    """Every option, typed. Field names are the option names without the dash."""
    task: str
    google_id: str
    data_dir: str
    label_names: list[str] | None
    train_val_ratio: float
    split_seed: int | None               # None: the random_seed
    cache_dir: str
    num_workers: int
    batch_size: int | None               # None until `for_device` fills in the device's default
    epochs: int
    Nit: int | None
    lr: float
    momentum: float
    weight_decay: float
    early_stopping: int | None
    max_minutes: float | None
    mixed_precision: bool
    channels_last: bool
    augment: bool
    patch_size: list[int]
    foreground_crops: float
    loss: str
    class_weights: list[float] | str | None   # None, "auto" or one weight per class
    random_seed: int
    device: str
    architecture: str
    channels: list[int]
    num_res_units: int
    deep_supervision: bool
    best_models_dir: str
    train_from_checkpoint: str | None
    fine_tune: bool
    resume: bool
    evaluate: bool
    evaluate_split: str
    predict: str | None
    predictions_dir: str
    tta: bool
    postprocess: bool
    config: str | None
    mean_teacher: bool
    unlabelled_dir: str | None
    labelled_fraction: float
    consistency_loss: str
    consistency_weight: float
    pseudo_label_threshold: float
    consistency_rampup: float
    ema_decay: float
    lr_find: bool
    sweep: str | None
    trials: int | None
    sweep_storage: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line words (default: sys.argv) into a Config; bad values exit with usage."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.config is not None:
        return config_from_file(namespace.config, argv)
    if namespace.channels is None:
        namespace.channels = list(DEFAULT_CHANNELS[namespace.architecture])
    if len(namespace.channels) < 2:
        parser.error(f"-channels needs at least 2 levels, got {namespace.channels}")
    read_words(namespace, parser)
    if namespace.max_minutes is not None and "epochs" not in explicit_options(argv):
        namespace.epochs = EPOCHS_UNDER_A_TIME_LIMIT      # the clock ends the run
    return Config(**vars(namespace))


def read_words(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The options whose words mean more than their type says: -label_names None, -class_weights
    none / auto. (For parse_args and explicit_options alike, so a typed option means the same in a
    new run and on top of a resumed one.)"""
    names = getattr(namespace, "label_names", None)
    if names is not None:
        if [name.lower() for name in names] == ["none"]:
            namespace.label_names = None
        elif len(names) < 2:
            parser.error(f"-label_names needs at least 2 names, background first and then one per "
                         f"class, got {names}")
        elif len(set(names)) < len(names):
            parser.error(f"-label_names names a class twice: {names}")
    words = getattr(namespace, "class_weights", None)
    if words is not None and any(isinstance(word, str) for word in words):
        if len(words) > 1:
            parser.error(f"argument -class_weights: give none, auto, or one number per class, not {words}")
        namespace.class_weights = None if words[0] == "none" else "auto"


def for_device(config: Config, device_type: str) -> Config:
    """`config` with the defaults that depend on the device filled in: -batch_size."""
    if config.batch_size is None:
        return dataclasses.replace(config, batch_size=BATCH_SIZE_BY_DEVICE[device_type])
    return config


def config_from_file(path: str, argv: Sequence[str] | None = None) -> Config:
    """A run's config.json, with the options typed in `argv` on top, checked like typed options."""
    try:
        saved = json.loads(open(path).read())
        saved = saved.get("config", saved)          # a run's config.json, or a plain {option: value}
        if not isinstance(saved, dict):
            raise ValueError("it is not a JSON object")
    except ValueError as error:
        build_parser().error(f"argument -config: {path} is not a config.json ({error})")
    known = {f.name for f in dataclasses.fields(Config)}
    options = {k: v for k, v in saved.items() if k in known and k != "config" and v is not None}
    return config_from_dict({**options, **explicit_options(argv), "config": None})


def explicit_options(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Only the options typed on the command line, e.g. to override a saved run's config."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace = parser.parse_args(argv)
    read_words(namespace, parser)
    return vars(namespace)


def config_from_dict(options: dict[str, Any]) -> Config:
    """Build a Config from {option name: value}, through the same parser and checks."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options are {sorted(known)}")
    argv: list[str] = []
    for name, value in options.items():
        if value is None:
            value = "None"
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"-{name}", *(str(v) for v in values)]
    return parse_args(argv)


def refuse_options_that_do_not_apply(config: Config, argv: Sequence[str] | None) -> None:
    """Refuse options typed on `argv` that this run would ignore: a network's own option given for
    another network, class weights for a loss without a weighted term, a threshold for a
    consistency loss without one."""
    typed = explicit_options(argv)
    for option, architecture in ONLY_FOR.items():
        if option in typed and config.architecture != architecture:
            raise UserError(f"-{option} applies to -architecture {architecture} only; this run's network is "
                            f"{config.architecture}. Leave -{option} out, or pass -architecture {architecture}.")
    if config.loss == "dice" and config.class_weights is not None:
        raise UserError("-class_weights weights the cross-entropy or focal term, and -loss dice has neither. "
                        "Leave -class_weights out, or pass -loss dicece, ce or dicefocal.")
    if "pseudo_label_threshold" in typed and config.consistency_loss != "pseudo_label":
        raise UserError(f"-pseudo_label_threshold applies to -consistency_loss pseudo_label only; this run's is "
                        f"{config.consistency_loss}. Leave it out, or pass -consistency_loss pseudo_label.")


def refuse_mode_combinations(config: Config, argv: Sequence[str] | None) -> None:
    """Refuse what a run cannot be at once (e.g. a range test that resumes) and sweep options
    without a sweep, before anything is read."""
    typed = explicit_options(argv)
    modes = [name for name in ("lr_find", "resume", "evaluate") if getattr(config, name)]
    modes += [name for name in ("sweep", "predict") if getattr(config, name) is not None]
    if len(modes) > 1 and ({"lr_find", "sweep"} & set(modes)):
        raise UserError(f"-{modes[0]} and -{modes[1]} are different kinds of run; give one of them. (To range-test "
                        f"or sweep from trained weights, pass -train_from_checkpoint.)")
    semi = ("unlabelled_dir", "consistency_loss", "consistency_weight", "pseudo_label_threshold",
            "consistency_rampup", "ema_decay")
    for option in semi:          # (with -resume, the run's own -mean_teacher decides: checked there)
        if option in typed and not config.mean_teacher and not config.resume:
            raise UserError(f"-{option} belongs to -mean_teacher True (learning from unlabelled scans); "
                            f"pass it, or leave -{option} out.")
    for option in ("trials", "sweep_storage"):
        if option in typed and config.sweep is None:
            raise UserError(f"-{option} belongs to a sweep; pass -sweep space.json, or leave -{option} out.")
