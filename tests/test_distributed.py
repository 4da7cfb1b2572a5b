"""DDP with torchrun: 2 CPU processes (gloo on 127.0.0.1) on tiny synthetic data."""
import csv
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch

import main as entry
from conftest import ROOT, TINY, write_task
from utils.checkpoint import load_checkpoint
from utils.data_class import load_cases, read_task
from utils.sampling import EvenSampler
from utils.evaluation import autocast_for, evaluate
from utils.model import build_model


@pytest.mark.parametrize("n, batch, Nit", [(20, 3, 4), (20, 4, 5), (9, 2, 7), (7, 4, 3)])
def test_ranks_draw_disjoint_cases_and_cover_evenly(n, batch, Nit):
    world = 2
    samplers = [EvenSampler(n, Nit * batch * world, seed=5, batch_size=batch, rank=r, world_size=world)
                for r in range(world)]
    totals = Counter()
    for epoch in range(12):
        per_rank = [list(iter(s)) for s in samplers]
        assert all(len(indices) == len(s) == Nit * batch for indices, s in zip(per_rank, samplers))
        for step in range(Nit):
            batches = [set(indices[step * batch:(step + 1) * batch]) for indices in per_rank]
            if n >= batch * world:
                assert not batches[0] & batches[1], f"epoch {epoch} step {step}: a case on both ranks"
        counts = Counter(per_rank[0] + per_rank[1])
        assert max(counts.get(i, 0) for i in range(n)) - min(counts.get(i, 0) for i in range(n)) <= 1
        totals.update(counts)
    assert max(totals.values()) - min(totals.get(i, 0) for i in range(n)) <= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*options):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "main.py", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_processes_train_and_agree_with_a_single_process(tmp_path):
    task = write_task(tmp_path / "data", n_cases=10)
    base = tmp_path / "single"
    common = ["-data_dir", str(task), *TINY, "-device", "cpu", "-mixed_precision", "False", "-train_val_ratio", "0.6"]
    assert entry.main([*common, "-best_models_dir", str(base)]) == 0

    run = tmp_path / "ddp"
    done = torchrun(*common, "-best_models_dir", str(run), "-epochs", "3",
                    "-train_from_checkpoint", str(base / "best.pt"))   # a single-process checkpoint
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Done. Best validation mean Dice") == 1        # one process speaks
    assert "on each of 2 processes" in done.stdout
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.pt", "last.pt", "metrics.csv", "config.json", "curves.png", "predictions.png", "progress.gif"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]

    # The sharded, gathered validation equals a single-process evaluation of the saved weights.
    state = load_checkpoint(run / "last.pt")
    assert not any(key.startswith("module.") for key in state["model"])
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    cases, _ = load_cases(read_task(task), 2, progress=False)
    result = evaluate(model, cases.subset(state["split"]["val"]), torch.device("cpu"),
                      autocast_for(torch.device("cpu"), False), ["Anterior", "Posterior"], mirror=True)
    assert float(rows[-1]["dice_Anterior"]) == pytest.approx(result["dice"][0].item(), abs=1e-6)
    assert float(rows[-1]["dice_Posterior"]) == pytest.approx(result["dice"][1].item(), abs=1e-6)
    assert len(state["rng"]["processes"]) == 2

    # And the DDP checkpoint continues in a single process.
    assert entry.main([*common, "-best_models_dir", str(tmp_path / "after"),
                       "-train_from_checkpoint", str(run / "best.pt")]) == 0


def test_resume_and_fine_tune_under_torchrun(tmp_path):
    task = write_task(tmp_path / "data", n_cases=10)
    run = tmp_path / "run"
    common = ["-data_dir", str(task), *TINY, "-device", "cpu", "-train_val_ratio", "0.6"]
    done = torchrun(*common, "-best_models_dir", str(run), "-fine_tune", "True", "-early_stopping", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Fine-tuning the last layer only") == 1
    done = torchrun("-best_models_dir", str(run), "-resume", "True", "-epochs", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(run / "last.pt")["epoch"] >= 2


def test_a_prefixed_checkpoint_loads(tmp_path):
    task = write_task(tmp_path / "data", n_cases=8)
    assert entry.main(["-data_dir", str(task), *TINY, "-best_models_dir", str(tmp_path / "a")]) == 0
    state = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "prefixed.pt")
    assert not any(k.startswith("module.") for k in load_checkpoint(tmp_path / "prefixed.pt")["model"])
