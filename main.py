"""Train a 3D segmentation network (MONAI's U-Net by default) on MSD Task04 (hippocampus), evaluate
it, or apply it to new scans.
Wiring only: each step lives in utils/.

    python main.py -mixed_precision True -Nit 250
    python main.py -fine_tune True -train_from_checkpoint best_models/best.pt
    python main.py -evaluate True -train_from_checkpoint best_models/best.pt
    python main.py -predict scans/ -train_from_checkpoint best_models/best.pt -predictions_dir out
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable

import optuna
import torch

from utils.args import (Config, explicit_options, for_device, parse_args, refuse_mode_combinations,
                        refuse_options_that_do_not_apply)
from utils.training.checkpoint import check_same_model, load_checkpoint
from utils.data.cache import Cases, load_cases
from utils.data_class import labelled_subset, split_cases, train_loader
from utils.training.distributed import Place, barrier, start, stop, unwrap, wrap
from utils.training.environment import choose_device, seed_everything, versions
from utils.errors import CheckpointError, UserError
from utils.inference.evaluation import amp_dtype, autocast_for, evaluate, precision_name
from utils.files import written_atomically
from utils.data.layouts import TaskInfo, read_data, read_unlabelled
from utils.experiments.lr_finder import SUGGESTION_RULE, range_test, write_range_test
from utils.training.losses import choose_class_weights
from utils.training.memory import describe_peak, peak_memory, reset_peak
from utils.training.networks import (build_model, check_network_options, count_parameters, describe, downsampling_factor,
                         freeze_all_but_last_layer, input_multiples, model_config, training_outputs)
from utils.inference.prediction import predict_files
from utils.outputs.report import failure_cases, write_report
from utils.training.semi_supervised import MeanTeacher
from utils.experiments.sweep import run_sweep
from utils.data.preprocessing import Preprocessing
from utils.trainer_class import NonFiniteLossError, Trainer, make_loss, make_optimizer, memory_format

# The options that decide the network: a DynUNet is planned from the patch size, UNETR takes it as input.
NETWORK_OPTIONS = ("architecture", "channels", "num_res_units", "deep_supervision", "patch_size")


def resumed_config(config: Config, argv: list[str] | None) -> tuple[Config, dict]:
    """The interrupted run's config and last.pt, with options typed on this command line on top."""
    last = Path(config.best_models_dir) / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"Nothing to resume: {last} does not exist. Start a new run without "
                              f"-resume, or point -best_models_dir at the folder of the run to continue.")
    state = load_checkpoint(last)
    # Defaults first, so that a checkpoint from before an option existed still resumes.
    saved = {**parse_args([]).to_dict(), **state["config"], **explicit_options(argv), "resume": True}
    return Config(**saved), state


def with_network_of(checkpoint: dict, config: Config, argv: list[str] | None) -> Config:
    """`config` with the network options of the checkpoint's run, except those typed on this
    command line: -train_from_checkpoint rebuilds the checkpoint's network without them, and
    check_same_model refuses typed ones that describe another network."""
    saved = {**parse_args([]).to_dict(), **checkpoint.get("config", {})}
    typed = explicit_options(argv)
    return dataclasses.replace(config, **{name: saved[name] for name in NETWORK_OPTIONS if name not in typed})


def refuse_other_unlabelled_options(resume_state: dict, argv: list[str] | None) -> None:
    """-resume continues with the unlabelled scans and labelled share of its run: typing others
    would change the run's data halfway."""
    saved, typed = resume_state["config"], explicit_options(argv)
    for option in ("mean_teacher", "labelled_fraction", "unlabelled_dir", "random_seed"):
        if option in typed and typed[option] != saved.get(option, parse_args([]).to_dict()[option]):
            raise UserError(f"-{option} {typed[option]} differs from the run being resumed "
                            f"({saved.get(option)}); -resume continues with the run's own. Leave -{option} "
                            f"out, or start a new run in another -best_models_dir.")


