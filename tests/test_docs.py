"""The documentation site: its runnable examples run, and it builds with ``mkdocs build --strict``.

A Python block of a page under docs/ runs here when the line just before its fence is
``<!-- runnable -->`` (an HTML comment, invisible on the site). The runnable blocks of one page
run in order in one namespace, as a reader would paste them one after the other, in a
temporary folder. Blocks that need what a test cannot have (GPUs, a cluster, a dataset download)
stay unmarked.

The build needs the ``docs`` extra (MkDocs, mkdocstrings); without it that test is skipped.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
import typing
from typing import Optional, Union, get_type_hints

import pytest
import torch

import neurenix
from neurenix.automl import GridSearch, default_optimizer
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    DarkExperienceReplay,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    MAS,
    RWalk,
    SynapticIntelligence,
)
from tests.test_api_document import METHOD_CLASSES, document_signatures, document_text

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKER = "<!-- runnable -->"
#: The methods the package has beyond the API's five: on the API page too, every argument "ours".
BEYOND_API = {cls.__name__: cls for cls in (DarkExperienceReplay, ERACE, AGEM, GEM, MAS, RWalk)}
#: Each method class's page under docs/methods.
METHOD_PAGES = {
    "EWC": "ewc", "SynapticIntelligence": "synaptic-intelligence", "L2Regularization": "l2",
    "KnowledgeDistillation": "distillation", "ExperienceReplay": "replay", "DarkExperienceReplay": "dark-experience-replay",
    "ERACE": "er-ace", "AGEM": "a-gem", "GEM": "gem", "MAS": "mas", "RWalk": "rwalk", "ICaRL": "icarl",
    "GDumb": "gdumb", "BiC": "bic",
}
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def runnable_blocks(text: str) -> list[str]:
    """The code of each ```` ```python ```` block whose fence follows a ``<!-- runnable -->`` line."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == MARKER:
            blocks.append(match.group(1))
    return blocks


PAGES = sorted(path for path in DOCS.rglob("*.md") if MARKER in path.read_text(encoding="utf-8"))


def test_every_runnable_marker_is_on_a_python_block():
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert text.count(MARKER) == len(runnable_blocks(text)), f"{page}: a {MARKER} line not just before a ```python fence"


def test_the_pages_that_promise_examples_have_runnable_ones():
    names = {str(page.relative_to(DOCS)) for page in PAGES}
    expected = {"getting-started.md", "scenarios.md", "metrics.md"} | {f"methods/{m}.md" for m in METHOD_PAGES.values()}
    assert expected <= names


def test_every_method_of_the_package_has_its_page_its_api_entry_and_a_place_in_the_nav():
    """Each continual-learning method exported by neurenix.continual (a class with train_step that
    a user builds on a model) has a page under docs/methods, in the site's Methods menu, and its
    docstring on the API reference page."""
    import neurenix.continual as continual

    methods = {name for name in continual.__all__
               if isinstance(getattr(continual, name), type) and issubclass(getattr(continual, name), continual.ContinualCallback)
               and getattr(continual, name).__module__.split(".")[-1] not in ("base", "callback", "rehearsal")}  # fmt: skip
    assert methods == set(METHOD_PAGES)
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    for name, page in METHOD_PAGES.items():
        assert (DOCS / "methods" / f"{page}.md").is_file(), name
        assert f": methods/{page}.md\n" in nav, f"mkdocs.yml's nav lacks methods/{page}.md"
        assert f"::: neurenix.continual.{name}\n" in api, f"docs/api.md lacks {name}"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(DOCS)) for page in PAGES])
