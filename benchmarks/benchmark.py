"""Training throughput, side by side in one run, on the same model and batch size.

    python benchmarks/benchmark.py -data_dir ../shared/data/Task04_Hippocampus

(a) reference: the TorchIO tutorial recipe as written: a SubjectsDataset that reads, preprocesses
    and augments every item every time, 2 loader workers, fp32;
(b) this project's training loop end to end (Trainer.train_one_epoch), augmentation on, defaults;
(c) the compute bound: forward_pass + backward_pass on one fixed batch.

Each part runs in its own process so that its peak memory (RSS) is its own. The parts take turns
for `--rounds` rounds (a, b, c, a, b, c, ...): on a shared, noisy machine the same part measured
from 8 to 12 it/s a few minutes apart, so each ratio is taken within a round, between parts run
one after the other, and the median over the rounds is reported. The last line is
`ratio_vs_reference X ratio_vs_bound Y` (b/a and b/c). Other options of main.py (e.g.
-num_workers, -channels, -mixed_precision) change (b) and (c).

To compare two settings of main.py in one run, give the second with --compare: (b) and (c) then
run with the options given and with those plus the compared ones, taking turns, and the last
line is the median over the rounds of base/compared:

    python benchmarks/benchmark.py -data_dir ../shared/data/Task04_Hippocampus --compare "-channels_last False"

benchmarks/time_to_dice.py measures what a user feels: the training time each pipeline needs
to reach a validation Dice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchio as tio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.training.environment import choose_device  # noqa: E402  (after the path above)
from utils.inference.evaluation import amp_dtype  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus its largest child (loader workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


@dataclasses.dataclass
class Tutorial:
    """The TorchIO tutorial's pipeline, as written, with this project's model and batch size: a
    SubjectsDataset that reads, preprocesses and augments every item every time, 2 loader
    workers, Dice loss on one-hot labels, AdamW at a constant 1e-2, fp32, whole volumes."""
    loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    preprocess: tio.Transform            # rescale to [-1, 1], crop/pad to one shape (no augmentation)
    val_subjects: list[tio.Subject]      # the validation cases of this project's split, unread
    class_names: list[str]               # foreground classes, e.g. Anterior, Posterior

    def step(self, batch: dict) -> None:
        loss = self.loss_fn(self.model(batch["image"][tio.DATA]), batch["label"][tio.DATA])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def tutorial_pipeline(config) -> Tutorial:
    from monai.losses import DiceLoss

    from utils.data_class import split_cases
    from utils.data.layouts import case_id, read_task
    from utils.training.networks import build_model, model_config

    info = read_task(config.data_dir)
    subjects = [tio.Subject(image=tio.ScalarImage(image), label=tio.LabelMap(label), id=case_id(image))
                for image, label in info.pairs]
    split = split_cases([s["id"] for s in subjects], config.train_val_ratio, config.random_seed)
    train = [s for s in subjects if s["id"] in set(split["train"])]
    val = [s for s in subjects if s["id"] in set(split["val"])]
    max_shape = tuple(max(tio.ScalarImage(i).shape[1 + axis] for i, _ in info.pairs) for axis in range(3))
    preprocess = tio.Compose([tio.RescaleIntensity((-1, 1)), tio.CropOrPad(max_shape), tio.EnsureShapeMultiple(8)])
    augment = tio.Compose([tio.RandomAffine(), tio.RandomGamma(p=0.5), tio.RandomNoise(p=0.5),
                           tio.RandomMotion(p=0.1), tio.RandomBiasField(p=0.25)])
    dataset = tio.SubjectsDataset(train, transform=tio.Compose([preprocess, tio.OneHot(), augment]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=2)
    model = build_model(model_config(1, info.num_classes, config.channels, config.num_res_units))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Tutorial(loader, model, DiceLoss(softmax=True), optimizer, preprocess, val, info.foreground_names)


def reference(config, iterations: int, warmup: int) -> float:
    tutorial = tutorial_pipeline(config)
    done, started = 0, None
    while done < warmup + iterations:
        for batch in tutorial.loader:
            if done == warmup:
                started = time.perf_counter()
            tutorial.step(batch)
            done += 1
            if done == warmup + iterations:
                break
    return iterations / (time.perf_counter() - started)


def project_trainer(config, Nit: int):
    """This project's Trainer, wired exactly as main.py wires it."""
    from utils.data.cache import load_cases
    from utils.data_class import split_cases, train_loader
    from utils.data.layouts import read_task
    from utils.training.environment import seed_everything
    from utils.training.networks import build_model, downsampling_factor, model_config
    from utils.trainer_class import Trainer, make_optimizer, memory_format
    from utils.training.losses import make_loss

    seed_everything(config.random_seed)
    info = read_task(config.data_dir)
    architecture = model_config(info.in_channels, info.num_classes, config.channels, config.num_res_units)
    cases, preprocessing = load_cases(info, downsampling_factor(architecture), progress=False)
    split = split_cases(cases.ids, config.train_val_ratio, config.random_seed)
    loader = train_loader(cases.subset(split["train"]), config.batch_size, Nit, config.augment,
                          config.num_workers, config.random_seed, config.patch_size,
                          foreground_crops=config.foreground_crops)
    model = build_model(architecture).to(memory_format=memory_format(config))
    optimizer = make_optimizer(model, config)
    return Trainer(model, make_loss(), optimizer, loader, cases.subset(split["val"]), config,
                   "/tmp", torch.device("cpu"), info.foreground_names, {})