def run_class_weights(config: Config, info: TaskInfo, train_cases: Cases, resume_state: dict | None,
                      say: Callable) -> dict:
    """-class_weights as run_info keeps them (config.json, checkpoints); -resume continues with
    the weights of its checkpoint, so with the same loss."""
    if resume_state is not None:
        return {key: resume_state.get(key) for key in ("class_weights", "class_frequencies")}
    return choose_class_weights(config.class_weights, info.label_names, train_cases.native_labels, say)


def prepare_training(config: Config, argv: list[str] | None, place: Place,
                     after_epoch: Callable[[dict], None] | None = None) -> tuple[Trainer, dict]:
    """Everything a training run needs, ready to start: the data, the network, the loss, the
    Trainer; and the contents of its config.json. Nothing is written yet but the run folder."""
    say = print if place.is_main else lambda *args, **kwargs: None
    resume_state = start_state = None
    if config.resume:
        config, resume_state = resumed_config(config, argv)
    elif config.train_from_checkpoint:
        start_state = load_checkpoint(config.train_from_checkpoint)
        config = with_network_of(start_state, config, argv)
    refuse_options_that_do_not_apply(config, argv)
    check_network_options(config.architecture, config.channels, config.patch_size)
    config = for_device(config, place.device.type)      # e.g. the batch size, if not given
    run_dir = Path(config.best_models_dir)
    if resume_state is None and not config.lr_find and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run (last.pt); starting over would overwrite it. "
                        f"Continue it with -resume True, or choose another -best_models_dir.")
    device = place.device
    if device.type == "cuda":
        # Every training batch has one shape (the crop), so cuDNN's search for its fastest
        # kernels pays off; validation adds only a few window shapes.
        torch.backends.cudnn.benchmark = True
    seed_everything(config.random_seed + place.rank)   # each process augments differently
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create the run folder -best_models_dir {run_dir} ({error.strerror}). "
                        f"Choose a folder you can write to.") from None

    # Data
    info = read_data(config.data_dir, config.task, config.google_id, config.label_names)
    divisor = max(input_multiples(config.architecture, config.channels, config.patch_size))
    if not place.is_main:
        barrier(place)          # the first process builds the cache; the others then read it
    cases, preprocessing = load_cases(info, divisor, progress=place.is_main, cache_dir=config.cache_dir)
    if place.is_main:
        barrier(place)
    if resume_state is not None:
        split = resume_state["split"]
        if Preprocessing.from_dict(resume_state["preprocessing"]) != preprocessing:
            raise UserError(f"The data in {info.task_dir} preprocesses differently from the run being "
                            f"resumed. Use the same -data_dir as that run.")
    else:
        split_seed = config.random_seed if config.split_seed is None else config.split_seed
        split = split_cases(cases.ids, config.train_val_ratio, split_seed, info.split)
    labelled, unlabelled_ids = labelled_subset(split["train"], config.labelled_fraction, config.random_seed)
    if resume_state is not None:
        refuse_other_unlabelled_options(resume_state, argv)
        labelled = resume_state.get("labelled", labelled)
    train_cases, val_cases = cases.subset(labelled), cases.subset(split["val"])
    if config.labelled_fraction < 1:
        say(f"-labelled_fraction {config.labelled_fraction:g}: {len(labelled)} training cases keep their labels, "
            f"{len(unlabelled_ids)} are used as unlabelled scans" + ("" if config.mean_teacher else
                                                                    " (by nothing, without -mean_teacher True)"))
    if config.batch_size > len(train_cases):
        say(f"Note: -batch_size {config.batch_size} is larger than the {len(train_cases)} training "
              f"cases; batches repeat cases" + ("." if config.Nit else " only with -Nit; without it a "
              "batch holds each training case once."))
    loader = train_loader(train_cases, config.batch_size, config.Nit, config.augment, config.num_workers,
                          config.random_seed, config.patch_size, pin_memory=device.type == "cuda",
                          rank=place.rank, world_size=place.world_size, foreground_crops=config.foreground_crops)
    unlabelled_loader = None
    if config.mean_teacher:
        if place.distributed:
            raise UserError("-mean_teacher runs in one process for now (its second forward pass per step "
                            "is not yet arranged for DDP): start it with python main.py, not torchrun.")
        pool = cases.subset(unlabelled_ids) if unlabelled_ids else None
        if config.unlabelled_dir is not None:
            scans, _ = load_cases(read_unlabelled(config.unlabelled_dir, info), divisor, progress=place.is_main,
                                  preprocessing=preprocessing, cache_dir=config.cache_dir)
            pool = scans if pool is None else pool.join(scans)
        if pool is None:
            say("Note: -mean_teacher has no unlabelled scans (no -unlabelled_dir, -labelled_fraction 1), so it "
                "asks for consistency on the training scans themselves.")
        pool = pool or train_cases
        leaking = sorted(set(pool.ids) & set(split["val"]))
        if leaking:
            say(f"Warning: {len(leaking)} unlabelled scans have the names of validation cases ({', '.join(leaking[:3])}"
                f"{', ...' if len(leaking) > 3 else ''}): if they are the same scans, validation is not blind.")
        if resume_state is not None and resume_state.get("unlabelled_ids") not in (None, pool.ids):
            raise UserError("The unlabelled scans differ from those of the run being resumed. Resume with the "
                            "same -unlabelled_dir (and its files unchanged).")
        # As many unlabelled batches as labelled ones, from crops anywhere in the scans.
        unlabelled_loader = train_loader(pool, config.batch_size, len(loader), config.augment, config.num_workers,
                                         config.random_seed + 2, config.patch_size, pin_memory=device.type == "cuda",
                                         rank=place.rank, world_size=place.world_size)
        say(f"{len(pool)} unlabelled scans for the mean teacher")
    spacing = "each scan's own spacing" if preprocessing.spacing is None else \
        " x ".join(f"{side:g}" for side in preprocessing.spacing) + " mm voxels"
    say(f"{len(train_cases)} training and {len(val_cases)} validation cases, preprocessed to "
        f"{preprocessing.target_shape} ({spacing}); {len(loader)} iterations per epoch"
        + (f" on each of {place.world_size} processes (batch {config.batch_size} each)" if place.distributed else ""))

    # Model: a DynUNet is planned for the voxel spacing that preprocessing chose.
    architecture = model_config(info.in_channels, info.num_classes, config.channels, config.num_res_units,
                                config.architecture, config.patch_size, preprocessing.spacing,
                                config.deep_supervision)
    if config.architecture == "dynunet" and len(architecture["filters"]) != len(config.channels):
        say(f"Note: the DynUNet planned for this patch and spacing has {len(architecture['filters'])} levels "
            f"and -channels gives {len(config.channels)}, so its filters are {architecture['filters']}.")
    model = build_model(architecture)
    if resume_state is not None or start_state is not None:      # the network must be the one saved
        check_same_model(resume_state or start_state, architecture,
                         config.train_from_checkpoint if start_state is not None else run_dir / "last.pt")
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        say(f"Starting from the weights in {config.train_from_checkpoint}")
    if config.fine_tune:
        trainable, total = freeze_all_but_last_layer(model)
        say(f"Fine-tuning the last layer only: {trainable:,} trainable of {total:,} parameters")
    else:
        trainable, total = count_parameters(model)
        say(f"Model: {describe(architecture)}, {total:,} parameters")
    say(f"Device {device}, precision {precision_name(device, config.mixed_precision)}, batch "
        f"{config.batch_size}" + (" per process" if place.distributed else ""))
    if config.mixed_precision and amp_dtype(device) is None:
        say("Note: this CPU has no native bf16 (it needs AVX-512), so -mixed_precision is off and "
            "training runs in fp32, about 10x faster here than emulated bf16.")
    model.to(device, memory_format=memory_format(config))
    optimizer = make_optimizer(model, config)
    model = wrap(model, place)           # DDP under torchrun, the network itself otherwise

    # Training
    weights = run_class_weights(config, info, train_cases, resume_state, say)
    run_info = {"split": split, "labelled": labelled,
                "unlabelled_ids": unlabelled_loader.dataset.cases.ids if unlabelled_loader is not None else None,
                "preprocessing": preprocessing.to_dict(), "model_config": architecture,
                "training_extent_mm": cases.extent_mm(),
                "label_names": {str(k): v for k, v in info.label_names.items()},
                "fingerprint": cases.fingerprint,      # spacings, shapes, intensities; target_spacing
                **weights}
    loss = make_loss(config.loss, weights["class_weights"], training_outputs(architecture))
    mean_teacher = None
    if config.mean_teacher:
        mean_teacher = MeanTeacher(unwrap(model), config.consistency_weight, config.consistency_rampup, config.ema_decay,
                                   config.consistency_loss, config.pseudo_label_threshold)
    trainer = Trainer(model, loss, optimizer, loader, val_cases, config, run_dir, device,
                      info.foreground_names, run_info, place, after_epoch=after_epoch,
                      unlabelled_loader=unlabelled_loader, mean_teacher=mean_teacher)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        say(f"Resuming {run_dir} after epoch {trainer.epoch}")
    return trainer, {"config": config.to_dict(), "versions": versions(), "processes": place.world_size, **run_info}