def test_the_runnable_examples_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever an example writes (Lightning logs) lands here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    try:
        for number, code in enumerate(runnable_blocks(page.read_text(encoding="utf-8")), start=1):
            exec(compile(code, f"<{page.relative_to(REPO)}: runnable block {number}>", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_the_accuracy_matrix_example_takes_logits_as_its_comment_offers():
    """metrics.md's AccuracyMatrix example says each ``update`` takes "predicted labels, or logits":
    with every prediction given as logits (whose argmax is that label) it gives the same matrix."""
    (code,) = [block for block in runnable_blocks((DOCS / "metrics.md").read_text(encoding="utf-8")) if "AccuracyMatrix(num_tasks=2)" in block]
    assert "# predicted labels, or logits" in code
    as_logits, count = re.subn(r"matrix\.update\(torch\.tensor\((\[[\d, ]+\])\)",
                               r"matrix.update(torch.nn.functional.one_hot(torch.tensor(\1), 2).float() * 4.0 - 2.0", code)  # fmt: skip
    assert count == 4
    namespaces = []
    for variant in (code, as_logits):
        namespaces.append({})
        exec(compile(variant, "<docs/metrics.md: AccuracyMatrix>", "exec"), namespaces[-1])
    labels, logits = (namespace["matrix"].accuracies() for namespace in namespaces)
    assert torch.equal(labels, logits) and torch.allclose(labels, torch.tensor([[0.75, 0.75], [0.5, 1.0]], dtype=labels.dtype))


# ---------------------------------------------------------------------------- the continual-learning API page
API_PAGE = DOCS / "continual-api.md"
SIGNATURES = "<!-- signatures -->"
_EMPTY = object()  # "no default" (None is a default)
TABLE_HEADER = "| parameter | type | default | | meaning |"


def _signature_scope() -> dict:
    """The names the page's signatures, defaults and types are written with."""
    classes = (EWC, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence, GridSearch)
    return {"neurenix": neurenix, "default_optimizer": default_optimizer, "Optional": Optional, "Union": Union, "Callable": typing.Callable, **BEYOND_API,
            **{cls.__name__: cls for cls in classes}, **{t.__name__: t for t in (bool, int, float, str)}}  # fmt: skip


def page_signatures(text: str) -> list[tuple[str, ast.arguments]]:
    """``(name, parsed parameters)`` of every entry of the page's ``<!-- signatures -->`` blocks,
    in order; an entry is ``dotted.name(parameters)`` starting a line."""
    entries = []
    for match in FENCE.finditer(text):
        if text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip() == SIGNATURES:
            for name, parameters in re.findall(r"^([\w.]+)\((.*?)\)$", match.group(1), flags=re.MULTILINE | re.DOTALL):
                entries.append((name, ast.parse(f"def f({parameters}): pass").body[0].args))
    return entries


def _described(arguments: ast.arguments, scope: dict) -> list[tuple[str, str, object]]:
    """``(name, kind, default)`` of each parameter, defaults evaluated (``_EMPTY`` for none)."""
    positional = arguments.args
    defaults = [_EMPTY] * (len(positional) - len(arguments.defaults)) + [eval(ast.unparse(d), scope) for d in arguments.defaults]
    described = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(positional, defaults)]
    described += [(a.arg, "KEYWORD_ONLY", _EMPTY if d is None else eval(ast.unparse(d), scope))
                  for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]  # fmt: skip
    return described


def _actual(obj: object) -> list[tuple[str, str, object]]:
    parameters = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    return [(p.name, p.kind.name, _EMPTY if p.default is p.empty else p.default) for p in parameters]


def test_every_signature_on_the_api_page_is_the_codes():
    scope = _signature_scope()
    entries = page_signatures(API_PAGE.read_text(encoding="utf-8"))
    assert len(entries) >= 25
    for name, arguments in entries:
        documented, actual = _described(arguments, scope), _actual(eval(name, scope))
        assert [(n, k) for n, k, _ in documented] == [(n, k) for n, k, _ in actual], name
        for (parameter, _, written), (_, _, real) in zip(documented, actual):
            same = written is real or (written == real and type(written) is type(real))  # 1000.0 stays a float
            assert same, f"{name}: the page gives {parameter}={written!r}, the code {real!r}"


def test_the_api_page_lists_every_name_of_the_api_with_compatible_parameters():
    """Each method the API lists for a class is on the page, and takes the API's arguments first, in order."""
    contract = document_text()
    documented = {name for name, _ in page_signatures(API_PAGE.read_text(encoding="utf-8"))}
    assert {"neurenix.init", "neurenix.data.MNIST", "neurenix.automl.GridSearch", "GridSearch.fit", "GridSearch.best_params"} <= documented
    starts = sorted((contract.index(f"neurenix.continual.{name}(\n"), name) for name in METHOD_CLASSES)
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(contract), "")]):
        assert f"neurenix.continual.{name}" in documented
        methods = re.findall(r"- (\w+)\(([^)]*)\):", contract[start:end])
        assert methods, name
        for method, arguments in methods:
            assert f"{name}.{method}" in documented, f"{name}.{method} is in the API but not on the page"
            ours = [p for p in inspect.signature(getattr(METHOD_CLASSES[name], method)).parameters if p != "self"]
            theirs = [a.strip() for a in arguments.split(",") if a.strip()]
            assert ours[: len(theirs)] == theirs, (name, method, ours, theirs)
    assert set(document_signatures(contract)) == set(METHOD_CLASSES)


