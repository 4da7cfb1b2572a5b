"""A trained checkpoint measured on its run's cases: -evaluate (per-case CSV, summary CSV and
report.html beside the checkpoint), and the end of a training run (report.html with best.pt's
"where it fails")."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from utils.data.cache import Cases, load_cases
from utils.data.layouts import read_data
from utils.data.preprocessing import Preprocessing
from utils.errors import CheckpointError
from utils.files import written_atomically
from utils.inference.evaluation import autocast_for, evaluate
from utils.outputs.report import failure_cases, write_report
from utils.training.checkpoint import trained_model
from utils.training.networks import downsampling_factor


def evaluate_checkpoint(path: Path, data, split: str, device: torch.device, mixed_precision: bool,
                        mirror: bool) -> Path:
    """Measure the checkpoint at `path` on its run's `split` cases ("val" or "train") of the data
    `data` names (data_dir, label_names, cache_dir, task, google_id: the run's own unless typed),
    with and without post-processing; write the CSVs and report.html next to it."""
    model, state = trained_model(path, device)
    info = read_data(data.data_dir, data.task, data.google_id, data.label_names)
    if info.num_classes != state["model_config"]["out_channels"]:
        raise CheckpointError(f"{path} predicts {state['model_config']['out_channels']} classes but "
                              f"{info.task_dir} has {info.num_classes}. Use a checkpoint of this task.")
    cases, _ = load_cases(info, downsampling_factor(state["model_config"]),
                          preprocessing=Preprocessing.from_dict(state["preprocessing"]), cache_dir=data.cache_dir)
    cases = cases.subset(state["split"][split])
    evaluation = evaluate(model, cases, device, autocast_for(device, mixed_precision), info.foreground_names,
                          distances=True, also_postprocessed=True, mirror=mirror,  # one inference, scored both ways
                          roi_size=state["config"]["patch_size"])
    write_evaluation(evaluation, cases, split, path)
    report = write_report(path.parent, info.foreground_names, failure_cases(evaluation, cases, split),
                          {"split": split, "checkpoint": path, "cases": len(cases),
                           "summary": {False: evaluation["summary"], True: evaluation["postprocessed"]["summary"]}})
    print(f"Report: {report}")
    return path.parent


def write_evaluation(evaluation: dict, cases: Cases, split: str, checkpoint: Path) -> Path:
    """-evaluate's files beside `checkpoint`: evaluation_<split>.csv (per case, raw and
    post-processed) and evaluation_<split>_summary.csv (mean, std and the cases each is over);
    printed as a table. Returns the CSV's path without its suffix."""
    rows, summary_rows = [], []
    for postprocessed, result in ((False, evaluation), (True, evaluation["postprocessed"])):
        rows += [{"postprocessed": postprocessed, **row} for row in result["rows"]]
        summary_rows += [{"postprocessed": postprocessed, "metric": key.split("_", 1)[0],
                          "class": key.split("_", 1)[1], "mean": round(mean, 4), "std": round(std, 4),
                          "cases": measured}
                         for key, (mean, std, measured) in result["summary"].items()]
    stem = checkpoint.parent / f"evaluation_{split}"
    for rows_, file in ((rows, f"{stem}.csv"), (summary_rows, f"{stem}_summary.csv")):
        with written_atomically(file, newline="") as handle:     # an earlier evaluation stays whole
            writer = csv.DictWriter(handle, fieldnames=list(rows_[0]))
            writer.writeheader()
            writer.writerows(rows_)
    print(f"{len(cases)} {split} cases of {checkpoint} (mean ± std; distances in mm):")
    for row in summary_rows:
        undefined = len(cases) - row["cases"]     # e.g. a distance to a class the prediction misses
        print(f"  {'post-processed' if row['postprocessed'] else 'raw':>14}  {row['metric']:>4} "
              f"{row['class']:<10} {row['mean']:.4f} ± {row['std']:.4f}"
              + (f"  (over {row['cases']} cases: undefined for {undefined})" if undefined else ""))
    print(f"Per-case results: {stem}.csv; summary: {stem}_summary.csv")
    return stem


def write_run_report(trainer, evaluate_best: bool) -> None:
    """report.html at the end of a training run (`trainer`, utils/trainer_class.py). After a run
    that ended normally, with best.pt's predictions of the validation cases for "where it fails"
    (one more validation); after Ctrl-C or an error, without them, at once. A report that cannot
    be written is reported, never raised over what stopped the run."""
    try:
        failures = None
        if evaluate_best and (trainer.run_dir / "best.pt").is_file():
            model, _ = trained_model(trainer.run_dir / "best.pt", trainer.device)
            result = evaluate(model, trainer.val_cases, trainer.device, trainer.autocast, trainer.class_names,
                              mirror=trainer.config.tta, roi_size=trainer.config.patch_size)
            failures = failure_cases(result, trainer.val_cases, "validation")
        path = write_report(trainer.run_dir, trainer.class_names, failures)
        trainer.say(f"Report: {path}")
    except Exception as error:          # e.g. out of memory, a full disk: the checkpoints are saved
        trainer.say(f"Note: report.html was not written ({type(error).__name__}: {error}). Write it with "
                    f"-evaluate True -best_models_dir {trainer.run_dir}.")
