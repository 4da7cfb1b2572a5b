"""The package's shape: imports run downward (main.py -> experiments -> the card's three files ->
the rooms data/, training/, inference/, outputs/ -> errors.py and files.py), with no cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARD = {"utils.args", "utils.data_class", "utils.trainer_class"}
BASE = {"utils.errors", "utils.files"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every module of utils/."""
    modules = {module_name(path): path for path in sorted((ROOT / "utils").rglob("*.py"))}
    found = {}
    for module, path in modules.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
                # `from utils.training import checkpoint` imports a module; `from utils.args import Config` a name
                names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                          for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names if alias.name.startswith("utils")}
        found[module] = names
    return found


def level(module: str) -> int:
    if module in BASE or module == "utils":
        return 0
    if module in CARD:
        return 2
    if module.startswith("utils.experiments"):
        return 3
    return 1                                       # the rooms: data, training, inference, outputs


def test_imports_run_downward():
    upward = [(module, name) for module, names in imports().items() for name in names
              if level(name) > level(module) or (level(name) == level(module) == 0 and name != module)]
    assert upward == []


def test_the_rooms_and_the_card_files_hold_what_the_readme_says():
    rooms = {path.name for path in (ROOT / "utils").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert rooms == {"data", "training", "inference", "outputs", "experiments"}
    assert {path.name for path in (ROOT / "utils").glob("*.py")} == {
        "__init__.py", "args.py", "data_class.py", "trainer_class.py", "errors.py", "files.py"}


def test_there_is_no_import_cycle():
    graph = imports()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join([*path, module])
        state[module] = "open"
        for name in graph.get(module, ()):
            visit(name, [*path, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
