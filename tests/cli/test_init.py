"""The ``neurenix.cli`` package: its modules import in one direction, and the old top-level modules are gone."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import neurenix.cli

PACKAGE = Path(neurenix.cli.__file__).parent
#: The order of neurenix/cli/__init__.py's docstring: each module imports only modules before it.
LAYERS = ["settings", "parser", "output", "runs", "report", "compare", "reproduce", "command", "__init__"]
#: The modules that must load without torch or Lightning (help and option errors).
#: (reproduce too, at its top: it imports the runs inside the functions that run.)
LIGHT = {"settings", "parser", "output", "command", "__init__"}


def package_imports(module: str) -> set[str]:
    """The ``neurenix.cli`` modules that ``module`` imports, at its top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name.split(".")[2] for name in names if name.startswith("neurenix.cli.")}


def top_level_imports(module: str) -> set[str]:
    """The top packages ``module`` imports at its top level (not inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found


def test_every_module_of_the_package_has_its_layer():
    assert sorted(path.stem for path in PACKAGE.glob("*.py")) == sorted(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_a_module_imports_only_modules_of_earlier_layers(module):
    # cli_compare and cli_report imported each other.
    later = set(LAYERS[LAYERS.index(module):])
    assert package_imports(module) & later == set()


@pytest.mark.parametrize("module", sorted(LIGHT))
def test_the_modules_help_needs_import_neither_torch_nor_lightning_at_their_top(module):
    assert top_level_imports(module) & {"torch", "lightning", "PIL"} == set()
    # compare and reproduce: command imports them inside main, for a run
    assert package_imports(module) <= LIGHT | {"compare", "reproduce"}


def test_reproduce_imports_neither_torch_nor_lightning_at_its_top():
    assert top_level_imports("reproduce") & {"torch", "lightning", "PIL"} == set()


@pytest.mark.parametrize("name", ["neurenix.cli_compare", "neurenix.cli_report", "neurenix.cli_settings"])
def test_the_top_level_command_modules_are_gone(name):
    assert importlib.util.find_spec(name) is None
