"""Every code block of the Neurenix continual-learning API's published text runs unchanged against the package.

That text ("the document" below; ``shared/seed/continual-learning-api.txt`` beside the
repository, docs/continual-api.md describes the API in our words) is the text of a
rendered web page: its code blocks have no fences. :func:`document_blocks` finds them: a block
starts at ``import neurenix as nx`` and grows paragraph by paragraph while the text still
compiles as Python (prose does not; a one-word heading such as "Tutorials" would, so a lone
name ends a block too). The five constructor signatures are found by their
``neurenix.continual.<Name>(`` opening.

Each block is executed as it stands, with the names it leaves undefined supplied
(``task1_dataset``, ``X``, ``memory_limited``, ...). The two tutorials read MNIST from
``./data``: here they run in a temporary folder holding IDX files this module writes in
torchvision's layout, with downloading made to fail, so ``download=True`` must find the files and
fetch nothing. Where Fashion-MNIST is installed (CI installs it), the tutorials also run on a
slice of it standing in for MNIST, and their claim is checked: task 1's accuracy after task 2 is
clearly higher with the method than without.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import inspect
import os
import re
import struct
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch.utils.data import TensorDataset

import neurenix
from neurenix.continual import EWC, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence

REPO = Path(__file__).resolve().parents[1]
DOCUMENT_NAME = "continual-learning-api.txt"
FASHION = Path("/usr/share/datasets/fashion-mnist")

METHOD_CLASSES = {cls.__name__: cls for cls in (EWC, ExperienceReplay, L2Regularization, KnowledgeDistillation, SynapticIntelligence)}
#: The runnable blocks, in the document's order, by the name this module gives them.
BLOCK_NAMES = [
    "ewc_example", "replay_example", "l2_example", "distillation_example", "si_example",
    "choosing_a_method", "grid_search", "task_boundary_detection", "tutorial_ewc", "tutorial_replay",
]  # fmt: skip
#: What each method example leaves undefined; everything else it names it imports or makes.
EXAMPLE_METHODS = {"ewc_example": "ewc", "replay_example": "replay", "l2_example": "l2_reg",
                   "distillation_example": "distillation", "si_example": "si"}  # fmt: skip


# ---------------------------------------------------------------------------- the document
def document_path() -> Optional[Path]:
    """The API's published text: ``$NEURENIX_API_DOCUMENT``, else ``shared/seed/`` beside the repository,
    else the copy committed in ``tests/fixtures/`` (so a clone alone runs every test)."""
    candidates = [os.environ.get("NEURENIX_API_DOCUMENT")]
    candidates += [str(base / "shared" / "seed" / DOCUMENT_NAME) for base in (REPO.parent, REPO)]
    candidates.append(str(REPO / "tests" / "fixtures" / DOCUMENT_NAME))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def document_text() -> str:
    path = document_path()
    if path is None:
        message = f"the published text of the Neurenix continual-learning API ({DOCUMENT_NAME}) is not in shared/seed/ beside the repository"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path.read_text(encoding="utf-8")


def document_blocks(text: str) -> list[tuple[int, str]]:
    """The runnable code blocks: ``(first line number, code)`` each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "import neurenix as nx":
            i += 1
            continue
        paragraphs: list[str] = []
        end = i
        for begin, stop in _paragraphs(lines, i):
            paragraph = "\n".join(lines[begin:stop])
            if paragraphs and re.fullmatch(r"[A-Za-z_]\w*", paragraph.strip()):
                break  # a one-word heading ("Tutorials", "Conclusion")
            try:
                compile("\n\n".join([*paragraphs, paragraph]), "<document>", "exec")
            except SyntaxError:
                break
            paragraphs.append(paragraph)
            end = stop
        blocks.append((i + 1, "\n\n".join(paragraphs) + "\n"))
        i = end
    return blocks


def _paragraphs(lines: list[str], start: int):
    """``(begin, end)`` line ranges of the blank-line separated paragraphs from ``start`` on."""
    i = start
    while i < len(lines):
        while i < len(lines) and not lines[i].strip():
            i += 1
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        if i < j:
            yield i, j
        i = j


def document_signatures(text: str) -> dict[str, ast.arguments]:
    """The constructor signatures, ``neurenix.continual.Name(...)``, as parsed argument lists."""
    found = re.findall(r"^neurenix\.continual\.(\w+)\(\n(.*?)\n\)$", text, flags=re.MULTILINE | re.DOTALL)
    return {name: ast.parse(f"def f({params}): pass").body[0].args for name, params in found}


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    found = document_blocks(document_text())
    assert len(found) == len(BLOCK_NAMES), [line for line, _ in found]
    return dict(zip(BLOCK_NAMES, (code for _, code in found)))


