"""Checkpoint files: written atomically, read safely.

A checkpoint is one dict: model, optimizer, scheduler, scaler, epoch, best_metric, history,
config (every argument), split (case ids), preprocessing, model_config and rng states.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from utils.errors import CheckpointError
from utils.files import written_atomically
from utils.training.networks import saved_model_config

REQUIRED_KEYS = ("model", "model_config", "preprocessing")


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
    state["model_config"] = saved_model_config(state["model_config"])    # U-Nets saved before -architecture
    return state


def check_same_model(state: dict, expected: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose network differs from the one built for this data and config."""
    saved = state["model_config"]
    if saved.get("architecture") != expected["architecture"]:
        raise CheckpointError(f"{path} holds a {saved.get('architecture')} network, not a "
                              f"{expected['architecture']}. Leave -architecture out to continue from it, or "
                              f"pass a checkpoint of a {expected['architecture']}.")
    different = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if different:
        lines = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in different.items())
        raise CheckpointError(f"{path} holds a different network ({lines}). Use a checkpoint trained "
                              f"for this task, or leave out (or set to match it) -channels, -num_res_units, "
                              f"-deep_supervision and -patch_size, which otherwise come from its run.")


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