def train(config: Config, argv: list[str] | None, place: Place,
          after_epoch: Callable[[dict], None] | None = None) -> Trainer:
    """Train as `config` says; return the Trainer, which has run. Under torchrun, one process of
    several. `after_epoch` gets each epoch's row of metrics.csv (a sweep's pruner).

    config.json is written before the first epoch and again at the end, however the run ends
    (finished, early stopping, time limit, Ctrl-C, a NaN loss), with its peak memory and why it
    stopped; then report.html."""
    trainer, run_config = prepare_training(config, argv, place, after_epoch)
    config, run_dir = trainer.config, trainer.run_dir       # as resolved: resumed, device defaults
    earlier = read_json(run_dir / "config.json") if config.resume else {}
    command = shlex.join(["python", "main.py", *(sys.argv[1:] if argv is None else argv)])
    run_config.update(commands=[*earlier.get("commands", []), command],
                      started=earlier.get("started", datetime.now().isoformat(timespec="seconds")),
                      device=str(place.device), precision=precision_name(place.device, config.mixed_precision))
    if place.is_main:
        write_json(run_dir / "config.json", run_config)
    reset_peak(place.device)
    stopped, finished = "stopped by an error", False
    try:
        trainer.training_loop()
        stopped, finished = trainer.stop_reason, True
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C)"
        raise
    except optuna.TrialPruned:
        stopped = "pruned by the sweep"
        raise
    except NonFiniteLossError:
        stopped = "the training loss became NaN or infinite"
        raise
    finally:
        trainer.run_log.close()
        peaks = peak_memory(place.device)
        if place.is_main:
            best = trainer.best_metric if math.isfinite(trainer.best_metric) else None
            write_json(run_dir / "config.json", {**run_config, "peak_memory": peaks, "stopped": stopped,
                                                 "epochs_trained": trainer.epoch, "best_dice_mean": best,
                                                 "minutes_trained": round(trainer.minutes_trained(), 3)})
            write_run_report(config, trainer, evaluate_best=finished)
    trainer.say(f"Done. Best validation mean Dice {trainer.best_metric:.4f}, {describe_peak(peaks)}; checkpoints, "
                f"metrics.csv, config.json and report.html are in {run_dir}")
    return trainer