def run_block(code: str, name: str, **names) -> dict:
    """Execute a document block in a fresh namespace holding ``names``; return the namespace."""
    namespace = {"__name__": f"api_document_{name}", **names}
    exec(compile(code, f"<the API's published text: {name}>", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def one_thread_and_seeded():
    """One CPU thread (fastest for these small MLPs and steady on a busy machine) and a fixed seed
    (``nx.init()`` in the tutorials keeps the seed a run already has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- what the document holds
def test_the_document_has_ten_runnable_blocks_and_five_signatures():
    text = document_text()
    found = document_blocks(text)
    assert len(found) == len(BLOCK_NAMES)
    last_lines = {name: code.splitlines()[-1] for name, (_, code) in zip(BLOCK_NAMES, found)}  # each block ends where it should
    assert last_lines["ewc_example"].strip() == "ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=2)"
    assert last_lines["choosing_a_method"].strip() == "continual_method = KnowledgeDistillation(model, temperature=2.0)"
    assert last_lines["grid_search"] == 'print(f"Best hyperparameters: {best_params}")'
    assert last_lines["task_boundary_detection"].strip() == "# ... training code ..."
    assert last_lines["tutorial_ewc"] == last_lines["tutorial_replay"] == "plt.show()"
    assert set(document_signatures(text)) == set(METHOD_CLASSES)


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_the_documented_signature_is_ours(name):
    documented = document_signatures(document_text())[name]
    cls = METHOD_CLASSES[name]
    ours = list(typing.get_type_hints(cls.__init__).items())
    parameters = list(inspect.signature(cls).parameters.values())
    names = [a.arg for a in documented.args]
    assert [p.name for p in parameters[: len(names)]] == names
    required = len(names) - len(documented.defaults)
    assert all(p.default is p.empty for p in parameters[:required])
    for parameter, default in zip(parameters[required : len(names)], documented.defaults):
        value = ast.literal_eval(default)
        assert parameter.default == value and type(parameter.default) is type(value), parameter  # 1000.0 stays a float
    # Annotations name the same types: neurenix.nn.Module is torch.nn.Module, neurenix.Device is torch.device.
    scope = {"neurenix": neurenix, "Optional": Optional, "float": float, "int": int}
    for argument in documented.args:
        expected, actual = eval(ast.unparse(argument.annotation), scope), dict(ours)[argument.arg]
        # A widened type (distillation's alpha also takes a schedule) keeps the document's calls valid.
        assert expected == actual or expected in typing.get_args(actual), argument.arg


# ---------------------------------------------------------------------------- the method examples
def two_tasks(samples: int = 64) -> tuple[TensorDataset, TensorDataset]:
    """Two tasks of 784 features and labels 0..9, different input distributions."""
    generator = torch.Generator().manual_seed(0)
    task1 = TensorDataset(torch.rand(samples, 784, generator=generator), torch.randint(0, 10, (samples,), generator=generator))
    task2 = TensorDataset(torch.rand(samples, 784, generator=generator) + 0.5, torch.randint(0, 10, (samples,), generator=generator))
    return task1, task2


@pytest.mark.parametrize("name", list(EXAMPLE_METHODS))
def test_a_method_example_runs_and_consolidates_task_1(blocks, name):
    task1_dataset, task2_dataset = two_tasks()
    namespace = run_block(blocks[name], name, task1_dataset=task1_dataset, task2_dataset=task2_dataset)

    method = namespace[EXAMPLE_METHODS[name]]
    assert method.model is namespace["model"]
    if name == "replay_example":
        assert method.memory.num_seen == 2 * 10 * 64 and len(method.memory) == 1000
        assert set(method.memory.state_dict()["task_ids"].tolist()) == {1, 2}
        return
    assert (method.active_task, method.finished_tasks) == (2, [1])  # task 1 consolidated, task 2 in training
    if name == "distillation_example":
        x, _ = task2_dataset.tensors
        with torch.no_grad():
            assert float(method.get_distillation_loss(x, namespace["model"](x))) > 0
        return
    penalty = method.get_ewc_loss() if name == "ewc_example" else method.get_regularization_loss()
    assert float(penalty.detach()) > 0  # task 2 moved the parameters away from where task 1 ended


@pytest.mark.parametrize(
    ("memory_limited", "memory_available", "chosen"),
    [(True, False, EWC), (False, True, ExperienceReplay), (False, False, KnowledgeDistillation)],
)
def test_choosing_a_method_example_runs_every_branch(blocks, memory_limited, memory_available, chosen):
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    namespace = run_block(
        blocks["choosing_a_method"], "choosing_a_method", model=model, memory_limited=memory_limited, memory_available=memory_available
    )
    method = namespace["continual_method"]
    assert type(method) is chosen and method.model is model


def test_grid_search_example_searches_the_grid(blocks, capsys):
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3  # three classes, twenty samples each (cv=3 stratifies them)
    X = torch.rand(60, 784, generator=generator) * 0.2
    X += torch.nn.functional.one_hot(y, 3).repeat_interleave(784 // 3 + 1, dim=1)[:, :784]  # a third of the pixels per class
    with pytest.warns(UserWarning, match="on a single task a continual method's regularization never acts"):
        namespace = run_block(blocks["grid_search"], "grid_search", X=X, y=y)

    search = namespace["grid_search"]
    assert len(search.cv_results_) == 9  # 3 importances x 3 sample sizes
    assert search.best_score_ == 1.0  # the data is learnable; on one task every combination ties
    assert namespace["best_params"] == search.best_params_ == {"importance": 100.0, "fisher_sample_size": 100}  # the first of equals
    assert f"Best hyperparameters: {namespace['best_params']}" in capsys.readouterr().out


def test_task_boundary_detection_example_detects_a_drop(blocks, capsys):
    namespace = run_block(blocks["task_boundary_detection"], "task_boundary_detection")
    model, ewc = namespace["model"], namespace["ewc"]
    inputs = torch.rand(8, 784, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = model(inputs).argmax(dim=1)
    # Six batches the model gets right, then six it gets wrong: its accuracy falls from 1 to 0.
    stream = [(inputs, predicted)] * 6 + [(inputs, (predicted + 1) % 10)] * 6
    with warnings.catch_warnings():
        # Every boundary after the first consolidates a task registered with dataloader=None.
        warnings.filterwarnings("ignore", message="EWC consolidated task .* without data")
        namespace["detect_task_boundary"](model, stream, window_size=4, threshold=0.1)

    out = capsys.readouterr().out
    assert out.startswith("Task boundary detected at batch 6, switching to task 2\n")
    detected = out.count("Task boundary detected")
    assert ewc.active_task == 1 + detected and ewc.finished_tasks == list(range(2, 1 + detected))


# ---------------------------------------------------------------------------- the tutorials
def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """A gzip-compressed IDX file of uint8 ``tensor`` (the format of MNIST's files)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, tensor.dim()) + b"".join(struct.pack(">I", size) for size in tensor.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + tensor.to(torch.uint8).contiguous().numpy().tobytes())


def write_mnist_files(root: Path, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> Path:
    """Write the four MNIST files in torchvision's layout, ``root/MNIST/raw/*-ubyte.gz``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def mnist_like(samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 uint8 images of ten classes with learnable structure, as MNIST's files hold them.

    Each class is a few blurred strokes at fixed places (drawn from a fixed seed, shared by the
    training and test sets), shifted by up to a pixel, with random contrast and noise. Class
    ``5 + k`` shares two of its strokes with class ``(k + 1) % 5``, so that, as with real digits,
    task 2 (5..9 as 0..4 in one head) interferes with task 1.
    """
    prototypes = _class_prototypes(torch.Generator().manual_seed(1234))
    labels = torch.randint(0, 10, (samples,), generator=generator)
    shifts = torch.randint(-1, 2, (samples, 2), generator=generator).tolist()
    images = torch.stack([prototypes[label].roll(shift, dims=(0, 1)) for label, shift in zip(labels.tolist(), shifts)])
    images = images * (0.7 + 0.6 * torch.rand(samples, 1, 1, generator=generator))
    images = images + 0.25 * torch.rand(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.uint8)


def _class_prototypes(generator: torch.Generator, strokes: int = 4, shared: int = 2) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def draw(centres: torch.Tensor) -> torch.Tensor:
        blobs = [torch.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 2.5**2)) for r, c in centres.tolist()]
        return torch.stack(blobs).sum(0).clamp(max=1.0)

    first = [torch.randint(4, 24, (strokes, 2), generator=generator).float() for _ in range(5)]
    second = [torch.cat([first[(k + 1) % 5][:shared], torch.randint(4, 24, (strokes - shared, 2), generator=generator).float()]) for k in range(5)]
    return torch.stack([draw(centres) for centres in first + second])


def fashion_mnist_slice(train: int, test: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The first ``train`` training and ``test`` test samples of the installed Fashion-MNIST."""
    from neurenix.data import read_idx

    def first(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (read_idx(FASHION / f"{split}-images-idx3-ubyte.gz")[:count], read_idx(FASHION / f"{split}-labels-idx1-ubyte.gz")[:count])

    return first("train", train), first("t10k", test)


@contextlib.contextmanager
def pyplot():
    """matplotlib's pyplot drawing off-screen, or, where matplotlib (an optional extra) is not
    installed, a stand-in that accepts every call; yields whether it is the real one."""
    try:
        import matplotlib
    except ImportError:
        stand_in = types.ModuleType("matplotlib.pyplot")
        stand_in.__getattr__ = lambda name: (lambda *args, **kwargs: None)  # type: ignore[method-assign]
        package = types.ModuleType("matplotlib")
        package.pyplot = stand_in  # type: ignore[attr-defined]
        saved = {name: sys.modules.get(name) for name in ("matplotlib", "matplotlib.pyplot")}
        sys.modules.update({"matplotlib": package, "matplotlib.pyplot": stand_in})
        try:
            yield False
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        return
    backend = matplotlib.get_backend()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
            yield True
    finally:
        plt.close("all")
        matplotlib.use(backend)


def run_tutorial(blocks: dict[str, str], name: str, folder: Path, monkeypatch) -> tuple[dict, bool]:
    """Run a tutorial block as it stands in ``folder`` (which holds ``data/``); downloads fail."""

    def no_download(urls, *args, **kwargs):
        raise AssertionError(f"the tutorial tried to download {urls}: download=True should have found the local files")

    monkeypatch.setattr("neurenix.data.mnist.download_file", no_download)
    monkeypatch.chdir(folder)
    with pyplot() as real_pyplot:
        return run_block(blocks[name], name), real_pyplot


TUTORIALS = {
    "tutorial_ewc": ("ewc_accuracies", "no_ewc_accuracies", "ewc_comparison.png"),
    "tutorial_replay": ("replay_accuracies", "no_replay_accuracies", "experience_replay_comparison.png"),
}


@pytest.mark.parametrize("name", list(TUTORIALS))
def test_a_tutorial_runs_on_local_mnist_files_and_fetches_nothing(blocks, name, tmp_path, monkeypatch, capsys):
    generator = torch.Generator().manual_seed(0)
    write_mnist_files(tmp_path / "data", mnist_like(300, generator), mnist_like(200, generator))
    namespace, real_pyplot = run_tutorial(blocks, name, tmp_path, monkeypatch)

    with_method, without_method, figure = TUTORIALS[name]
    for accuracies in (namespace["task1_accuracies"], namespace[with_method], namespace[without_method]):
        assert len(accuracies) == 5 and all(0 <= a <= 1 for pair in accuracies for a in pair)
    assert namespace["task1_accuracies"][-1][0] > 0.9  # the made-up digits 0-4 are learnable
    assert namespace[with_method][-1][1] > 0.9 and namespace[without_method][-1][1] > 0.9  # and so are 5-9
    assert len(namespace["task1_dataset"]) + len(namespace["task2_dataset"]) == 300
    assert set(namespace["task2_test"].targets.tolist()) <= {5, 6, 7, 8, 9}  # filter_labels sees original labels
    assert {namespace["task2_test"][i][1] for i in range(len(namespace["task2_test"]))} <= {0, 1, 2, 3, 4}
    assert sorted(p.name for p in (tmp_path / "data" / "MNIST" / "raw").iterdir()) == sorted(
        f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
    )
    if real_pyplot:
        assert (tmp_path / figure).stat().st_size > 10_000
    assert capsys.readouterr().out.count("Epoch 5, Task 1 accuracy") == 3


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="no local Fashion-MNIST")
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "tutorial_ewc",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "measured: with the document's settings (importance=1000, Adam lr=1e-3, one shared head) "
                    "EWC keeps no more of task 1 than fine-tuning (Fashion-MNIST: 0.21 vs 0.21 on the full set, "
                    "and no better at any importance up to 1e7): the penalty is met while the ~2/3 of the "
                    "weights whose Fisher is ~0 carry the forgetting; see docs/methods/ewc.md"
                ),
            ),
        ),
        "tutorial_replay",
    ],
)
def test_a_tutorial_shows_what_it_claims_on_real_images(blocks, name, tmp_path, monkeypatch):
    """Fashion-MNIST (3,000 training and 1,000 test images) stands in for MNIST: the same file
    format, 28x28 images, ten classes. The tutorial runs unchanged, 5 epochs per phase."""
    write_mnist_files(tmp_path / "data", *fashion_mnist_slice(3000, 1000))
    namespace, _ = run_tutorial(blocks, name, tmp_path, monkeypatch)

    with_method, without_method, _ = TUTORIALS[name]
    kept_with, kept_without = namespace[with_method][-1][0], namespace[without_method][-1][0]
    assert namespace["task1_accuracies"][-1][0] > 0.8  # task 1 was learned
    assert kept_with > kept_without + 0.15, (kept_with, kept_without)  # "clearly higher" with the method
