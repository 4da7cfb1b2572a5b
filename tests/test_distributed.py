"""DDP with torchrun: 2 CPU processes (gloo on 127.0.0.1) on tiny synthetic data."""
import csv
import socket
import subprocess
import sys
from pathlib import Path
from collections import Counter

import pytest
import torch

import main as entry
from conftest import ROOT, TINY, learning_figures, write_task
from utils.training.checkpoint import load_checkpoint
from utils.data.cache import load_cases
from utils.data.layouts import read_task
from utils.data import sampling
from utils.data.sampling import EvenSampler
from utils.inference.evaluation import autocast_for, evaluate
from utils.training.networks import build_model, last_layer


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
            batches = [indices[step * batch:(step + 1) * batch] for indices in per_rank]
            if n >= batch * world:
                where = f"epoch {epoch} step {step}"
                assert not set(batches[0]) & set(batches[1]), f"{where}: a case on both ranks"
                assert all(len(set(cases)) == batch for cases in batches), f"{where}: a case twice on a rank"
        counts = Counter(per_rank[0] + per_rank[1])
        assert max(counts.get(i, 0) for i in range(n)) - min(counts.get(i, 0) for i in range(n)) <= 1
        totals.update(counts)
    assert max(totals.values()) - min(totals.get(i, 0) for i in range(n)) <= 1


@pytest.mark.parametrize("Nit", [250, 251])
def test_a_global_batch_larger_than_the_training_set_keeps_the_draws(monkeypatch, Nit):
    # 100 cases, 2 x 64 per step: repeats within a step can't be avoided. The ranks together must
    # still draw exactly what was drawn (even counts), each case at most ceil(128 / 100) = 2 times
    # a step. (The former swapping took minutes per epoch here.)
    n, batch, world = 100, 64, 2
    samplers = [EvenSampler(n, Nit * batch * world, seed=5, batch_size=batch, rank=r, world_size=world)
                for r in range(world)]
    unspread = EvenSampler(n, Nit * batch * world, seed=5, batch_size=batch * world)
    for epoch in range(3):
        per_rank = [list(iter(s)) for s in samplers]
        with monkeypatch.context() as patch:
            patch.setattr(sampling, "spread_repeats", lambda indices, window: None)
            drawn = list(iter(unspread))
        counts = Counter(per_rank[0] + per_rank[1])
        assert counts == Counter(drawn)
        q = Nit * batch * world // n
        assert set(counts.values()) <= {q, q + 1} and len(counts) == n
        for step in range(Nit):
            cases = [i for indices in per_rank for i in indices[step * batch:(step + 1) * batch]]
            assert max(Counter(cases).values()) <= 2, f"epoch {epoch} step {step}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*options, script=(str(ROOT / "main.py"),)):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script, *options],
                          cwd=Path.cwd(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
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
    written = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents"))
    assert written == sorted(["best.pt", "last.pt", "metrics.csv", "config.json", "curves.png", "predictions.png",
                              "progress.gif", "report.html"])
    assert len(list(run.glob("events.out.tfevents*"))) <= 1        # TensorBoard: the first process only
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


@pytest.mark.slow
def test_resume_and_fine_tune_under_torchrun(tmp_path):
    task = write_task(tmp_path / "data", n_cases=10)
    common = ["-data_dir", str(task), *TINY, "-train_val_ratio", "0.6", "-fine_tune", "True"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    done = torchrun(*common, "-best_models_dir", str(whole), "-epochs", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    # Both processes are killed (kill -9) at their 5th step, in epoch 3; then the run is resumed.
    done = torchrun("kill_in_step", "5", *common, "-best_models_dir", str(run), "-epochs", "4",
                    script=(str(ROOT / "tests" / "fault_runner.py"),))
    assert done.returncode != 0
    assert done.stdout.count("Fine-tuning the last layer only") == 1
    first = load_checkpoint(run / "last.pt")
    assert first["epoch"] == 2
    done = torchrun("-best_models_dir", str(run), "-resume", "True")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming" in done.stdout and "Note:" not in done.stdout          # same processes, same streams
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 4 and after["config"]["fine_tune"]
    assert learning_figures(run) == learning_figures(whole)
    model = build_model(after["model_config"])
    last = {f"{name}.{p}" for name, module in model.named_modules() if module is last_layer(model)
            for p, _ in module.named_parameters()}
    changed = {k for k in first["model"] if not torch.equal(first["model"][k], after["model"][k])}
    assert changed == last                                                   # still only the last layer


@pytest.mark.slow
def test_a_nan_in_one_process_stops_every_process_with_the_message(tmp_path):
    task = write_task(tmp_path / "data", n_cases=10)
    done = torchrun("nan_in_rank_1", "3", "-data_dir", str(task), *TINY, "-train_val_ratio", "0.6",
                    "-best_models_dir", str(tmp_path / "run"), "-mixed_precision", "False",
                    script=(str(ROOT / "tests" / "fault_runner.py"),))
    assert done.returncode != 0
    assert done.stderr.count("error: The training loss became") == 2, done.stderr[-3000:]   # both processes
    assert "NaN or infinite in another process at epoch 2, iteration 1" in done.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1      # the last good epoch is kept


def test_a_prefixed_checkpoint_loads(tmp_path):
    task = write_task(tmp_path / "data", n_cases=8)
    assert entry.main(["-data_dir", str(task), *TINY, "-best_models_dir", str(tmp_path / "a")]) == 0
    state = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "prefixed.pt")
    assert not any(k.startswith("module.") for k in load_checkpoint(tmp_path / "prefixed.pt")["model"])


@pytest.mark.slow
def test_a_dynunet_with_deep_supervision_trains_under_torchrun(tmp_path):
    # Its training outputs are stacked heads; every head's parameters get gradients in each
    # process, so DDP's gradient averaging covers them all.
    task = write_task(tmp_path / "data", n_cases=10)
    run = tmp_path / "run"
    done = torchrun("-data_dir", str(task), "-batch_size", "2", "-Nit", "2", "-epochs", "2", "-lr", "0.01",
                    "-device", "cpu", "-train_val_ratio", "0.6", "-architecture", "dynunet", "-channels", "4", "8",
                    "-patch_size", "32", "32", "32", "-best_models_dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["model_config"]["architecture"] == "dynunet"
    assert state["model_config"]["deep_supervision_heads"] >= 1
