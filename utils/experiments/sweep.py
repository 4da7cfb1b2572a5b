"""Sweeps (-sweep space.json): many training runs over a space of options, with Optuna as the engine.

    {"lr": [0.005, 0.01, 0.02], "batch_size": [2, 4]}               a grid: every combination
    {"lr": {"low": 0.001, "high": 0.1, "log": true}, "channels": [[8, 16], [16, 32]]}   a search

Lists are grids (Optuna's GridSampler); an object is a range (ints for int options), searched by
Optuna's default sampler (TPE), lists then being categorical choices. Each trial is an ordinary run
in <best_models_dir>/trial_<number>/ with this command's other options, so -evaluate, -predict,
-resume and -config work on it. Its validation mean Dice is reported every epoch to a median pruner,
which stops a trial that is behind the median of the earlier trials at the same epoch.

What a trial ends as (the `state` column of sweep.csv): complete; pruned; out of memory (CUDA's, or
a CPU allocation that failed: recorded with the trial's options, memory freed, the sweep goes on);
failed, with the reason (e.g. a non-finite loss); interrupted (Ctrl-C: the sweep stops, and the same
command later runs that trial's options again, after which the other trials continue).

The study lives in -sweep_storage (default: the SQLite file <best_models_dir>/sweep.db). Processes
started with the same command, on one machine or on several sharing a database or a folder, work
on the same study: Optuna numbers the trials atomically in the storage, the grid sampler gives
trial n the grid's point n, and a process stops when the work is done.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import inspect
import itertools
import json
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from utils.args import Config, command_line, options, refuse_options_that_do_not_apply, with_typed
from utils.errors import UserError
from utils.files import written_atomically
from utils.training.memory import is_out_of_memory, peak_memory, reset_peak
from utils.outputs.plots import plot_sweep
from utils.outputs.report import write_sweep_report

STUDY_NAME = "sweep"
RANGE_TRIALS = 10                 # -trials when the space has a range and -trials is not given
PRUNER_STARTUP_TRIALS = 3         # the median pruner prunes nothing until 3 trials have finished,
PRUNER_WARMUP_EPOCHS = 5          # and nothing in a trial's first 5 epochs
STUDY_WAIT_SECONDS = 60           # how long a process waits for another to finish creating the study
STORAGE_ATTEMPTS = 3              # tries to open a database that another process may be creating
HEARTBEAT_SECONDS = 60            # a running trial's process writes a heartbeat this often (database storage)
HEARTBEAT_GRACE_SECONDS = 300     # a trial silent this long is taken as dead, failed and run again once
# The callback that queues a dead trial again, and its RDBStorage argument (both renamed in Optuna
# 4.9; the old class name warns since then and goes in 6.0).
RETRY_ARGUMENT = ("heartbeat_stale_trial_callback"
                  if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                  else "failed_trial_callback")
RETRY_CALLBACK = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
# Options that are the sweep's own or choose what a run is: they cannot be swept.
NOT_SWEPT = options(sweepable=False)
# Options of the command that are not part of the study's identity (they may differ per machine).
LOCAL_OPTIONS = options(machine=True)
# Options of the command that a trial does not take: the sweep's own, and the run folder (its own).
NOT_FOR_TRIALS = options(machine=True, sweepable=False)


# ---------------------------------------------------------------- the space


def words(value: Any) -> list[str]:
    """The command-line words of one option value: 0.01 -> ['0.01'], [16, 32] -> ['16', '32']."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return ["None" if v is None else str(v) for v in values]


def choice(value: Any) -> Any:
    """A grid value as Optuna stores it (numbers, strings, bools): a list becomes its words."""
    return " ".join(words(value)) if isinstance(value, (list, tuple)) else value


