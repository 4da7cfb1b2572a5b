"""Where and how reproducibly the code runs: device choice, seeds, library versions."""
from __future__ import annotations

import platform
import random

import monai
import numpy as np
import torch
import torchio

from utils.errors import UserError


def choose_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for cuda without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda was requested but PyTorch sees no CUDA GPU on this machine "
                        f"(torch {torch.__version__}). Use -device cpu, or -device auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (torch.manual_seed seeds every GPU's too).

    Not monai.utils.set_determinism(seed): its seeding is these same three calls (the same draws
    follow, tests/test_reliability.py), but it also sets torch.backends.cudnn.deterministic = True
    and cudnn.benchmark = False for the whole process, which would undo main.py's
    cudnn.benchmark = True (every training batch has one shape, so cuDNN's kernel search pays off).
    What that costs on a GPU is not measured yet (no GPU in the session that checked this)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "torchio": torchio.__version__, "numpy": np.__version__}
