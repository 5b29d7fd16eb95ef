"""The layering rule: core never imports napari, magicgui or a Qt binding (not even lazily),
so the CLI, clusters and Python users run without a GUI stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "napari_tiled_unet" / "core"
GUI = ("napari", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "vispy")


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_import_no_gui_package(path):
    found = {name for name in imported_names(path) if name.split(".")[0] in GUI}
    assert not found, f"{path.name} imports {sorted(found)}"


def test_importing_all_of_core_loads_no_gui_package():
    modules = [f"napari_tiled_unet.core.{p.stem}" for p in sorted(CORE.glob("*.py"))]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