def read_space(path: str, base: Config) -> dict[str, Any]:
    """space.json as {option: list of values, or {"low", "high", "log"?, "step"?}}, every name and
    value checked as the command line checks it (with the other options of this command)."""
    try:
        space = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"-sweep {path} is not a JSON file ({error}). It should look like "
                        f'{{"lr": [0.005, 0.01], "batch_size": [2, 4]}}.') from None
    if not isinstance(space, dict) or not space:
        raise UserError(f'-sweep {path} must be a JSON object of options, e.g. {{"lr": [0.005, 0.01]}}.')
    known = set(options())
    checked = {}
    for raw_name, spec in space.items():
        name = raw_name.lstrip("-")
        if name not in known:
            raise UserError(f"-sweep {path}: '{raw_name}' is not an option of main.py (python main.py -h lists them).")
        if name in NOT_SWEPT:
            raise UserError(f"-sweep {path}: -{name} cannot be swept ({', '.join(sorted(NOT_SWEPT))} are the "
                            f"sweep's own or decide what a run is).")
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"-sweep {path}: {name} has an empty list; give at least one value.")
            values = spec
        elif isinstance(spec, dict):
            spec = check_range(path, name, spec)
            values = [spec["low"], spec["high"]]
        else:
            raise UserError(f"-sweep {path}: {name} must be a list of values (a grid) or "
                            f'{{"low": ..., "high": ..., "log": true}} (a range), not {spec!r}.')
        for value in values:
            try:
                config = with_typed(base, {name: value})
                refuse_options_that_do_not_apply(config)
            except UserError as error:
                raise UserError(f"-sweep {path}: {name} = {json.dumps(value)}: {error}") from None
        checked[name] = spec
    return checked


def check_range(path: str, name: str, spec: dict) -> dict:
    kind = Config.__dataclass_fields__[name].type
    if not ("int" in str(kind) or "float" in str(kind)) or "list" in str(kind):
        raise UserError(f"-sweep {path}: {name} takes no range of numbers; give a list of values.")
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise UserError(f'-sweep {path}: the range of {name} needs "low" and "high" (and optionally "log" '
                        f'or "step"), not {sorted(spec)}.')
    if spec.get("log") and "step" in spec:
        raise UserError(f'-sweep {path}: the range of {name} has both "log" and "step"; give one of them.')
    integer = "int" in str(kind) and "float" not in str(kind)
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise UserError(f"-sweep {path}: the range of {name} needs numbers low < high, got {low} and {high}.")
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"-sweep {path}: {name} takes whole numbers; give an int range, not {low} to {high}.")
    return {**spec, "integer": integer, "log": bool(spec.get("log", False))}


def is_grid(space: dict) -> bool:
    return all(isinstance(spec, list) for spec in space.values())


def grid_points(space: dict) -> list[dict]:
    """Every combination of a grid, as Optuna's params."""
    names = list(space)
    return [dict(zip(names, (choice(v) for v in combination)))
            for combination in itertools.product(*(space[name] for name in names))]


def suggest(trial: optuna.Trial, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, [choice(v) for v in spec])
    if spec["integer"]:
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec["log"],
                                 step=int(spec.get("step", 1)))
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))


# ---------------------------------------------------------------- the study


def make_storage(url: str | None, sweep_dir: Path):
    """-sweep_storage as an Optuna storage: journal:PATH (a journal file, fit for a shared
    folder), any database URL, or by default the SQLite file <best_models_dir>/sweep.db."""
    if url is None:
        url = f"sqlite:///{(sweep_dir / 'sweep.db').resolve()}"
    try:
        if url.startswith("journal:"):
            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        # SQLite locks the file while one process writes: the others wait up to a minute.
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        # A process that dies without a word (the kernel's OOM killer, a lost machine) leaves its
        # trial "running"; without a heartbeat for HEARTBEAT_GRACE_SECONDS, the next process to
        # start a trial marks it failed and queues its options once more.
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                with warnings.catch_warnings():   # the heartbeat is "experimental" (since Optuna 2.9)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=HEARTBEAT_GRACE_SECONDS,
                        **{RETRY_ARGUMENT: RETRY_CALLBACK(max_retry=1)})
            except Exception:
                # Processes started together race to create the tables of a new database file.
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                time.sleep(1 + attempt)
    except Exception as error:         # a URL SQLAlchemy cannot use, a server that does not answer, ...
        raise UserError(f"-sweep_storage {url} cannot be opened ({error}). Give a database URL such as "
                        f"sqlite:///sweep.db or postgresql://user@host/db, or journal:PATH.") from None


