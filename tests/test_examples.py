"""Every example in examples/ runs, in a fast mode, as a user would run it: a separate process.

The processes start together when the module's first test asks for them (they spend most of
their time importing torch and Lightning, which overlaps well) and each test then waits for its
own, with a timeout, and checks its exit status and the output that shows it did its job. A file
added to examples/ without a fast command here fails :func:`test_every_example_has_a_fast_run`.

The two tutorials are also checked to be the published tutorials of the Neurenix
continual-learning API, unchanged except for the lines they mark "not in the published tutorial".
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from neurenix.data import MNIST
from tests.data.test_download import closed_port_url
from tests.test_api_document import BLOCK_NAMES, FASHION, document_blocks, document_text, mnist_like, pyplot, write_mnist_files

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: Seconds one example may take; they take 5-20 s each on two idle cores.
TIMEOUT = 300
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_OPTUNA = importlib.util.find_spec("optuna") is not None


@dataclass
class Example:
    """How to run one file of examples/ fast, and what its output must hold."""

    command: Callable[[Path], list[str]]  # the command line, given the run's own folder
    check: Callable[[str, Path], None]  # (stdout, folder) -> assertions
    needs_matplotlib: bool = False
    needs_optuna: bool = False


def _python(script: str, *args: str) -> Callable[[Path], list[str]]:
    return lambda folder: [sys.executable, str(EXAMPLES / script), *args]


def _tutorial(script: str) -> Callable[[Path], list[str]]:
    def command(folder: Path) -> list[str]:
        generator = torch.Generator().manual_seed(0)
        write_mnist_files(folder / "mnist", mnist_like(300, generator), mnist_like(200, generator))
        return [sys.executable, str(EXAMPLES / script), "--fast", "--root", str(folder / "mnist")]

    return command


def _check_tutorial(method: str, figure: str) -> Callable[[str, Path], None]:
    def check(out: str, folder: Path) -> None:
        data = f"Data: MNIST-format files from {folder / 'mnist'}, neither MNIST nor Fashion-MNIST in full (200 test images)\n"
        assert out.startswith(data), out  # the made-up files are named as what they are
        assert f"Training on task 2 (digits 5-9) with {method}..." in out
        assert re.search(r"Task 1 accuracy after task 2: with \S.* [01]\.\d{4}, without .* [01]\.\d{4}$", out, re.MULTILINE), out
        assert out.count("Epoch 1, Task 1 accuracy") == 3 and "Epoch 2" not in out  # --fast: one epoch per phase
        assert (folder / figure).stat().st_size > 10_000
        assert sorted(p.name for p in (folder / "mnist" / "MNIST" / "raw").iterdir()) == [
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        ]  # fmt: skip  (download=True found the files and fetched nothing)

    return check


def _check_plain(out: str, folder: Path) -> None:
    rows = re.findall(r"^(\w+) +((?:[01]\.\d{3} +){6})\d+\.\ds$", out, re.MULTILINE)
    assert [name for name, _ in rows] == ["none", "ewc", "si", "l2", "distillation", "replay"], out
    for _, numbers in rows:
        accuracies = [float(a) for a in numbers.split()]
        assert accuracies[-1] == pytest.approx(sum(accuracies[:-1]) / 5, abs=1e-3)  # the average column


def _check_lightning(out: str, folder: Path) -> None:
    assert re.findall(r"^  after task (\d):", out, re.MULTILINE) == list("01234"), out
    assert re.search(r"^average accuracy 0\.\d{3}, forgetting -?0\.\d{3}$", out, re.MULTILINE), out
    assert list((folder / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"


def _check_ddp(out: str, folder: Path) -> None:
    assert "accuracy matrix (row: after task i; column: task j), 2 processes:" in out, out
    assert re.findall(r"^  after task (\d):", out, re.MULTILINE) == list("01234"), out  # rank 0 only prints


def _check_compare(out: str, folder: Path) -> None:
    assert re.findall(r"^(none|online_ewc|si|replay) +0\.\d{3}", out, re.MULTILINE) == ["none", "online_ewc", "si", "replay"], out
    results = json.loads((folder / "out" / "results.json").read_text())
    assert list(results["methods"]) == ["none", "online_ewc", "si", "replay"]
    settings = results["settings"]  # the YAML file's values, the --epochs flag overriding it
    assert (settings["epochs"], settings["si"]["importance"], settings["replay"]["memory_size"]) == (1, 200.0, 300)
    assert (folder / "out" / "forgetting_curves.png").stat().st_size > 0


def _two_optuna_workers(folder: Path) -> list[str]:
    """Two workers of one study at once, sharing its SQLite storage; fails if either fails."""
    worker = f"{sys.executable} {EXAMPLES / 'optuna_search.py'} --storage sqlite:///{folder / 'search.db'}"
    return ["bash", "-c", f"{worker} --create && {{ {worker} & first=$!; {worker}; second=$?; wait $first; exit $(( $? | second )); }}"]


def _check_optuna(out: str, folder: Path) -> None:
    import optuna

    spec = importlib.util.spec_from_file_location("optuna_search", EXAMPLES / "optuna_search.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    study = optuna.load_study(study_name="neurenix-ewc-importance", storage=f"sqlite:///{folder / 'search.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["importance"] for t in trials} == set(example.SPACE["importance"])  # every combination tried
    fitted = example.make_search().fit(tasks=example.tasks()).cv_results_  # the same search in one process
    by_params = {p["importance"]: (m, [fitted[f"split{k}_test_score"][i] for k in range(2)])
                 for i, (p, m) in enumerate(zip(fitted["params"], fitted["mean_test_score"]))}  # fmt: skip
    for trial in trials:  # each trial's value is fit's score of its combination, bit for bit
        assert (trial.value, trial.user_attrs["split_scores"]) == by_params[trial.params["importance"]]
    assert study.best_params == {"importance": fitted["params"][fitted["rank_test_score"].index(1)]["importance"]}
    assert len(set(fitted["mean_test_score"])) > 1 and "best {'importance':" in out


EXAMPLES_RUN = {
    "tutorial_ewc.py": Example(_tutorial("tutorial_ewc.py"), _check_tutorial("EWC", "ewc_comparison.png"), needs_matplotlib=True),
    "tutorial_replay.py": Example(
        _tutorial("tutorial_replay.py"), _check_tutorial("Experience Replay", "experience_replay_comparison.png"), needs_matplotlib=True
    ),
    "plain_pytorch.py": Example(_python("plain_pytorch.py", "--fast"), _check_plain),
    "lightning_sequence.py": Example(lambda folder: [*_python("lightning_sequence.py")(folder), "--epochs", "1", "--output", str(folder / "logs")], _check_lightning),
    "ddp_sequence.py": Example(_python("ddp_sequence.py", "--epochs", "1"), _check_ddp),
    "optuna_search.py": Example(_two_optuna_workers, _check_optuna, needs_optuna=True),
    "compare.yaml": Example(
        lambda folder: [sys.executable, "-m", "neurenix", "--config", str(EXAMPLES / "compare.yaml"), "--epochs", "1", "--output", str(folder / "out")],
        _check_compare,
    ),
}


class _Run:
    def __init__(self, process: subprocess.Popen, folder: Path) -> None:
        self.process, self.folder = process, folder
        self.result: Optional[tuple[int, str, str]] = None

    def wait(self) -> tuple[int, str, str]:
        if self.result is None:
            try:
                out, err = self.process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
                pytest.fail(f"timed out after {TIMEOUT} s\n--- stdout\n{out}\n--- stderr\n{err[-3000:]}")
            self.result = (self.process.returncode, out, err)
        return self.result


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start every selected example at once, each in its own folder; stop what is left at the end."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "name" in item.callspec.params}  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    started: dict[str, _Run] = {}
    for name, example in EXAMPLES_RUN.items():
        if name not in selected or (example.needs_matplotlib and not HAS_MATPLOTLIB) or (example.needs_optuna and not HAS_OPTUNA):
            continue
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        process = subprocess.Popen(example.command(folder), cwd=folder, env=environment, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
        started[name] = _Run(process, folder)
    yield started
    for run in started.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


@pytest.mark.parametrize("name", list(EXAMPLES_RUN))
def test_an_example_runs_fast_and_does_its_job(runs, name):
    example = EXAMPLES_RUN[name]
    if example.needs_matplotlib and not HAS_MATPLOTLIB:
        pytest.skip("matplotlib is not installed (pip install 'neurenix[tutorials]')")
    if example.needs_optuna and not HAS_OPTUNA:
        pytest.skip("optuna is not installed (pip install 'neurenix[search]')")
    run = runs[name]
    status, out, err = run.wait()
    assert status == 0, f"exit status {status}\n--- stdout\n{out}\n--- stderr\n{err[-5000:]}"
    example.check(out, run.folder)


def test_every_example_has_a_fast_run():
    files = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files == sorted(EXAMPLES_RUN), "add a fast run for each new example to EXAMPLES_RUN"


# ---------------------------------------------------------------------------- the tutorials are the document's
MARKER = "# not in the published tutorial"
BEGIN, END = "# >>> not in the published tutorial", "# <<< not in the published tutorial"
#: What a tutorial script writes instead of the document's text.
SUBSTITUTIONS = {"root=ROOT": "root='./data'", "range(EPOCHS)": "range(5)"}


def document_code_of(script: str) -> str:
    """The script less its docstring and its marked additions (each with the blank line after
    it), with the document's own text put back where the script substitutes a variable."""
    source = script.splitlines()
    tree = ast.parse(script)
    docstring_end = tree.body[0].end_lineno if ast.get_docstring(tree) is not None else 0
    kept, skipping, drop_blank = [], False, False
    for line in source[docstring_end:]:
        if line.startswith(BEGIN):
            skipping = True
            continue
        if skipping:
            if line.startswith(END):
                skipping, drop_blank = False, True
            continue
        if line.rstrip().endswith(MARKER):
            drop_blank = True
            continue
        if drop_blank and not line.strip():
            drop_blank = False
            continue
        drop_blank = False
        kept.append(line)
    code = "\n".join(kept).strip("\n") + "\n"
    for ours, theirs in SUBSTITUTIONS.items():
        code = code.replace(ours, theirs)
    return code


