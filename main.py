"""Train a 3D segmentation network (MONAI's U-Net by default) on MSD Task04 (hippocampus), evaluate
it, or apply it to new scans. The command line's wiring: one small function per mode, each calling
builders that live with their concern in utils/.

    python main.py -mixed_precision True -Nit 250
    python main.py -fine_tune True -train_from_checkpoint best_models/best.pt
    python main.py -evaluate True -train_from_checkpoint best_models/best.pt
    python main.py -predict scans/ -train_from_checkpoint best_models/best.pt -predictions_dir out
"""
from __future__ import annotations

import math
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable

import optuna
import torch

from utils.args import (Config, command_line, for_device, layered, options, parse_args, refuse_mode_combinations,
                        refuse_options_that_do_not_apply)
from utils.data.preprocessing import Preprocessing
from utils.data_class import build_data
from utils.errors import UserError
from utils.experiments.lr_finder import find_learning_rate
from utils.experiments.sweep import run_sweep
from utils.files import read_json, write_json
from utils.inference.evaluate_run import evaluate_checkpoint, write_run_report
from utils.inference.evaluation import autocast_for, precision_name, precision_note
from utils.inference.prediction import predict_files
from utils.trainer_class import NonFiniteLossError, Trainer, make_optimizer, memory_format
from utils.training.checkpoint import claim_run_folder, load_checkpoint, resumable_run, run_info, trained_model
from utils.training.distributed import Place, barrier, start, stop, wrap
from utils.training.environment import choose_device, seed_everything, versions
from utils.training.losses import class_weights_of_run, make_loss
from utils.training.memory import describe_peak, peak_memory, reset_peak
from utils.training.networks import build_network, downsampling_factor, training_outputs
from utils.training.semi_supervised import mean_teacher_term


def prepare_training(config: Config, place: Place, after_epoch: Callable[[dict], None] | None = None
                     ) -> tuple[Trainer, dict]:
    """Everything a training run needs, ready to start: the data, the network, the loss, the
    Trainer; and the contents of its config.json. Nothing is written yet but the run folder."""
    say = print if place.is_main else lambda *args, **kwargs: None
    saved = None                        # the checkpoint the run continues (-resume) or starts from
    if config.resume:
        saved = resumable_run(config.best_models_dir)
        config = layered(config.typed, saved["config"])
    elif config.train_from_checkpoint:
        saved = load_checkpoint(config.train_from_checkpoint)
        network = {name: saved["config"][name] for name in options(network=True) if name in saved["config"]}
        config = layered(config.typed, config.to_dict(), network)      # the checkpoint's network
    refuse_options_that_do_not_apply(config)
    config = for_device(config, place.device.type)      # e.g. the batch size, if not given
    if place.device.type == "cuda":
        # Every training batch has one shape (the crop), so cuDNN's search for its fastest
        # kernels pays off; validation adds only a few window shapes.
        torch.backends.cudnn.benchmark = True
    seed_everything(config.random_seed + place.rank)   # each process augments differently
    run_dir = claim_run_folder(config.best_models_dir, continuing=config.resume or config.lr_find)

    resumed = saved if config.resume else None
    data = build_data(config, place, resumed, say)
    model, architecture = build_network(config, data.info.in_channels, data.info.num_classes,
                                        data.preprocessing.spacing, saved,
                                        run_dir / "last.pt" if config.resume else config.train_from_checkpoint, say)
    say(f"Device {place.device}, precision {precision_name(place.device, config.mixed_precision)}, batch "
        f"{config.batch_size}" + (" per process" if place.distributed else "") + precision_note(place.device, config))
    model.to(place.device, memory_format=memory_format(config))
    optimizer = make_optimizer(model, config)
    wrapped = wrap(model, place)           # DDP under torchrun, the network itself otherwise

    weights = class_weights_of_run(config.class_weights, data.info, data.train_cases, resumed, say)
    unlabelled = data.unlabelled_loader
    info = run_info(data, architecture, weights, unlabelled.dataset.cases.ids if unlabelled is not None else None)
    loss = make_loss(config.loss, weights["class_weights"], training_outputs(architecture))
    consistency = None if not config.mean_teacher else mean_teacher_term(
        config, model, wrapped, optimizer, unlabelled, autocast_for(place.device, config.mixed_precision),
        place.device, memory_format(config))
    trainer = Trainer(wrapped, loss, optimizer, data.loader, data.val_cases, config, run_dir, place.device,
                      data.info.foreground_names, info, place, after_epoch=after_epoch, extra_loss=consistency)
    if resumed is not None:
        trainer.load_state_dict(resumed)
        say(f"Resuming {run_dir} after epoch {trainer.epoch}")
    return trainer, {"config": config.to_dict(), "versions": versions(), "processes": place.world_size, **info}


