"""Fixtures: tiny synthetic MSD-style tasks written to a temporary folder (no real data needed)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Options that make a run take seconds: a 2-level U-Net with few channels, few iterations. On the
# CPU, so that runs repeat bit for bit (and a machine with a GPU runs the same tests).
TINY = ["-channels", "4", "8", "-num_res_units", "0", "-batch_size", "2", "-Nit", "2", "-epochs", "2",
        "-lr", "0.01", "-device", "cpu"]


def learning_figures(run_dir: Path) -> list[dict]:
    """metrics.csv's rows without the memory columns (*_mb), which differ between identical runs."""
    rows = list(csv.DictReader(open(Path(run_dir) / "metrics.csv")))
    return [{key: value for key, value in row.items() if not key.endswith("_mb")} for row in rows]


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int], as_uint8: bool):
    """An image whose intensity follows a two-part label (1 anterior, 2 posterior), plus noise."""
    label = np.zeros(shape, np.uint8)
    cx, cy, cz = (s // 2 for s in shape)
    label[cx - 2:cx + 2, cy - 3:cy, cz - 2:cz + 2] = 1
    label[cx - 2:cx + 2, cy:cy + 3, cz - 2:cz + 2] = 2
    image = 100 + 60 * label + rng.normal(0, 10, shape)
    image = np.clip(image, 0, 255).astype(np.uint8) if as_uint8 else (image * 20).astype(np.float32)
    return image, label


def write_task(root: Path, n_cases: int = 8, seed: int = 0, name: str = "Task04_Hippocampus",
               affine: np.ndarray | None = None, two_channels: bool = False) -> Path:
    """Write an MSD-layout task folder (dataset.json, imagesTr/, labelsTr/) and return it; with
    `two_channels`, its images are 4D, channels last, with two modalities."""
    rng = np.random.default_rng(seed)
    task = root / name
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    affine = np.eye(4) if affine is None else affine
    training = []
    for i in range(n_cases):
        shape = tuple(int(s) for s in rng.integers([9, 11, 8], [13, 15, 12]))
        image, label = two_channel_case(rng, shape) if two_channels else synthetic_case(rng, shape, as_uint8=i % 3 == 0)
        case = f"{'case' if two_channels else 'hippocampus'}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), task / "imagesTr" / case)
        nib.save(nib.Nifti1Image(label, affine), task / "labelsTr" / case)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    meta = {"name": "TwoChannels" if two_channels else "Hippocampus",
            "modality": {"0": "T2", "1": "ADC"} if two_channels else {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": n_cases, "numTest": 0, "training": training, "test": []}
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task


def two_channel_case(rng: np.random.Generator, shape: tuple[int, int, int]):
    """A (X, Y, Z, 2) float32 image and its label: a T2-like channel (as `synthetic_case`) and an
    ADC-like one in the thousands, darker in the anterior part and brighter in the posterior."""
    t2, label = synthetic_case(rng, shape, as_uint8=False)
    adc = 1500 - 400 * (label == 1) + 400 * (label == 2) + rng.normal(0, 60, shape)
    return np.stack([t2, adc], axis=-1).astype(np.float32), label


def write_two_channel_task(root: Path, n_cases: int = 8, seed: int = 0, name: str = "Task98_TwoChannels",
                           affine: np.ndarray | None = None) -> Path:
    """Write an MSD-layout task whose images are 4D, channels last, with two modalities."""
    return write_task(root, n_cases, seed, name, affine, two_channels=True)


@pytest.fixture
def two_channel_task(tmp_path: Path) -> Path:
    return write_two_channel_task(tmp_path / "data")


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Mixed precision as on a GPU (fp16 autocast with an enabled GradScaler), emulated on the CPU,
    which torch supports, so the fp16 path is tested on machines without a GPU."""
    fp16 = lambda device: torch.float16
    monkeypatch.setattr("utils.inference.evaluation.amp_dtype", fp16)
    monkeypatch.setattr("utils.trainer_class.amp_dtype", fp16)


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    return write_task(tmp_path / "data")


def interrupt_validation(monkeypatch, at_call: int) -> None:
    """Make Trainer.validate raise KeyboardInterrupt (Ctrl-C) at its `at_call`-th call; undo it
    with monkeypatch.undo()."""
    from utils.trainer_class import Trainer
    original, calls = Trainer.validate, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "validate", interrupted)



@pytest.fixture(autouse=True)
def in_a_temporary_folder(tmp_path, monkeypatch):
    """Run each test in its own folder, so that relative default paths (-cache_dir preprocessed,
    -predictions_dir predictions) land there and not in the repository."""
    monkeypatch.chdir(tmp_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs main.py in subprocesses (torchrun, kill -9, several sweep "
                                       "processes, the notebook) or many runs in one (sweeps, every network end "
                                       "to end); "
                                       "`python -m pytest -q -m \"not slow\"` leaves them out")