def open_study(storage, space: dict, base: Config, seed: int) -> optuna.Study:
    """Create the study, or join the one that the same command created before (or in another
    process). A study of another space is refused.

    Not create_study(load_if_exists=True): it is this same try/except DuplicatedStudyError
    (optuna/study/study.py, Optuna 5.1), but returns the study either way, and only the process that
    created the study may record its identity. A process that joined and found none could not tell
    a creator still writing from one that died, would have to write its own, and two commands of
    different spaces started together could then both go on."""
    sampler = (GridSampler({name: [choice(v) for v in spec] for name, spec in space.items()}, seed=seed)
               if is_grid(space) else optuna.samplers.TPESampler())
    pruner = make_pruner()
    wanted = {"space": space, "options": identity(base)}
    try:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                    sampler=sampler, pruner=pruner)
        study.set_user_attr("identity", wanted)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner)
    deadline = time.monotonic() + STUDY_WAIT_SECONDS
    while "identity" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)                     # the process that created it is writing its identity
    saved = study.user_attrs.get("identity")
    if saved is None:
        raise UserError("The sweep storage holds a study with no record of its space: the process that created it "
                        "stopped while doing so. Remove its sweep.db (or the -sweep_storage's study) and start again.")
    wanted = json.loads(json.dumps(wanted))                  # as the storage keeps it
    if saved != wanted:
        if saved["space"] != wanted["space"]:
            differences = f"its space is {json.dumps(saved['space'])}"
        else:
            differences = "its options differ: " + ", ".join(
                f"-{name} {saved['options'].get(name)} there, {wanted['options'].get(name)} here"
                for name in sorted(set(saved["options"]) | set(wanted["options"]))
                if saved["options"].get(name) != wanted["options"].get(name))
        raise UserError(f"The sweep storage already holds a study of another space or options ({differences}). "
                        f"Continue it with that command, or start this one in another -best_models_dir "
                        f"(or -sweep_storage).")
    return study


def make_pruner() -> optuna.pruners.BasePruner:
    """Optuna's median pruner, fed each epoch's validation mean Dice."""
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)


def identity(base: Config) -> dict:
    """This command's options that define the study: all but the local ones (paths, device, the
    sweep's own)."""
    return {name: value for name, value in base.to_dict().items() if name not in LOCAL_OPTIONS}


def trial_config(base: Config, params: dict, trial_dir: Path) -> Config:
    """A trial's run: this command's options without the sweep's, the trial's values, and its folder."""
    typed = {name: value for name, value in base.typed.items() if name not in NOT_FOR_TRIALS}
    return with_typed(dataclasses.replace(base, typed=typed), {**params, "best_models_dir": str(trial_dir)})


# ---------------------------------------------------------------- one trial


def trial_command(base_argv: Sequence[str], params: dict, trial_dir: Path) -> list[str]:
    """The main.py words of a trial: this command's options without the sweep's, the trial's
    values, and its folder."""
    argv, skip = [], False
    for word in base_argv:
        if word.startswith("-") and not word[1:2].isdigit():
            skip = word in {"-sweep", "-trials", "-sweep_storage", "-best_models_dir"}
        if not skip:
            argv.append(word)
    for name, value in params.items():
        argv += [f"-{name}", *str(value).split()]
    return argv + ["-best_models_dir", str(trial_dir)]


def trial_results(trial_dir: Path) -> dict:
    """From a trial's metrics.csv: the best epoch's Dice per class and mean, the epochs, the peak memory."""
    path = trial_dir / "metrics.csv"
    rows = list(csv.DictReader(open(path))) if path.is_file() else []
    if not rows:
        return {"epochs": 0}
    best = max(rows, key=lambda row: float(row["dice_mean"]))
    return {"epochs": len(rows), "best_epoch": int(best["epoch"]),
            **{key: float(value) for key, value in best.items() if key.startswith("dice_")}}


