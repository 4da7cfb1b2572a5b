"""report.html: one self-contained page per run, to open in any browser, print, or send; and
sweep.html, one per sweep.

Written at the end of training (also after Ctrl-C, early stopping and the time limit) and
rewritten by -evaluate. Everything comes from the run folder (config.json, metrics.csv, the
pictures) and from one evaluation of best.pt on the validation cases (per-case Dice, and the
pictures of the best, median and worst case); pictures are embedded as data: URIs, so the page
needs no other file, no network and no JavaScript. The HTML is written with the standard
library's `html.escape`: a template engine would not pay for itself here.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure

from utils.files import written_atomically
from utils.outputs.plots import LABEL_COLOURS, VIEWS, plot_curves

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; } .case { margin: 1em 0; }
@media print { details { display: block; } details > summary { display: none; } }
"""


# ---------------------------------------------------------------- pieces


def data_uri(path_or_bytes, mime: str) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return data_uri(buffer.getvalue(), "image/png")


def image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def through_structure(label: torch.Tensor) -> tuple[int, int, int]:
    """The voxel at the centre of the labelled structure (the volume's centre if it has none)."""
    volume = label.reshape(label.shape[-3:])
    where = torch.nonzero(volume > 0)
    if len(where) == 0:
        return tuple(s // 2 for s in volume.shape)
    return tuple(int(v) for v in where.float().mean(0).round())


def case_figure(image_volume: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor, title: str) -> Figure:
    """Three orthogonal slices through the structure's centre: ground truth (top) and prediction."""
    centre = through_structure(truth)
    image_volume = image_volume.reshape(-1, *image_volume.shape[-3:])[0].float()
    figure = Figure(figsize=(9, 5.2), layout="constrained")
    axes = figure.subplots(2, 3)
    for row, (name, label) in enumerate((("ground truth", truth), ("prediction", prediction))):
        label = label.reshape(label.shape[-3:])
        for axis, (ax, view) in enumerate(zip(axes[row], VIEWS)):
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            ax.imshow(image_volume[tuple(index)].numpy().T, cmap="gray", origin="lower")
            ax.imshow(label[tuple(index)].numpy().T, cmap=LABEL_COLOURS, vmin=0, vmax=2, origin="lower",
                      interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{name}, {view} {centre[axis]}", fontsize=9)
    figure.suptitle(title)
    return figure


def failure_cases(result: dict, cases, split: str) -> dict:
    """What "where it fails" needs from an `evaluate` result of `cases` (in one process)."""
    rows = result["rows"]
    index = {case: i for i, case in enumerate(cases.ids)}
    return {"rows": rows, "split": split, "predictions": result["predictions"],
            "images": [cases.native_image(index[row["case"]]) for row in rows],
            "truths": [cases.native_labels[index[row["case"]]] for row in rows]}


# ---------------------------------------------------------------- the page


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    return [{k: (float(v) if v not in ("", None) else "") for k, v in row.items()} for row in csv.DictReader(open(path))]


def write_report(run_dir: str | Path, class_names: Sequence[str], failures: dict | None = None,
                 evaluation: dict | None = None) -> Path:
    """Write <run_dir>/report.html from the run folder.

    `failures`: an evaluation of best.pt on the validation cases, for "where it fails":
    {"rows": per-case rows with dice_<class> (as `evaluate` returns), "images", "truths",
    "predictions": per case on its own grid, same order}. `evaluation`: -evaluate's result
    ({"split", "checkpoint", "cases": how many, "summary": {False/True (post-processed):
    {metric_class: (mean, std, cases measured)}}}).
    """
    started = time.monotonic()
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    config = saved.get("config", {})
    history = read_metrics(run_dir)
    parts = [f"<h1>Run report: {html.escape(str(run_dir))}</h1>"]
    parts.append(run_section(saved, config, history))
    parts.append(result_section(history, class_names, evaluation))
    parts.append(curves_section(run_dir, history, class_names))
    if failures is not None:
        parts.append(failures_section(failures, class_names))
    if (run_dir / "progress.gif").is_file():
        parts.append("<h2>Progress</h2><p>The first validation case's prediction after each epoch.</p>"
                     + image(data_uri(run_dir / "progress.gif", "image/gif"), "progress across epochs"))
    parts.append(details_section(saved))
    seconds = time.monotonic() - started
    parts.append(f"<p><small>Written in {seconds:.1f} s.</small></p>")
    return write_page(run_dir / "report.html", f"Run report: {run_dir.name}", parts)


def write_page(path: Path, title: str, parts: list[str]) -> Path:
    """One self-contained HTML page (pictures inlined), written whole."""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    with written_atomically(path, encoding="utf-8") as file:
        file.write(page)
    return path


def run_section(saved: dict, config: dict, history: list[dict]) -> str:
    commands = saved.get("commands", [])
    peaks = saved.get("peak_memory", {})
    memory = ", ".join(f"{key.removesuffix('_mb')} {value:.0f} MB" for key, value in peaks.items()) or "not recorded"
    facts = [
        ("started", saved.get("started", "")),
        ("training time", f"{saved.get('minutes_trained', 0):.1f} min" if "minutes_trained" in saved else ""),
        ("device", saved.get("device", config.get("device", ""))),
        ("precision", saved.get("precision", "")),
        ("processes", saved.get("processes", 1)),
        ("peak memory", memory),
        ("epochs", f"{len(history)}" + (f" of {config['epochs']}" if config.get("max_minutes") is None
                                         and config.get("epochs") else "")),
        ("why it stopped", saved.get("stopped", "still running, or stopped without a word")),
        ("versions", ", ".join(f"{k} {v}" for k, v in saved.get("versions", {}).items())),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in facts)
    command = "".join(f"<pre>{html.escape(c)}</pre>" for c in commands) or "<p>(not recorded)</p>"
    return f"<h2>The run</h2><p>Command (to repeat it; a resumed run lists each session's):</p>{command}<table>{rows}</table>"


def mean_and_std(mean: float, std: float, measured: int, cases: int) -> str:
    """'0.8800 ± 0.0300', and how many cases it is over when a value is undefined for some (a
    distance to a class that a prediction misses)."""
    return f"{mean:.4f} ± {std:.4f}" + (f" (over {measured} of {cases})" if measured < cases else "")


def result_section(history: list[dict], class_names: Sequence[str], evaluation: dict | None) -> str:
    out = ["<h2>Result</h2>"]
    if history:
        best = max(history, key=lambda row: row["dice_mean"])
        out.append(f"<p>Best epoch <b>{int(best['epoch'])}</b> of {len(history)}: validation mean Dice "
                   f"<b>{best['dice_mean']:.4f}</b>.</p>")
        out.append(table([{"class": name, "Dice": best[f"dice_{name}"]} for name in class_names]
                         + [{"class": "mean", "Dice": best["dice_mean"]}]))
    else:
        out.append("<p>No epoch finished.</p>")
    if evaluation is not None:
        out.append(f"<h3>Evaluation of {html.escape(str(evaluation['checkpoint']))} on the "
                   f"{html.escape(evaluation['split'])} cases (mean ± std; distances in mm)</h3>")
        rows = []
        for postprocessed in (False, True):
            summary = evaluation["summary"][postprocessed]
            for name in class_names:
                rows.append({"": "post-processed" if postprocessed else "raw", "class": name,
                             **{metric: mean_and_std(*summary[f"{key}_{name}"], evaluation["cases"])
                                for metric, key in (("Dice", "dice"), ("HD95", "hd95"), ("ASD", "asd"))}})
        out.append(table(rows))
    return "".join(out)


def curves_section(run_dir: Path, history: list[dict], class_names: Sequence[str]) -> str:
    if not history:
        return ""
    return ("<h2>Curves</h2>" + image(figure_uri(plot_curves(history, class_names)),
                                      "loss, Dice per class and learning rate per epoch"))


def failures_section(failures: dict, class_names: Sequence[str]) -> str:
    rows = failures["rows"]
    means = [statistics.fmean(row[f"dice_{name}"] for name in class_names) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: means[i])
    picked = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    out = [f"<h2>Where it fails</h2><p>best.pt on the {html.escape(failures['split'])} cases: the best, the median "
           "and the worst case by mean Dice, each on three orthogonal slices through the labelled structure "
           "(orange anterior, blue posterior).</p>"]
    for name in ("best", "median", "worst"):
        i = picked[name]
        dice = ", ".join(f"{c} {rows[i][f'dice_{c}']:.4f}" for c in class_names)
        title = f"{name}: {rows[i]['case']}, mean Dice {means[i]:.4f} ({dice})"
        figure = case_figure(failures["images"][i], failures["truths"][i], failures["predictions"][i], title)
        out.append(f"<div class='case'><h3>{html.escape(title)}</h3>{image(figure_uri(figure), title)}</div>")
    table_rows = [{"case": rows[i]["case"], **{f"Dice {c}": rows[i][f"dice_{c}"] for c in class_names},
                   "mean": means[i]} for i in order]
    out.append(f"<h3>Every {html.escape(failures['split'])} case, worst first</h3>" + table(table_rows))
    return "".join(out)


def details_section(saved: dict) -> str:
    config = json.dumps(saved.get("config", {}), indent=2)
    split = saved.get("split", {})
    split_text = "\n".join(f"{name} ({len(ids)}): {', '.join(ids)}" for name, ids in split.items())
    return ("<h2>Configuration and split</h2>"
            f"<details><summary>every option</summary><pre>{html.escape(config)}</pre></details>"
            f"<details><summary>training / validation split</summary><pre>{html.escape(split_text)}</pre></details>")


def write_sweep_report(sweep_dir: str | Path, rows: Sequence[dict], space: dict) -> Path:
    """sweep.html next to sweep.csv: the space, the best trial and the command that repeats it,
    sweep.png, and every trial, best first; as self-contained as report.html."""
    sweep_dir = Path(sweep_dir)
    complete = [row for row in rows if row["state"] == "complete" and row.get("dice_mean") not in ("", None)]
    parts = [f"<h1>Sweep report: {html.escape(str(sweep_dir))}</h1>",
             f"<h2>Space</h2><pre>{html.escape(json.dumps(space, indent=2))}</pre>"]
    if complete:
        best = max(complete, key=lambda row: float(row["dice_mean"]))
        parts.append(f"<h2>Best trial</h2><p>Trial <b>{best['number']}</b>, validation mean Dice "
                     f"<b>{float(best['dice_mean']):.4f}</b>. Repeat it with:</p><pre>{html.escape(best['command'])}</pre>")
    else:
        parts.append("<h2>Best trial</h2><p>No trial has completed yet.</p>")
    if (sweep_dir / "sweep.png").is_file():
        parts.append("<h2>Plots</h2>" + image(data_uri(sweep_dir / "sweep.png", "image/png"),
                                              "best Dice against each swept option, and the trials over time"))
    ordered = sorted(rows, key=lambda row: -float(row["dice_mean"]) if row.get("dice_mean") not in ("", None) else 1)
    columns = [c for c in (rows[0].keys() if rows else []) if c != "command"]
    parts.append(f"<h2>Trials ({len(rows)}), best first</h2>" + table(ordered, columns))
    return write_page(sweep_dir / "sweep.html", f"Sweep report: {sweep_dir.name}", parts)