@pytest.mark.parametrize("name", ["tutorial_ewc", "tutorial_replay"])
def test_a_tutorial_script_is_the_documents_code(name):
    documented = dict(zip(BLOCK_NAMES, (code for _, code in document_blocks(document_text()))))[name]
    ours = document_code_of((EXAMPLES / f"{name}.py").read_text(encoding="utf-8"))
    assert ours == documented


# ---------------------------------------------------------------------------- the tutorials' data
def run_script(script: str, *arguments: str) -> None:
    """Run an example in this process, as ``python examples/SCRIPT ARGUMENTS`` would."""
    saved = sys.argv
    sys.argv = [str(EXAMPLES / script), *arguments]
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = saved


@pytest.mark.parametrize("script", ["tutorial_ewc.py", "tutorial_replay.py"])
def test_a_tutorial_whose_download_fails_says_to_pass_root_and_leaves_no_folder(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MNIST, "mirrors", (closed_port_url("/mnist/"),))  # no network
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        run_script(script)  # the default root, ./data
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert "MNIST could not be downloaded into data/MNIST/raw. If you have its files (no network here?), pass root=" in error
    assert error.endswith("No network? Run again with --root DIR, DIR a folder that holds MNIST's four files.\n")
    assert list(tmp_path.iterdir()) == []  # no empty data/MNIST/raw/ left behind


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="no local Fashion-MNIST")
def test_a_tutorial_given_fashion_mnist_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="holds Fashion-MNIST") as caught, pyplot():
        run_script("tutorial_replay.py", "--root", str(FASHION), "--fast", "--samples", "100")
    assert len([w for w in caught if "holds Fashion-MNIST" in str(w.message)]) == 1  # not once per dataset the tutorial makes
    out = capsys.readouterr().out
    assert out.startswith(
        f"Data: Fashion-MNIST from {FASHION}, not MNIST: below, 'digits 0-4' are its classes T-shirt/top, Trouser, "
        "Pullover, Dress, Coat; 'digits 5-9' are Sandal, Shirt, Sneaker, Bag, Ankle boot\nTraining on task 1 (digits 0-4)...\n"
    ), out