def train(config: Config, place: Place, after_epoch: Callable[[dict], None] | None = None) -> Trainer:
    """Train as `config` says; return the Trainer, which has run. Under torchrun, one process of
    several. `after_epoch` gets each epoch's row of metrics.csv (a sweep's pruner).

    config.json is written before the first epoch and again at the end, however the run ends
    (finished, early stopping, time limit, Ctrl-C, a NaN loss), with its peak memory and why it
    stopped; then report.html."""
    trainer, run_config = prepare_training(config, place, after_epoch)
    config, run_dir = trainer.config, trainer.run_dir       # as resolved: resumed, device defaults
    earlier = read_json(run_dir / "config.json") if config.resume else {}
    command = shlex.join(["python", "main.py", *command_line(config)])
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
            write_run_report(trainer, evaluate_best=finished)
    trainer.say(f"Done. Best validation mean Dice {trainer.best_metric:.4f}, {describe_peak(peaks)}; checkpoints, "
                f"metrics.csv, config.json and report.html are in {run_dir}")
    return trainer


def checkpoint_path(config: Config) -> Path:
    """-train_from_checkpoint, or by default the run folder's best.pt."""
    return Path(config.train_from_checkpoint or Path(config.best_models_dir) / "best.pt")


def predict(config: Config) -> int:
    """Segment -predict (a file or folder) into -predictions_dir; 1 if any file failed."""
    device = choose_device(config.device)
    model, state = trained_model(checkpoint_path(config), device)
    failures = predict_files(model, config.predict, config.predictions_dir,
                             Preprocessing.from_dict(state["preprocessing"]),
                             downsampling_factor(state["model_config"]), device,
                             autocast_for(device, config.mixed_precision),
                             state["model_config"]["in_channels"], state["model_config"]["out_channels"],
                             postprocess=config.postprocess, mirror=config.tta,
                             training_extent_mm=state["training_extent_mm"], roi_size=state["config"]["patch_size"])
    return 1 if failures else 0


def run(config: Config) -> int:
    refuse_mode_combinations(config)
    if config.predict is not None:
        return predict(config)
    if config.evaluate:
        path = checkpoint_path(config)           # its run's data, unless this command names other data
        data = layered(config.typed, config.to_dict(), load_checkpoint(path)["config"])
        evaluate_checkpoint(path, data, config.evaluate_split, choose_device(config.device), config.mixed_precision,
                            config.tta)
        return 0
    place = start(choose_device(config.device))
    if place.distributed and (config.sweep is not None or config.lr_find):
        raise UserError(f"-{'sweep' if config.sweep else 'lr_find'} runs in one process: start it with python "
                        f"main.py (several processes for a sweep: docs/experiments.md), not torchrun.")
    if config.sweep is not None:
        run_sweep(config, lambda trial_config, report: train(trial_config, place, report), place.device)
        return 0
    try:
        if config.lr_find:
            find_learning_rate(prepare_training(config, place)[0])
            return 0
        train(config, place)
        # Under torchrun, the first process may still be writing checkpoints and pictures: wait for
        # it, because gloo aborts a process whose peer takes the group down under it.
        barrier(place)
    finally:
        stop(place)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return run(config)
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
