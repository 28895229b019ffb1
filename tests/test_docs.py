"""The documentation site: its runnable examples run, and it builds with ``mkdocs build --strict``.

A Python block of a page under docs/ runs here when the line just before its fence is
``<!-- runnable -->`` (an HTML comment, invisible on the site). The runnable blocks of one page
run in order in one namespace, as a reader would paste them one after the other, in a
temporary folder. Blocks that need what a test cannot have (GPUs, a cluster, a dataset download)
stay unmarked.

The build needs the ``docs`` extra (MkDocs, mkdocstrings); without it that test is skipped.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKER = "<!-- runnable -->"
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
    expected = {"getting-started.md", "scenarios.md", "metrics.md"} | {f"methods/{m}.md" for m in ("ewc", "replay", "l2", "distillation", "synaptic-intelligence")}
    assert expected <= names


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
    for name in ("neurenix.continual.EWC", "fisher_sample_size", "neurenix.data.MNIST", "filter_labels", "neurenix.automl.GridSearch"):
        assert name in api, f"the API reference lacks {name}: mkdocstrings did not render it"
    for page in ("getting-started", "methods/ewc", "scenarios", "metrics", "multi-gpu", "reliability", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