def write_run_report(config: Config, trainer: Trainer, evaluate_best: bool) -> None:
    """report.html. After a run that ended normally, with best.pt's predictions of the validation
    cases for "where it fails" (one more validation); after Ctrl-C or an error, without them, at
    once. A report that cannot be written is reported, never raised over what stopped the run."""
    try:
        failures = None
        if evaluate_best and (trainer.run_dir / "best.pt").is_file():
            model, _, _ = trained_model(dataclasses.replace(config, train_from_checkpoint=None), trainer.device)
            result = evaluate(model, trainer.val_cases, trainer.device, trainer.autocast, trainer.class_names,
                              mirror=config.tta, roi_size=config.patch_size)
            failures = failure_cases(result, trainer.val_cases, "validation")
        path = write_report(trainer.run_dir, trainer.class_names, failures)
        trainer.say(f"Report: {path}")
    except Exception as error:          # e.g. out of memory, a full disk: the checkpoints are saved
        trainer.say(f"Note: report.html was not written ({type(error).__name__}: {error}). Write it with "
                    f"-evaluate True -best_models_dir {trainer.run_dir}.")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, content: dict) -> None:
    """Written whole to a temporary file, then renamed over `path`: never half a file."""
    with written_atomically(path) as file:
        file.write(json.dumps(content, indent=2))


