"""Execute main.ipynb top to bottom with a small config, both as a new user runs it (synthetic
volumes, smaller than the default patch) and, when ../shared is there, on the real data.
Any cell error fails the test."""
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, write_task

REAL_DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"


@pytest.mark.slow
@pytest.mark.parametrize("data", [
    "synthetic",
    pytest.param("real", marks=pytest.mark.skipif(not REAL_DATA.is_dir(), reason="no ../shared/data here")),
])
def test_notebook_runs_top_to_bottom(tmp_path, data):
    notebook = nbformat.read(ROOT / "main.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit main.ipynb with its outputs cleared"
    parameters = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    small = {"best_models_dir": str(tmp_path / "run"), "epochs": 2, "Nit": 2, "batch_size": 4,
             "device": "cpu", "cache_dir": str(tmp_path / "preprocessed")}
    if data == "real":
        small["data_dir"] = str(REAL_DATA)
    else:   # volumes of about 12x14x12 voxels, smaller than the default 40x56x40 patch
        small.update({"data_dir": str(write_task(tmp_path / "data", n_cases=8)), "channels": [4, 8]})
    notebook.cells.insert(parameters[0] + 1, nbformat.v4.new_code_cell(f"options.update({small!r})"))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "curves.png").is_file()
    assert "Where it fails" in (tmp_path / "run" / "report.html").read_text()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "post-processed" in outputs and "dice_Anterior" in outputs and "suggested -lr" in outputs
    # the three exercises' pictures
    assert "fp16 turns" in outputs and "expected draws per case" in outputs
    assert "only the last layer changed: True" in outputs
    assert "Every package of requirements.txt is installed." in outputs      # and nothing installed
    assert "device: cpu | precision: " in outputs and "batch size: 4" in outputs
    # every picture shows as one (a Figure without %matplotlib inline shows as "<Figure size ...>")
    pictures = sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))
    assert pictures >= 8, f"{pictures} pictures shown"


def test_the_notebook_steps_through_the_story_with_headings():
    cells = nbformat.read(ROOT / "main.ipynb", as_version=4).cells
    headings = [line for cell in cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    story = [h for h in headings if h[3].isdigit()]
    assert [h.split()[1] for h in story] == ["0.", "1.", "2.", "3.", "4.", "5.", "6.", "7."], story
    at = {h.split()[1] if h in story else h.split(":")[0][3:]: i for i, h in enumerate(headings)}
    assert at["2."] < at["Exercise 3"] < at["3."]      # the sampler, with the data
    assert at["4."] < at["Exercise 1"] < at["5."]      # the training loop and mixed precision
    assert at["6."] < at["Exercise 2"] < at["7."]      # fine-tuning, after the evaluation
    assert at["7."] < at["Tour 1"] < at["Tour 2"]      # the range test and the mean teacher, after the story
    code = [cell.source for cell in cells if cell.cell_type == "code"]
    # main.py's builders, called in prepare_training's order; the Trainer built next to training_loop()
    calls = ["build_data(", "build_network(", "make_optimizer(", "class_weights_of_run(", "make_loss(",
             "run_info(", "Trainer("]
    first = [next(i for i, source in enumerate(code) if call in source) for call in calls]
    assert first == sorted(first)
    assert code[first[-1] + 1].strip() == "trainer.training_loop()"


def test_the_documented_way_to_open_the_notebook_is_installed():
    # README: after the second install command, `jupyter notebook main.ipynb`.
    import shutil
    import subprocess
    assert shutil.which("jupyter"), "requirements-dev.txt installs the notebook server"
    done = subprocess.run(["jupyter", "notebook", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().split(".")[0] >= "7"