def covers_its_point(trial: optuna.trial.FrozenTrial, retried: set[int]) -> bool:
    """Whether a trial counts as done (or being done) for its options: running, complete, pruned,
    out of memory or failed, or dead without a word (see make_storage) and not queued again
    (`retried`: the numbers of dead trials that were); not interrupted or surplus."""
    if trial.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state != TrialState.FAIL:
        return False
    state = trial.user_attrs.get("state")
    return state in ("out of memory", "failed") or (state is None and trial.number not in retried)


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """The trials that Optuna's retry callback queued again (dead ones)."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def taken_by_earlier_trial(study: optuna.Study, number: int, params: dict) -> bool:
    """Whether a trial numbered before `number` has run, or runs, these grid values."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return any(t.number < number and t.params == params and covers_its_point(t, retried) for t in trials)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, which gives trial n the grid's point n (then the points not yet
    started), without its end-of-grid check: this module decides when a sweep is done. (That check
    fails, KeyError 'grid_id', in Optuna 5.0 for a trial queued with enqueue_trial, which is how an
    interrupted trial runs again.)"""

    def after_trial(self, study, trial, state, values) -> None:
        pass


class TrialStopped(Exception):
    """A trial that ended without a result (out of memory, failed, surplus): recorded, and the sweep goes on."""


def run_one_trial(study: optuna.Study, space: dict, base: Config, sweep_dir: Path,
                  train: Callable, device: torch.device, grid: bool) -> str:
    """Run one trial of the study as an ordinary training run and return how it ended. Ctrl-C is
    passed on, after the trial is recorded and its options queued to run again."""
    ended = {}

    def objective(trial: optuna.Trial) -> float:
        params = {name: suggest(trial, name, spec) for name, spec in space.items()}
        if grid and taken_by_earlier_trial(study, trial.number, params):
            # Another process started the grid's last point between this one's check and its start.
            ended.update(state="surplus")
            trial.set_user_attr("state", "surplus")
            raise TrialStopped("the grid has no point left")
        ended.update(number=trial.number, params=params, reason="")
        trial_dir = sweep_dir / f"trial_{trial.number}"
        config = trial_config(base, params, trial_dir)
        trial.set_user_attr("command", shlex.join(["python", "main.py", *command_line(config)]))
        print(f"\n--- trial {trial.number}: {' '.join(f'-{k} {v}' for k, v in params.items())}  ({trial_dir})")

        def report(row: dict) -> None:             # the Trainer calls this after every epoch
            trial.report(row["dice_mean"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"after epoch {row['epoch']}, at mean Dice {row['dice_mean']:.4f}")

        started = time.monotonic()
        reset_peak(device)
        try:
            trainer = train(config, report)
        except optuna.TrialPruned as error:
            ended.update(state="pruned", reason=str(error))
            record(trial, trial_dir, started, device, "pruned", str(error))
            raise
        except KeyboardInterrupt:
            ended.update(state="interrupted")
            record(trial, trial_dir, started, device, "interrupted", "Ctrl-C")
            raise
        except Exception as error:                 # the sweep goes on after any single trial's failure
            state = "out of memory" if is_out_of_memory(error) else "failed"
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            del error
            ended.update(state=state, reason=reason)
            record(trial, trial_dir, started, device, state, reason)
            raise TrialStopped(reason) from None
        ended.update(state="complete", value=trainer.best_metric)
        record(trial, trial_dir, started, device, "complete", "")
        return trainer.best_metric

    try:
        # gc_after_trial: a failed trial's model and batches (held by its traceback) are freed now.
        study.optimize(objective, n_trials=1, catch=(TrialStopped,), gc_after_trial=True)
        free_memory(device)
    except KeyboardInterrupt:
        if ended.get("state") == "interrupted":
            # Queued again, so that the same command runs these options first when it continues.
            study.enqueue_trial(ended["params"], user_attrs={"repeats_trial": ended["number"]})
        raise
    if ended.get("state") != "surplus":
        print(f"--- trial {ended['number']}: {ended['state']}" + (f" ({ended['reason']})" if ended["reason"] else "")
              + (f", best mean Dice {ended['value']:.4f}" if ended.get("value") is not None else ""))
    return ended.get("state", "failed")


def record(trial: optuna.Trial, trial_dir: Path, started: float, device: torch.device, state: str,
           reason: str) -> None:
    """A trial's end, kept in the study (sweep.csv is written from it)."""
    trial.set_user_attr("state", state)
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("minutes", round((time.monotonic() - started) / 60, 3))
    trial.set_user_attr("peak_memory", peak_memory(device))
    trial.set_user_attr("results", trial_results(trial_dir))


