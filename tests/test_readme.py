"""The README's Python examples run as written and do what they say; so does every alternative
their comments offer, with the change the comment states and nothing else.

The blocks run one after the other in one namespace, as a reader pastes them (the sequence
block says it continues the first one). An alternative is run by making its stated change in
the block's text. MNIST itself is not on our machines: the ``"mnist"`` alternative reads
made-up images in MNIST's file format and layout; ``"fashion_mnist"`` reads the real
Fashion-MNIST where it is installed (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tests.test_api_document import mnist_like, write_mnist_files

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")
FIRST, SEQUENCE, PLAIN_LOOP = range(3)  # the Python blocks, in the README's order
#: A comment that offers another way to run a block: "or", "instead", "Other ...", "Another ...".
OFFER = re.compile(r"\bor\b|\binstead\b|^(?:Other|Another)\b")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def comments(code: str) -> list[str]:
    """The text of every ``#`` comment of ``code`` (the blocks hold no ``#`` inside strings)."""
    return [line.split("#", 1)[1].strip() for line in code.splitlines() if "#" in line]


def run(code: str, namespace: dict, name: str) -> dict:
    exec(compile(code, f"{README}: {name}", "exec"), namespace)
    return namespace


@dataclass
class Alternative:
    """One alternative a comment of the sequence block offers, and how to check it ran."""

    offer: str  # the start of the comment that offers it
    old: str  # the text the stated change replaces ...
    new: Callable[[Path], str]  # ... and its replacement, given a folder the test may fill
    source: str  # the benchmark's source after the change
    inputs: int
    scenario: str = "domain"
    prepare: Optional[Callable[[Path], None]] = None
    needs: Optional[Path] = None  # a file that must exist, else the alternative is skipped


def _fake_mnist(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    write_mnist_files(folder / "mnist", mnist_like(1000, generator), mnist_like(500, generator))


ALTERNATIVES = {
    "fashion_mnist": Alternative(
        "Other data:", 'split_benchmark("digits"', lambda folder: f'split_benchmark("fashion_mnist", root={str(FASHION)!r}', "fashion_mnist", 784,
        needs=FASHION / "train-images-idx3-ubyte.gz",
    ),
    "mnist": Alternative(
        "Other data:", 'split_benchmark("digits"', lambda folder: f'split_benchmark("mnist", root={str(folder / "mnist")!r}', "mnist", 784, prepare=_fake_mnist
    ),
    "class": Alternative("Another scenario:", 'scenario="domain"', lambda folder: 'scenario="class"', "digits", 64, scenario="class"),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: the fastest for these small MLPs, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def after_the_first_block(one_thread, tmp_path_factory) -> dict:
    """The namespace the first block leaves (its imports, ``Classifier``, three consolidated tasks)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("first"))  # its Trainers write lightning_logs/ where they run
        return run(python_blocks()[FIRST], {}, "the first Lightning block")


def test_the_readme_has_the_three_blocks_these_tests_know():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "L.Trainer" in blocks[FIRST] and "fit_sequence" in blocks[SEQUENCE] and "train_step" in blocks[PLAIN_LOOP]


def test_the_first_lightning_block_consolidates_every_task(after_the_first_block):
    ewc, replay = after_the_first_block["methods"]
    assert ewc.finished_tasks == replay.finished_tasks == [0, 1, 2]
    assert len(replay.memory) == 500  # 3 tasks x 256 samples offered, reservoir of 500
    assert float(ewc.get_ewc_loss().detach()) > 0  # task 2's parameters moved away from tasks 0 and 1


def check_sequence(namespace: dict, source: str, inputs: int, scenario: str) -> None:
    benchmark, model, trainer = namespace["benchmark"], namespace["model"], namespace["trainer"]
    assert (benchmark.metadata["source"], benchmark.scenario, benchmark.num_tasks) == (source, scenario, 5)
    first, last = model.net[0], model.net[-1]
    assert (first.in_features, last.out_features) == (inputs, benchmark.num_classes)  # the model fits the data
    assert namespace["datamodule"].current_task == 4 and trainer.global_step == 5 * 100
    (curves,) = [c for c in trainer.callbacks if type(c).__name__ == "ForgettingCurves"]
    accuracies = curves.matrix.accuracies()
    assert accuracies.shape == (5, 5) and not accuracies.isnan().any()
    assert namespace["methods"][0].finished_tasks == [0, 1, 2, 3, 4]


def test_the_sequence_block_runs_as_written(after_the_first_block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run(python_blocks()[SEQUENCE], dict(after_the_first_block), "the sequence block")
    check_sequence(namespace, "digits", 64, "domain")
    assert namespace["benchmark"].num_classes == 2  # domain-incremental: two labels, one head


@pytest.mark.parametrize("name", list(ALTERNATIVES))
def test_each_alternative_the_sequence_block_offers_runs_with_the_stated_change_only(name, after_the_first_block, tmp_path, monkeypatch):
    alternative = ALTERNATIVES[name]
    if alternative.needs is not None and not alternative.needs.is_file():
        pytest.skip(f"{alternative.needs} is not installed")
    code = python_blocks()[SEQUENCE]
    offer = [comment for comment in comments(code) if comment.startswith(alternative.offer)]
    assert len(offer) == 1 and name in offer[0], f"no comment of the block offers {name!r}"
    assert code.count(alternative.old) == 1
    if alternative.prepare is not None:
        alternative.prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    changed = code.replace(alternative.old, alternative.new(tmp_path))
    check_sequence(run(changed, dict(after_the_first_block), f"the sequence block with {name}"), alternative.source, alternative.inputs, alternative.scenario)


def test_every_offer_in_a_comment_has_a_test():
    """A comment offering something else (a quoted name in place of another) is tested for each
    name it offers: a new offer without a test here fails."""
    offers = [comment for code in python_blocks() for comment in comments(code) if OFFER.search(comment)]
    assert offers, "the README's comments offer no alternative: then this module's ALTERNATIVES are stale"
    for offer in offers:
        tested = {name: a for name, a in ALTERNATIVES.items() if offer.startswith(a.offer)}
        assert tested, f"no test for the alternatives of the README comment {offer!r}"
        replaced = {quoted for a in tested.values() for quoted in re.findall(r'"(\w+)"', a.old)}
        assert set(re.findall(r'"(\w+)"', offer)) - replaced == set(tested), offer


def test_the_plain_loop_runs_as_written_and_consolidates_task_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run(python_blocks()[PLAIN_LOOP], {}, "the plain PyTorch loop")
    ewc = namespace["ewc"]
    assert (ewc.active_task, ewc.finished_tasks) == (2, [1])  # task 1 consolidated, task 2 in training
    assert float(ewc.get_ewc_loss().detach()) > 0  # task 2 moved the parameters away from where task 1 ended
    inputs, targets = next(iter(namespace["task1_loader"]))
    assert inputs.shape[1:] == (64,) and set(targets.tolist()) <= set(range(5))  # digits as 64 pixels, labels 0-4
