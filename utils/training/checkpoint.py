"""Checkpoints: what they hold, written atomically, read safely, in one format version.

A checkpoint is one dict: model, optimizer, scheduler, scaler, epoch, best_metric, history,
config (every argument), split (case ids), preprocessing, model_config and rng states: what the
Trainer needs to continue (`training_state`, `restore_training`), and what -evaluate, -predict and
fine-tuning need to rebuild the network and its preprocessing (`trained_model`).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from utils.errors import CheckpointError, UserError
from utils.files import written_atomically
from utils.training.distributed import gather
from utils.training.networks import build_model

REQUIRED_KEYS = ("model", "model_config", "preprocessing")
# The layout of the dict. Version 1 is every checkpoint written before the version was recorded;
# `upgraded` brings an older version to this one, the only one the rest of the package reads.
FORMAT_VERSION = 2


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to a temporary file beside `path`, then rename it over `path`.

    A crash or a full disk leaves the previous file untouched: the rename happens only after the
    new file is completely written and flushed.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):   # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    try:
        with written_atomically(path, "wb") as file:
            torch.save(state, file)
    except OSError as error:
        kept = f"The previous {path.name} is intact. " if path.exists() else ""
        raise CheckpointError(f"Could not write {path} ({error.strerror or error}). {kept}Free some disk "
                              f"space or make {path.parent} writable, then continue with -resume True "
                              f"(or pick another -best_models_dir).") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True, so a file from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on a file that isn't a checkpoint
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a checkpoint this program can read safely ({first_line}). "
                              f"Pass a best.pt or last.pt written by main.py.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        # Weights saved from a DistributedDataParallel wrapper elsewhere carry a "module." prefix.
        consume_prefix_in_state_dict_if_present(state["model"], "module.")
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this program "
                              f"(it lacks {[k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]}). "
                              f"Pass a best.pt or last.pt written by main.py.")
    return upgraded(state, path)


def upgraded(state: dict, path: str | Path) -> dict:
    """`state` in FORMAT_VERSION's layout: the one place that knows older layouts. Version 1
    (unversioned) may lack, by age: the network's name (U-Nets saved before -architecture), the
    training scans' extent (read as their shape at Task04's 1 mm), the labelled share, the unlabelled
    scans and the teacher's step count (kept at the top level then)."""
    version = state.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this program reads versions 1 to "
                              f"{FORMAT_VERSION}. Use the version of this program that wrote it, or a newer one.")
    if version == 1:
        config = state["model_config"]
        if "architecture" not in config and "strides" in config:
            state["model_config"] = {"architecture": "unet", **config, "input_divisor": math.prod(config["strides"])}
        state.setdefault("training_extent_mm", [float(side) for side in state["preprocessing"]["target_shape"]])
        if "split" in state:
            state.setdefault("labelled", state["split"]["train"])
        state.setdefault("unlabelled_ids", None)
        if "mean_teacher" in state:
            state.setdefault("steps", 0)
            state["mean_teacher"].setdefault("updates", 1)     # its teacher had been averaged (not counted)
        state["format_version"] = FORMAT_VERSION
    return state


def run_info(data, model_config: dict, class_weights: dict, unlabelled_ids: list[str] | None) -> dict:
    """What every checkpoint and config.json of a run keeps besides the weights: the split and the
    labelled share, the preprocessing and the network to rebuild, the training scans' extent (for
    -predict's field-of-view warning), the class names and weights, and the data's fingerprint."""
    return {"split": data.split, "labelled": data.labelled, "unlabelled_ids": unlabelled_ids,
            "preprocessing": data.preprocessing.to_dict(), "model_config": model_config,
            "training_extent_mm": data.cases.extent_mm(),
            "label_names": {str(k): v for k, v in data.info.label_names.items()},
            "fingerprint": data.cases.fingerprint,      # spacings, shapes, intensities; target_spacing
            **class_weights}


def claim_run_folder(run_dir: str | Path, continuing: bool) -> Path:
    """The run folder, created; a new run (not `continuing` one) is refused a folder that already
    holds a run, whose checkpoints it would overwrite."""
    run_dir = Path(run_dir)
    if not continuing and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run (last.pt); starting over would overwrite it. "
                        f"Continue it with -resume True, or choose another -best_models_dir.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create the run folder -best_models_dir {run_dir} ({error.strerror}). "
                        f"Choose a folder you can write to.") from None
    return run_dir


def resumable_run(run_dir: str | Path) -> dict:
    """The last.pt of the interrupted run in `run_dir`, or a sentence saying there is none."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"Nothing to resume: {last} does not exist. Start a new run without "
                              f"-resume, or point -best_models_dir at the folder of the run to continue.")
    return load_checkpoint(last)


def training_state(trainer) -> dict:
    """Everything `trainer` (utils/trainer_class.py) needs to continue, as one dict. Under torchrun
    every process takes part: the random states of all of them are gathered."""
    sampler, log = trainer.train_loader.sampler, trainer.run_log
    return {
        "format_version": FORMAT_VERSION,
        "model": trainer.network.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "best_metric": trainer.best_metric,
        "epochs_without_improvement": trainer.epochs_without_improvement,
        "minutes_trained": trainer.minutes_trained(),
        "history": log.history,
        "progress_frames": log.progress_frames,
        "config": trainer.config.to_dict(),
        **trainer.run_info,
        "rng": {"processes": gather(rng_states(), trainer.place), "device": trainer.device.type,
                "sampler": sampler.state_dict(), "loader": trainer.train_loader.generator.get_state()},
        **(trainer.extra_loss.state_dict() if trainer.extra_loss is not None else {}),
    }


def restore_training(trainer, state: dict) -> None:
    """Continue `trainer` exactly where `state` (a last.pt) left off."""
    trainer.network.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(state["scaler"])
    # (Otherwise the run was saved without fp16, e.g. on a CPU, and continues with a fresh
    # scaler; or it continues without fp16, where the scaler is off.)
    trainer.epoch, trainer.best_metric = state["epoch"], state["best_metric"]
    trainer.epochs_without_improvement = state["epochs_without_improvement"]
    trainer.minutes_before = state["minutes_trained"]
    trainer.run_log.history = list(state["history"])
    trainer.run_log.progress_frames = list(state["progress_frames"])
    trainer.train_loader.sampler.load_state_dict(state["rng"]["sampler"])
    trainer.train_loader.generator.set_state(state["rng"]["loader"])
    if trainer.extra_loss is not None:
        trainer.extra_loss.load_state_dict(state)
    # Each process continues its own random stream when the processes and device are the same.
    processes, saved_on = state["rng"]["processes"], state["rng"].get("device", trainer.device.type)
    place = trainer.place
    if len(processes) == place.world_size:
        set_rng_states(processes[place.rank])
    if len(processes) != place.world_size or saved_on != trainer.device.type:
        trainer.say(f"Note: this run was saved by {len(processes)} process(es) on {saved_on} and continues "
                    f"with {place.world_size} on {trainer.device.type}, so its random streams (and "
                    f"arithmetic) differ from an uninterrupted run's: the result is equivalent, not identical.")


def trained_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network saved in the checkpoint at `path`, ready for inference, and the checkpoint."""
    state = load_checkpoint(path)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def rng_states() -> dict:
    """Every global random generator's state, in types weights_only loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Restore `rng_states()`. The CUDA states are restored for the GPUs this machine has: none
    on a CPU, and the first ones when it has fewer GPUs than the one that saved them."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