def free_memory(device: torch.device) -> None:
    """What a failed trial held, given back: Python's garbage, and CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the sweep


def work_left(study: optuna.Study, space: dict, trials: int) -> bool:
    """Whether a process should start another trial: a trial is queued (an interrupted or dead
    one's options), or fewer trials than wanted have been started (see covers_its_point).

    Not Optuna's MaxTrialsCallback(trials, states): it counts by TrialState after a trial ends, so
    a process always runs one trial first (measured, Optuna 5.1: the same command run twice on a
    finished 2-trial study left 3 trials), and it cannot tell an interrupted trial (to be run again)
    from an out-of-memory one (done): both are FAIL, told apart only by the state this module
    records."""
    with warnings.catch_warnings():               # "experimental" since Optuna 2.9, and still there
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # dead processes' trials: failed and queued again
    all_trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in all_trials):
        return True
    retried = retried_numbers(all_trials)
    return sum(covers_its_point(t, retried) for t in all_trials) < trials


def run_sweep(config: Config, train: Callable, device: torch.device) -> optuna.Study:
    """-sweep: run trials until the space (a grid) or -trials is done, writing sweep.csv and
    sweep.png and sweep.html after each; print the best trial and the command that repeats it."""
    space = read_space(config.sweep, config)
    grid = grid_points(space) if is_grid(space) else None
    trials = config.trials or (len(grid) if grid else RANGE_TRIALS)
    if grid and trials > len(grid):
        raise UserError(f"-trials {trials} is more than the {len(grid)} points of the grid in {config.sweep}; "
                        f"leave -trials out to run each point once.")
    sweep_dir = Path(config.best_models_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # trials are reported here
    study = open_study(make_storage(config.sweep_storage, sweep_dir), space, config, config.random_seed)
    try:
        while work_left(study, space, trials):
            run_one_trial(study, space, config, sweep_dir, train, device, grid is not None)
            write_sweep_files(study, space, sweep_dir)
    except KeyboardInterrupt:
        write_sweep_files(study, space, sweep_dir)
        raise
    write_sweep_files(study, space, sweep_dir)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if finished:
        best = max(finished, key=lambda t: t.value)
        print(f"\nBest trial: {best.number}, mean Dice {best.value:.4f} "
              f"({', '.join(f'-{k} {v}' for k, v in best.params.items())}). Repeat it with:\n"
              f"  {best.user_attrs['command']}")
    else:
        print("\nNo trial completed; sweep.csv says how each ended.")
    print(f"sweep.csv and sweep.png are in {sweep_dir}")
    return study


def sweep_rows(study: optuna.Study, space: dict) -> list[dict]:
    """One row per trial of sweep.csv.

    Not Study.trials_dataframe(): it needs pandas, which is not a requirement (here it raises
    ImportError), and its table would still need all of this: it names the columns params_lr,
    user_attrs_results, ..., keeps each nested dict (a trial's results, its peak memory) in one
    cell, keeps queued and surplus trials, and has Optuna's states, not why a trial ended."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        if t.state == TrialState.WAITING or t.user_attrs.get("state") == "surplus":
            continue
        attrs = t.user_attrs
        results = attrs.get("results", {})
        state = attrs.get("state", "running" if t.state == TrialState.RUNNING else t.state.name.lower())
        if t.state == TrialState.FAIL and "state" not in attrs:
            again = "its options ran again" if t.number in retried else "not run again (it died before)"
            state = f"died (its process stopped without a word, no heartbeat; {again})"
        if attrs.get("reason") and state in ("failed", "out of memory"):
            state = f"{state}: {attrs['reason']}"
        row = {"number": t.number, **{name: t.params.get(name, "") for name in space}, "state": state}
        row.update({key: results.get(key, "") for key in sorted(results) if key.startswith("dice_")})
        row.update({"epochs": results.get("epochs", ""), "minutes": attrs.get("minutes", ""),
                    **{key: value for key, value in attrs.get("peak_memory", {}).items()},
                    "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                    "command": attrs.get("command", "")})
        rows.append(row)
    return rows


def write_sweep_files(study: optuna.Study, space: dict, sweep_dir: Path) -> None:
    rows = sweep_rows(study, space)
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    # Several processes may finish a trial at once: each writes its own temporary files.
    with written_atomically(sweep_dir / "sweep.csv", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with written_atomically(sweep_dir / "sweep.png", "wb") as file:
        plot_sweep(rows, space, file)
    write_sweep_report(sweep_dir, rows, space)
