"""Execute main.ipynb top to bottom with a small config: on the real data in ../shared when it is
there, else on synthetic data. Any cell error fails the test."""
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, write_task

REAL_DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"


def test_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(ROOT / "main.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit main.ipynb with its outputs cleared"
    parameters = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    data_dir = REAL_DATA if REAL_DATA.is_dir() else write_task(tmp_path / "data", n_cases=8)
    small = {"data_dir": str(data_dir), "best_models_dir": str(tmp_path / "run"), "epochs": 2, "Nit": 2,
             "batch_size": 4}
    if not REAL_DATA.is_dir():
        small.update({"channels": [4, 8]})
    notebook.cells.insert(parameters[0] + 1, nbformat.v4.new_code_cell(f"options.update({small!r})"))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "curves.png").is_file()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "post-processed" in outputs and "dice_Anterior" in outputs