def find_learning_rate(config: Config, argv: list[str] | None, place: Place) -> None:
    """-lr_find: the range test on this run's model, loss, precision and augmented batches; writes
    lr_find.csv and lr_find.png to the run folder and prints the suggested -lr. No training, no
    checkpoint: the weights it starts from (-train_from_checkpoint) are only read."""
    if place.distributed:
        raise UserError("-lr_find runs in one process: start it with python main.py, not torchrun.")
    trainer, _ = prepare_training(config, argv, place)
    test = range_test(trainer)
    csv_path, png_path = write_range_test(test, trainer.run_dir)
    print(f"Range test: {len(test.lrs)} steps from lr {test.lrs[0]:.2g} to {test.lrs[-1]:.2g}"
          + (" (stopped: the loss diverged)" if test.diverged else "") + f"; {csv_path}, {png_path}")
    if test.suggestion is None:
        raise UserError("The range test's loss did not fall anywhere, so it suggests no learning rate. "
                        f"Look at {png_path}; try -lr_find with more data per step (-batch_size) or check the data.")
    print(f"suggested -lr {test.suggestion:.3g} ({SUGGESTION_RULE})")


def trained_model(config: Config, device: torch.device) -> tuple[torch.nn.Module, dict, Path]:
    """The model of -train_from_checkpoint (default: the run folder's best.pt), ready for inference."""
    path = Path(config.train_from_checkpoint or Path(config.best_models_dir) / "best.pt")
    state = load_checkpoint(path)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state, path


def evaluate_checkpoint(config: Config, argv: list[str] | None) -> Path:
    """Measure a checkpoint on its run's validation (or training) cases, with and without
    post-processing; write a per-case CSV and a summary next to the checkpoint."""
    device = choose_device(config.device)
    model, state, path = trained_model(config, device)
    # The run's data, as it read it, unless this command line names other data.
    data = {"label_names": None, "cache_dir": config.cache_dir, **state["config"], **explicit_options(argv)}
    info = read_data(data["data_dir"], config.task, config.google_id, data["label_names"])
    if info.num_classes != state["model_config"]["out_channels"]:
        raise CheckpointError(f"{path} predicts {state['model_config']['out_channels']} classes but "
                              f"{info.task_dir} has {info.num_classes}. Use a checkpoint of this task.")
    cases, _ = load_cases(info, downsampling_factor(state["model_config"]),
                          preprocessing=Preprocessing.from_dict(state["preprocessing"]), cache_dir=data["cache_dir"])
    cases = cases.subset(state["split"][config.evaluate_split])
    autocast = autocast_for(device, config.mixed_precision)
    evaluation = evaluate(model, cases, device, autocast, info.foreground_names, distances=True,
                          also_postprocessed=True, mirror=config.tta,     # one inference, scored both ways
                          roi_size=state["config"].get("patch_size"))
    rows, summary_rows = [], []
    for postprocessed, result in ((False, evaluation), (True, evaluation["postprocessed"])):
        rows += [{"postprocessed": postprocessed, **row} for row in result["rows"]]
        summary_rows += [{"postprocessed": postprocessed, "metric": key.split("_", 1)[0],
                          "class": key.split("_", 1)[1], "mean": round(mean, 4), "std": round(std, 4),
                          "cases": measured}
                         for key, (mean, std, measured) in result["summary"].items()]
    stem = path.parent / f"evaluation_{config.evaluate_split}"
    for rows_, file in ((rows, f"{stem}.csv"), (summary_rows, f"{stem}_summary.csv")):
        with written_atomically(file, newline="") as handle:     # an earlier evaluation stays whole
            writer = csv.DictWriter(handle, fieldnames=list(rows_[0]))
            writer.writeheader()
            writer.writerows(rows_)
    print(f"{len(cases)} {config.evaluate_split} cases of {path} (mean ± std; distances in mm):")
    for row in summary_rows:
        undefined = len(cases) - row["cases"]     # e.g. a distance to a class the prediction misses
        print(f"  {'post-processed' if row['postprocessed'] else 'raw':>14}  {row['metric']:>4} "
              f"{row['class']:<10} {row['mean']:.4f} ± {row['std']:.4f}"
              + (f"  (over {row['cases']} cases: undefined for {undefined})" if undefined else ""))
    print(f"Per-case results: {stem}.csv; summary: {stem}_summary.csv")
    report = write_report(path.parent, info.foreground_names,
                          failure_cases(evaluation, cases, config.evaluate_split),
                          {"split": config.evaluate_split, "checkpoint": path, "cases": len(cases),
                           "summary": {False: evaluation["summary"], True: evaluation["postprocessed"]["summary"]}})
    print(f"Report: {report}")
    return path.parent