def project(config, iterations: int, warmup: int) -> float:
    trainer = project_trainer(config, Nit=iterations)
    trainer.train_loader.sampler.samples_per_epoch = warmup * config.batch_size
    trainer.train_one_epoch()
    trainer.train_loader.sampler.samples_per_epoch = iterations * config.batch_size
    started = time.perf_counter()
    trainer.train_one_epoch()
    return iterations / (time.perf_counter() - started)


def bound(config, iterations: int, warmup: int) -> float:
    trainer = project_trainer(config, Nit=1)
    trainer.model.train()
    batch = next(iter(trainer.train_loader))
    for step in range(warmup + iterations):
        if step == warmup:
            started = time.perf_counter()
        loss, _ = trainer.forward_pass(batch)
        trainer.backward_pass(loss)
    return iterations / (time.perf_counter() - started)


PARTS = {"a": ("reference (TorchIO tutorial pipeline, fp32, 2 workers)", reference),
         "b": ("this project's training loop, augmentation on", project),
         "c": ("compute bound (fixed batch, forward + backward)", bound)}


def run_part(part: str, options: list[str], iterations: int, warmup: int) -> dict:
    """One part in a fresh process, so that its peak memory is its own:
    {'it_per_s', 'peak_rss_mb', 'load': the 1-minute load average at its end}."""
    done = subprocess.run([sys.executable, __file__, "--part", part, "--iterations", str(iterations),
                           "--warmup", str(warmup), *options], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"part {part} ({' '.join(options)}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_ratio(top: list[float], bottom: list[float]) -> float:
    """The median over the rounds of the ratio within a round."""
    return statistics.median(t / b for t, b in zip(top, bottom))


def settings(options: list[str]):
    """The Config that main.py would use with `options` on this machine."""
    from utils.args import for_device, parse_args
    config = parse_args(options)
    return for_device(config, choose_device(config.device).type)     # e.g. the batch size


def describe(config) -> str:
    low_precision = amp_dtype(choose_device(config.device)) if config.mixed_precision else None
    return (f"batch {config.batch_size}, channels {config.channels}, num_res_units {config.num_res_units}, "
            f"patch {config.patch_size}, (b) and (c) in {low_precision or torch.float32}, "
            f"channels_last {config.channels_last}, num_workers {config.num_workers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), help="run one part (used internally)")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per part (default: 100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each part; the ratios are medians over them (default: 3)")
    parser.add_argument("--compare", metavar="OPTIONS", default=None,
                        help='main.py options to compare with, in quotes, e.g. --compare "-channels_last False": '
                             "(b) and (c) run with and without them, taking turns, and the ratios are "
                             "medians over the rounds; (a) is not run (default: no comparison)")
    known, main_options = parser.parse_known_args()
    if known.part:
        config = settings(main_options)
        rate = PARTS[known.part][1](config, known.iterations, known.warmup)
        print(json.dumps({"it_per_s": rate, "peak_rss_mb": peak_rss_mb(), "load": os.getloadavg()[0]}))
        return

    # Each setting is a list of main.py options; with --compare, the second adds the compared ones.
    setups = {"": main_options}
    parts = list(PARTS)
    if known.compare:
        setups = {"base": main_options, "compared": [*main_options, *shlex.split(known.compare)]}
        parts = ["b", "c"]
    rates = {(setup, part): [] for setup in setups for part in parts}
    memory = {key: 0.0 for key in rates}
    loads = []                 # a part's own load is about 2 (3 for (a), with its loader workers)
    for round_ in range(known.rounds):
        # The two settings of a part run back to back, so that a burst of other work on the
        # machine is less likely to hit one and not the other, and take turns going first.
        order = list(setups) if round_ % 2 == 0 else list(reversed(setups))
        for part in parts:
            for setup in order:
                result = run_part(part, setups[setup], known.iterations, known.warmup)
                rates[setup, part].append(result["it_per_s"])
                memory[setup, part] = max(memory[setup, part], result["peak_rss_mb"])
                loads.append(result["load"])
    for setup in setups:
        for part in parts:
            runs = rates[setup, part]
            label = f" [{setup}]" if setup else ""
            print(f"({part}) {PARTS[part][0]}{label}: {statistics.median(runs):.2f} it/s (rounds: "
                  f"{', '.join(f'{r:.2f}' for r in runs)}), peak RSS {memory[setup, part]:.0f} MB", flush=True)
    for setup, options in setups.items():
        label = f"[{setup}] " if setup else ""
        print(f"{label}{describe(settings(options))}, {known.iterations} timed iterations, "
              f"medians of {known.rounds} rounds")
    print(f"1-minute load average after each part: {min(loads):.1f} to {max(loads):.1f}")
    if known.compare:
        print(f"base/compared, median of the per-round ratios: "
              f"(b) {median_ratio(rates['base', 'b'], rates['compared', 'b']):.2f} "
              f"(c) {median_ratio(rates['base', 'c'], rates['compared', 'c']):.2f}")
    else:
        print(f"ratio_vs_reference {median_ratio(rates['', 'b'], rates['', 'a']):.2f} "
              f"ratio_vs_bound {median_ratio(rates['', 'b'], rates['', 'c']):.2f}")


if __name__ == "__main__":
    main()