def page_tables(text: str) -> dict[str, list[list[str]]]:
    """Each parameter table's rows (cells, backticks stripped), by the constructor of the signature block above it."""
    tables: dict[str, list[list[str]]] = {}
    for block in text.split(SIGNATURES)[1:]:
        constructor = re.search(r"^([\w.]+)\(", block.split("```python\n", 1)[1], flags=re.MULTILINE).group(1)
        if TABLE_HEADER not in block:
            continue
        lines = block.split(TABLE_HEADER, 1)[1].strip().splitlines()[1:]  # after the |---| line
        rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
        tables[constructor] = rows[: next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    return tables


def test_each_parameter_table_gives_the_codes_types_defaults_and_origin():
    scope = _signature_scope()
    contract = {name: [a.arg for a in arguments.args] for name, arguments in document_signatures(document_text()).items()}
    tables = page_tables(API_PAGE.read_text(encoding="utf-8"))
    assert set(tables) == {f"neurenix.continual.{name}" for name in [*METHOD_CLASSES, *BEYOND_API]}
    for constructor, rows in tables.items():
        cls = eval(constructor, scope)
        hints = get_type_hints(cls.__init__)
        in_api = cls.__name__ not in BEYOND_API
        assert [row[0] for row in rows] == [name for name, _, _ in _actual(cls)], constructor
        for (name, kind, default), (_, type_, written_default, origin, meaning) in zip(_actual(cls), rows):
            assert eval(type_, scope) == hints[name], f"{constructor}: {name} is {hints[name]}, the page says {type_}"
            assert written_default == "required" if default is _EMPTY else ast.literal_eval(written_default) == default, (constructor, name)
            assert origin == ("API" if in_api and name in contract[cls.__name__] else "ours"), (constructor, name, origin)
            # the API's classes: our additions are keyword-only, so the API's positional calls keep their meaning
            assert meaning and (not in_api or (origin == "ours") == (kind == "KEYWORD_ONLY")), (constructor, name)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="MkDocs is not installed (pip install -e '.[docs]')",
)
def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("neurenix.continual.EWC", "fisher_sample_size", "neurenix.data.MNIST", "filter_labels", "neurenix.automl.GridSearch",
                 "neurenix.continual.DarkExperienceReplay", "reference_size", "neurenix.continual.functional.gem_dual"):
        assert name in api, f"the API reference lacks {name}: mkdocstrings did not render it"
    for page in ("getting-started", "methods/ewc", "methods/gem", "scenarios", "metrics", "multi-gpu", "reliability", "benchmarks",
                 "continual-api"):
        assert (site / page / "index.html").is_file(), page
    assert "Formatting signatures requires either Black or Ruff" not in result.stderr, "the docs extra must install a formatter"
    _check_sidebar_sections_hold_their_objects(api)
    _check_signatures_one_parameter_a_line(api)


@dataclass
class _Entry:
    """One entry of a page's sidebar (its table of contents) and the entries nested in it."""

    anchor: str = ""
    title: str = ""
    children: list["_Entry"] = field(default_factory=list)


class _SidebarParser(HTMLParser):
    """The tree of ``<li>`` entries in the MkDocs theme's sidebar, the ``<div id="toc-collapse">``."""

    def __init__(self) -> None:
        super().__init__()
        self.root = _Entry()
        self._open: list[_Entry] = []
        self._divs = 0  # open <div>s inside the sidebar; 0: outside it
        self._in_link = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "div" and (self._divs or dict(attrs).get("id") == "toc-collapse"):
            self._divs += 1
        elif self._divs and tag == "li":
            entry = _Entry()
            (self._open[-1] if self._open else self.root).children.append(entry)
            self._open.append(entry)
        elif self._divs and tag == "a" and self._open:
            self._open[-1].anchor, self._in_link = dict(attrs).get("href", ""), True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._divs:
            self._divs -= 1
        elif self._divs and tag == "li":
            self._open.pop()
        elif tag == "a":
            self._in_link = False

    def handle_data(self, data: str) -> None:
        if self._in_link:
            self._open[-1].title += data


def _sidebar(page_html: str) -> list[_Entry]:
    parser = _SidebarParser()
    parser.feed(page_html)
    return parser.root.children


def _check_sidebar_sections_hold_their_objects(api: str) -> None:
    """Each section heading of the API page lists the objects documented under it: a section
    entry with nothing beneath it is what the sidebar showed when sections and objects shared a
    heading level (the objects became the section's siblings)."""
    (page,) = _sidebar(api)
    assert page.title.strip() == "API reference" and page.children
    for section in page.children:
        objects = [entry.anchor.removeprefix("#") for entry in section.children]
        assert objects, f"the sidebar entry {section.title.strip()!r} has no entries beneath it"
        assert all(name.startswith("neurenix.") for name in objects), (section.title, objects)
        assert all(entry.title.strip() for entry in section.children), (section.title, objects)
    listed = {entry.anchor for section in page.children for entry in section.children}
    assert {"#neurenix.continual.EWC", "#neurenix.continual.ContinualMethod", "#neurenix.continual.functional"} <= listed


def _check_signatures_one_parameter_a_line(api: str) -> None:
    """A signature too long for a line is formatted one parameter a line (ruff, through
    mkdocstrings' ``separate_signature``), not left on one line."""
    signatures = [html.unescape(re.sub(r"<[^>]+>", "", code)) for code in re.findall(r'<code class="[^"]*doc-signature[^"]*">(.*?)</code>', api, re.DOTALL)]
    (ewc,) = [signature for signature in signatures if signature.startswith("EWC(")]
    assert ewc.splitlines()[:4] == ["EWC(", "    model: Module,", "    importance: float = 1000.0,", "    fisher_sample_size: int = 1000,"], ewc
    assert max(len(line) for signature in signatures for line in signature.splitlines()) <= 88