def predict(config: Config) -> int:
    """Segment -predict (a file or folder) into -predictions_dir; 1 if any file failed."""
    device = choose_device(config.device)
    model, state, _ = trained_model(config, device)
    failures = predict_files(model, config.predict, config.predictions_dir,
                             Preprocessing.from_dict(state["preprocessing"]),
                             downsampling_factor(state["model_config"]), device,
                             autocast_for(device, config.mixed_precision),
                             state["model_config"]["in_channels"], state["model_config"]["out_channels"],
                             postprocess=config.postprocess, mirror=config.tta,
                             training_extent_mm=state.get("training_extent_mm"),
                             roi_size=state["config"].get("patch_size"))
    return 1 if failures else 0


def run(config: Config, argv: list[str] | None = None) -> int:
    refuse_mode_combinations(config, argv)
    if config.predict is not None:
        return predict(config)
    if config.evaluate:
        evaluate_checkpoint(config, argv)
        return 0
    if config.sweep is not None:
        place = start(choose_device(config.device))
        if place.distributed:
            raise UserError("-sweep runs its trials one after another in each process: start several "
                            "processes with python main.py (README: Experiments), not torchrun.")
        words = list(sys.argv[1:] if argv is None else argv)
        run_sweep(config, words, lambda trial_config, trial_argv, report: train(trial_config, trial_argv, place, report),
                  place.device)
        return 0
    place = start(choose_device(config.device))
    try:
        if config.lr_find:
            find_learning_rate(config, argv, place)
            return 0
        train(config, argv, place)
        # Under torchrun, the first process may still be writing checkpoints and pictures: wait for
        # it, because gloo aborts a process whose peer takes the group down under it.
        barrier(place)
    finally:
        stop(place)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return run(config, argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except NonFiniteLossError as error:
        print(f"error: {error} The last good checkpoints in {config.best_models_dir} are kept.", file=sys.stderr)
        return 1
    except OSError as error:   # e.g. a full disk while writing metrics.csv or a picture
        print(f"error: {error}. Checkpoints already saved in {config.best_models_dir} are intact; free "
              f"some space or fix the permissions, then continue with -resume True.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if config.sweep is not None:
            print("\nSweep interrupted; the trial that was running is recorded as interrupted and will run "
                  "again. Continue the sweep with the same command.", file=sys.stderr)
            return 130
        print(f"\nInterrupted. The last completed epoch is saved in {config.best_models_dir}/last.pt; "
              f"continue with: python main.py -best_models_dir {config.best_models_dir} -resume True",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
