"""report.html: self-contained (every picture embedded, no external address), its figures equal
to metrics.csv's best row and -evaluate's summary, and written however a run ends."""
import csv
import json
from html.parser import HTMLParser

import pytest

import main as entry
from conftest import TINY, interrupt_validation


class Page(HTMLParser):
    """The parts of a page the tests look at: image sources, every attribute, the text."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.attributes, self.texts = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.attributes += [(tag, name, value or "") for name, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def run_main(task_dir, run_dir, *extra) -> int:
    return entry.main(["-data_dir", str(task_dir), "-best_models_dir", str(run_dir), *TINY, *extra])


def read_page(run_dir) -> Page:
    return Page((run_dir / "report.html").read_text(encoding="utf-8"))


def assert_self_contained(page: Page):
    assert page.images and all(src.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
                               for src in page.images)
    external = [(tag, name, value) for tag, name, value in page.attributes
                if name in ("src", "href", "action", "data") and not value.startswith(("data:", "#"))]
    assert external == []
    assert not [tag for tag, _, _ in page.attributes if tag in ("script", "link", "iframe")]


def test_a_finished_run_has_a_report_with_its_best_epoch_and_pictures(task_dir, tmp_path):
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-epochs", "3", "-lr", "0.05") == 0
    page = read_page(run)
    assert_self_contained(page)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    best = max(rows, key=lambda r: float(r["dice_mean"]))
    text, source = page.text, (run / "report.html").read_text()
    assert f"Best epoch {best['epoch']} of 3: validation mean Dice {float(best['dice_mean']):.4f}" in text
    for name in ("Anterior", "Posterior", "mean"):             # the result table's rows
        column = "dice_mean" if name == "mean" else f"dice_{name}"
        assert f"<tr><td>{name}</td><td>{float(best[column]):.4f}</td></tr>" in source
    saved = json.loads((run / "config.json").read_text())
    assert saved["commands"][0] in text and "all 3 epochs done" in text and saved["precision"] in text
    assert "best:" in text and "median:" in text and "worst:" in text          # where it fails
    assert len(page.images) >= 5            # curves, three cases, the progress GIF
    assert any(src.startswith("data:image/gif") for src in page.images)


def test_evaluate_rewrites_the_report_with_its_summary(task_dir, tmp_path):
    run = tmp_path / "run"
    assert run_main(task_dir, run, "-lr", "0.05") == 0
    assert entry.main(["-evaluate", "True", "-best_models_dir", str(run), "-device", "cpu"]) == 0
    page = read_page(run)
    assert_self_contained(page)
    summary = list(csv.DictReader(open(run / "evaluation_val_summary.csv")))
    text = page.text
    for row in summary:
        assert f"{float(row['mean']):.4f} ± {float(row['std']):.4f}" in text, row
    assert "post-processed" in text and "Evaluation of" in text


def test_an_interrupted_run_still_gets_its_report(task_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_validation(monkeypatch, at_call=2)                  # Ctrl-C in epoch two
    assert run_main(task_dir, run, "-epochs", "3") == 130
    page = read_page(run)
    assert "interrupted (Ctrl-C)" in page.text and "Best epoch 1 of 1" in page.text
    assert json.loads((run / "config.json").read_text())["stopped"] == "interrupted (Ctrl-C)"


def test_the_time_limit_is_named(task_dir, tmp_path):
    assert run_main(task_dir, tmp_path / "timed", "-max_minutes", "0.0001") == 0
    assert "the time limit of 0.0001 minutes" in read_page(tmp_path / "timed").text


@pytest.mark.slow
def test_a_sweep_gets_its_page_with_every_trial_and_the_best_command(task_dir, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": [0.02, 0.05]}))
    out_dir = tmp_path / "sweep"
    assert run_main(task_dir, out_dir, "-sweep", str(space)) == 0
    page = Page((out_dir / "sweep.html").read_text(encoding="utf-8"))
    assert_self_contained(page)
    rows = list(csv.DictReader(open(out_dir / "sweep.csv")))
    best = max(rows, key=lambda r: float(r["dice_mean"]))
    assert f"Trial {best['number']}, validation mean Dice {float(best['dice_mean']):.4f}" in page.text
    assert best["command"] in page.text and "Trials (2), best first" in page.text
    assert len(page.images) == 1                              # sweep.png
