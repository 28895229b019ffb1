"""The command's runs: which data it read, how data errors end, which strategies it refuses."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from neurenix.cli import main, runs
from neurenix.cli.parser import build_parser
from neurenix.cli.runs import (
    DataSource,
    MLPClassifier,
    load_benchmark,
    make_trainer,
    method_callbacks,
    run_method,
)
from neurenix.cli.settings import METHOD_SETTINGS, CompareError, UsageError
from neurenix.continual import (
    AGEM,
    ERACE,
    GEM,
    MAS,
    BiC,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    RWalk,
)
from neurenix.continual.seen_classes import SeenClassMask
from tests.data.test_idx import write_idx
from tests.data.test_mnist import DEBIAN_FASHION_MNIST, write_dataset

TINY = ["--methods", "none", "--epochs", "1", "--num_tasks", "2", "--accelerator", "cpu"]


def data_settings(dataset: str, root: Path, **changes) -> SimpleNamespace:
    values = dict(dataset=dataset, data_root=str(root), download=False, benchmark="split", num_tasks=2, seed=0, scenario="domain")
    return SimpleNamespace(**{**values, **changes})


def test_the_description_names_mnist_and_the_folder_its_files_were_read_from(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw")  # ten classes, 30 training and 20 test images
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main([*TINY, "--dataset", "mnist", "--data_root", str(tmp_path), "--output", str(tmp_path / "out")])
    assert status == 0
    first = stdout.getvalue().splitlines()[0]
    assert first.startswith(f"split MNIST from {tmp_path / 'MNIST' / 'raw'}, domain-incremental, tasks 0-1 (classes ")


def test_files_directly_in_the_root_are_named_by_the_root(tmp_path):
    write_dataset(tmp_path)
    benchmark, data = load_benchmark(data_settings("fashion_mnist", tmp_path))
    assert data == DataSource("Fashion-MNIST", tmp_path) and benchmark.num_tasks == 2


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST is not installed")
def test_fashion_mnist_given_as_mnist_is_named_fashion_mnist_with_a_one_line_warning():
    # The output said "split mnist" while the tasks were clothing.
    benchmark, data = load_benchmark(data_settings("mnist", DEBIAN_FASHION_MNIST, num_tasks=5))
    assert (data.name, data.folder, data.requested) == ("Fashion-MNIST", DEBIAN_FASHION_MNIST, "mnist")
    assert data.warnings == [
        f"--data_root {str(DEBIAN_FASHION_MNIST)!r} holds Fashion-MNIST, not MNIST: it is read as given "
        "(--dataset mnist); the results are about Fashion-MNIST"
    ]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("truncate", "mnist data in --data_root '{root}': "),
        ("count", "mnist data in --data_root '{root}': "),  # images and labels of different counts
        ("remove", "no mnist data: --data_root '{root}' lacks its IDX files"),
    ],
)
def test_a_data_error_ends_with_one_line_naming_data_root_and_status_1(tmp_path, capsys, damage, says):
    root = tmp_path / "data"
    write_dataset(root / "MNIST" / "raw")
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    if damage == "truncate":
        labels.write_bytes(labels.read_bytes()[:-5])
    elif damage == "count":
        write_idx(labels, np.zeros(7, dtype=np.uint8))
    else:
        labels.unlink()
    assert main([*TINY, "--dataset", "mnist", "--data_root", str(root), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neurenix: error: " + says.format(root=root)), err
    assert not (tmp_path / "out").exists()


def test_a_missing_root_is_a_run_failure_naming_data_root(tmp_path):
    with pytest.raises(CompareError, match=r"no mnist data: --data_root '.*nowhere' does not exist; point --data_root"):
        load_benchmark(data_settings("mnist", tmp_path / "nowhere"))


def hardware(strategy: str, devices=2) -> SimpleNamespace:
    return SimpleNamespace(accelerator="cpu", devices=devices, strategy=strategy)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook_find_unused_parameters_false"])
@pytest.mark.parametrize("devices", [1, 2])
def test_make_trainer_refuses_multiprocessing_strategies(strategy, devices):
    with pytest.raises(UsageError) as error:
        make_trainer(hardware(strategy, devices), logger=False, enable_progress_bar=False)
    start = "spawn" if "spawn" in strategy else "fork"
    assert str(error.value) == (
        f"--strategy {strategy}: its processes start from this one (multiprocessing, {start!r}), which the "
        "continual-learning methods cannot run in; use --strategy ddp"
    )


@pytest.mark.parametrize("strategy", ["ddp", "auto", "ddp_find_unused_parameters_true"])
def test_make_trainer_takes_the_strategies_that_run_the_command_once_per_device(strategy):
    trainer = make_trainer(hardware(strategy), logger=False, enable_progress_bar=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2


# ---------------------------------------------------------------------------- the rehearsal methods
#: Each rehearsal method's name in the command, its class, and settings unlike the defaults.
REHEARSAL = {
    "replay": (ExperienceReplay, {"memory_size": 37, "replay_ratio": 0.5, "offer": "once"}),
    "der": (DarkExperienceReplay, {"memory_size": 37, "alpha": 0.7, "replay_ratio": 0.5}),
    "derpp": (DarkExperienceReplay, {"memory_size": 37, "alpha": 0.7, "beta": 0.3, "replay_ratio": 0.5}),
    "er_ace": (ERACE, {"memory_size": 37, "replay_ratio": 0.5}),
    "agem": (AGEM, {"memory_size": 37, "reference_size": 5}),
    "gem": (GEM, {"memory_size": 37, "margin": 0.25}),
    "icarl": (ICaRL, {"memory_size": 37, "replay_ratio": 0.5}),
    "bic": (BiC, {"memory_size": 37, "replay_ratio": 0.5}),
    "gdumb": (GDumb, {"memory_size": 37}),
}


def command_settings(*flags: str):
    """The settings a ``neurenix`` command line gives (defaults for what ``flags`` leave out)."""
    return build_parser().parse_args(["compare", *flags]).compare


@pytest.mark.parametrize("name", REHEARSAL)
def test_each_rehearsal_name_builds_its_class_with_the_settings_given(name):
    cls, values = REHEARSAL[name]
    settings = command_settings(*[arg for key, value in values.items() for arg in (f"--{name}.{key}", str(value))])
    methods = method_callbacks(name, MLPClassifier(4, 3), settings, "class")
    assert [type(method) for method in methods] == [cls]
    # every setting reaches the method, and der (DER++'s beta left at 0) is DER
    expected = {**dict(values), **({"beta": 0.0} if name == "der" else {})}
    options = ("selection", "held_out", "temperature")  # the methods' own defaults, not the command's
    assert {key: value for key, value in methods[0].hyperparameters().items() if key not in options} == expected
    assert set(dataclasses.asdict(METHOD_SETTINGS[name]())) | ({"beta"} if name == "der" else set()) == set(expected)


#: Issue 17's importance methods: name, class, settings unlike the defaults.
IMPORTANCE = {
    "mas": (MAS, {"importance": 0.25, "sample_size": 37}),
    "rwalk": (RWalk, {"importance": 0.25, "alpha": 0.5, "epsilon": 0.01, "interval": 3}),
}


@pytest.mark.parametrize("name", IMPORTANCE)
def test_each_importance_name_builds_its_class_with_the_settings_given(name):
    cls, values = IMPORTANCE[name]
    settings = command_settings(*[arg for key, value in values.items() for arg in (f"--{name}.{key}", str(value))])
    methods = method_callbacks(name, MLPClassifier(4, 3), settings, "task")
    assert [type(method) for method in methods] == [cls]
    assert methods[0].hyperparameters() == values
    assert set(dataclasses.asdict(METHOD_SETTINGS[name]())) == set(values)


def test_der_and_derpp_defaults_are_the_papers_and_differ_only_in_the_second_memory_batch():
    der, derpp = (method_callbacks(name, MLPClassifier(4, 3), command_settings(), "class")[0] for name in ("der", "derpp"))
    assert der.hyperparameters() == {"memory_size": 200, "alpha": 0.2, "beta": 0.0, "replay_ratio": 1.0}
    assert derpp.hyperparameters() == {"memory_size": 200, "alpha": 0.2, "beta": 1.0, "replay_ratio": 1.0}


class _TaskIdRecorder(MLPClassifier):
    """The command's multi-head model, recording the inputs and task ids of every forward that builds a graph."""

    calls: ClassVar[list] = []  # replaced by each test (monkeypatch)

    def forward(self, x, task_ids=None):
        if torch.is_grad_enabled():  # training forwards: the new batch's and the memory's, not evaluation
            type(self).calls.append((x.detach().flatten(1).clone(), None if task_ids is None else task_ids.detach().clone()))
        return super().forward(x, task_ids)


@pytest.mark.parametrize("name", ["der", "derpp", "er_ace", "agem", "gem"])
def test_under_scenario_task_every_forward_gets_each_samples_own_task_id(name, tmp_path, monkeypatch):
    # A multi-head model picks each sample's head by its task id: the memory forwards (DER's
    # memory batches, ER-ACE's replayed batch, A-GEM's and GEM's reference gradients) must pass
    # the stored ids of remembered samples, not the current task's.
    monkeypatch.setattr(runs, "MLPClassifier", _TaskIdRecorder)
    monkeypatch.setattr(_TaskIdRecorder, "calls", [])
    flags = ["--scenario", "task", "--num_tasks", "2", "--epochs", "1", "--accelerator", "cpu", f"--{name}.memory_size", "40"]
    settings = command_settings(*flags)
    benchmark, _ = load_benchmark(settings)
    with runs.quiet_lightning(), runs.cpu_threads(settings.threads):  # as the command runs it
        run_method(name, settings, benchmark, tmp_path, progress=False)
    task_of = _task_of_each_input(benchmark)
    tasks_per_call = []
    for inputs, task_ids in _TaskIdRecorder.calls:
        assert task_ids is not None and task_ids.shape == (inputs.shape[0],)
        pairs = [(task_of[key], int(given)) for key, given in zip(map(_key, inputs), task_ids) if key in task_of]
        assert pairs and all(true == given for true, given in pairs), name
        tasks_per_call.append({true for true, _ in pairs})
    # after task 1's first step, forwards holding task 0's samples are the memory's
    first_of_task_1 = next(index for index, tasks in enumerate(tasks_per_call) if 1 in tasks)
    assert any(0 in tasks for tasks in tasks_per_call[first_of_task_1:])


def _key(sample: torch.Tensor) -> bytes:
    return sample.flatten().to(torch.float32).numpy().tobytes()


def _task_of_each_input(benchmark) -> dict[bytes, int]:
    """Each training input's task, leaving out any image that occurs in two tasks."""
    seen: dict[bytes, set] = {}
    for task, dataset in enumerate(benchmark.train):
        for index in range(len(dataset)):
            seen.setdefault(_key(dataset[index][0]), set()).add(task)
    return {key: next(iter(tasks)) for key, tasks in seen.items() if len(tasks) == 1}


def test_icarl_ranks_the_commands_model_by_its_body_and_refuses_one_head_per_task():
    icarl = method_callbacks("icarl", MLPClassifier(4, 3), command_settings(), "class")[0]
    assert icarl.hyperparameters()["selection"] == "herding"
    model = icarl.model
    assert icarl.classifier.extractor.module is model.body  # the features feeding the head
    for name in ("icarl", "bic"):
        with pytest.raises(UsageError, match=f"--{name}: {name} learns classes incrementally over one head: use --scenario class"):
            method_callbacks(name, MLPClassifier(4, 3, heads=2), command_settings(), "task")


@pytest.mark.parametrize("name", ["icarl", "bic", "replay"])
def test_a_method_with_a_classifier_of_its_own_is_measured_by_it(name, tmp_path, monkeypatch):
    # The command's table reports what iCaRL predicts, the nearest mean of exemplars, not its
    # head; the curves then have a point at each task's end only (no means before a task ends).
    made = []

    class Recording(runs.ForgettingCurves):
        def __init__(self, **kwargs):
            made.append(kwargs)
            super().__init__(**kwargs)

    built = []
    monkeypatch.setattr(runs, "ForgettingCurves", Recording)
    monkeypatch.setitem(runs._BUILDERS, name, lambda *args, builder=runs._BUILDERS[name]: built.extend(builder(*args)) or built)
    settings = command_settings("--methods", name, "--epochs", "1", "--num_tasks", "2", "--seed", "1",
                                "--accelerator", "cpu", "--output", str(tmp_path), "--scenario", "class")
    run, _ = runs.run_method(name, settings, runs.load_benchmark(settings)[0], tmp_path, progress=False)
    if name in ("icarl", "bic"):
        assert made == [{"every_n_epochs": None, "predictor": built[0].classifier}]
    else:
        assert made == [{"every_n_epochs": 1, "predictor": None}]
    assert run.matrix.shape == (2, 2)


# ---------------------------------------------------------------------------- issue 18: baselines and options
#: The command's method builders, as the module defines them (tests wrap them).
BUILDERS = dict(runs._BUILDERS)


class _Seen(Callback):
    """Records, at each task's fit start, the size of its training data and the classes its mask has marked."""

    def __init__(self) -> None:
        self.sizes, self.marked, self.alphas = [], [], []

    def on_train_start(self, trainer, pl_module):
        self.sizes.append(len(trainer.train_dataloader.dataset))
        self.marked.append(None if pl_module.mask is None else pl_module.mask.seen_classes)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # the distillation weight each task trains with
            self.alphas += [method.current_alpha for method in trainer.callbacks if hasattr(method, "current_alpha")]


def _tiny_run(name: str, tmp_path: Path, monkeypatch, *flags: str):
    """run_method on two tasks, one epoch each: (its run, the trainer, the model, the fits seen, the methods built)."""
    seen, made, built = _Seen(), {}, []
    real_make, real_fit = runs.make_trainer, runs.fit_sequence

    def make_trainer(settings, callbacks=(), **options):
        return real_make(settings, callbacks=[*callbacks, seen], **options)

    def fit_sequence(trainer, model, datamodule, **options):
        made.update(trainer=trainer, model=model, datamodule=datamodule, options=options)
        return real_fit(trainer, model, datamodule, **options)

    monkeypatch.setattr(runs, "make_trainer", make_trainer)
    monkeypatch.setattr(runs, "fit_sequence", fit_sequence)
    if name in BUILDERS:

        def build(*args):
            built.extend(BUILDERS[name](*args))
            return list(built)

        monkeypatch.setitem(runs._BUILDERS, name, build)
    settings = command_settings("--num_tasks", "2", "--epochs", "1", "--accelerator", "cpu", *flags)
    benchmark, _ = load_benchmark(settings)
    with runs.quiet_lightning(), runs.cpu_threads(settings.threads):
        run, _ = run_method(name, settings, benchmark, tmp_path, progress=False)
    return run, benchmark, made, seen, built


def test_the_baselines_train_on_the_data_of_their_regime(tmp_path, monkeypatch):
    none, benchmark, made, seen, _ = _tiny_run("none", tmp_path / "none", monkeypatch)
    first, second = (len(task) for task in benchmark.train)
    assert made["datamodule"].training == "sequential" and seen.sizes == [first, second]
    cumulative, _, made, seen, _ = _tiny_run("cumulative", tmp_path / "cumulative", monkeypatch)
    assert made["datamodule"].training == "cumulative" and seen.sizes == [first, first + second]
    assert torch.equal(cumulative.matrix[0], none.matrix[0])  # the same seed: the same first task's fit
    assert cumulative.training == "cumulative" and cumulative.hyperparameters == {}
    joint, _, made, seen, _ = _tiny_run("joint", tmp_path / "joint", monkeypatch)
    assert made["datamodule"].training == "joint" and seen.sizes == [first + second]  # one fit, on every task
    assert joint.matrix[0].isnan().all() and not joint.matrix[1].isnan().any()
    assert joint.average_accuracy == pytest.approx(float(joint.matrix[1].mean()))
    assert np.isnan(joint.backward_transfer) and np.isnan(joint.forgetting)
    assert method_callbacks("joint", MLPClassifier(4, 3), command_settings(), "class") == []


def _adam_steps(trainer) -> int:
    return int(trainer.optimizers[0].state_dict()["state"][0]["step"])


def test_keep_optimizer_state_carries_adams_steps_across_tasks(tmp_path, monkeypatch):
    _, benchmark, fresh, _, _ = _tiny_run("none", tmp_path / "fresh", monkeypatch)
    steps = [-(-len(task) // 32) for task in benchmark.train]  # batches of 32 per task, the last one short
    assert fresh["options"]["keep_optimizer_state"] is False and _adam_steps(fresh["trainer"]) == steps[1]
    _, _, kept, _, _ = _tiny_run("none", tmp_path / "kept", monkeypatch, "--keep_optimizer_state")
    assert kept["options"]["keep_optimizer_state"] is True and _adam_steps(kept["trainer"]) == sum(steps)


def test_mask_unseen_classes_ends_the_mlp_in_a_mask_marked_task_by_task(tmp_path, monkeypatch):
    flags = ("--scenario", "class", "--mask_unseen_classes")
    run, benchmark, made, seen, _ = _tiny_run("none", tmp_path, monkeypatch, *flags)
    model = made["model"]
    assert isinstance(model.mask, SeenClassMask) and model.mask.num_classes == benchmark.num_classes == 10
    assert seen.marked == [[0, 1, 2, 3, 4], list(range(10))]  # class-incremental labels: task 0's, then both tasks'
    assert run.matrix[0, 1] == 0  # after task 0 no class of task 1 can be predicted: their logits are masked
    logits = model(torch.zeros(3, *benchmark.input_shape))
    assert not (logits == torch.finfo(logits.dtype).min).any()  # every class seen by the end
    unmasked, _, made, seen, _ = _tiny_run("none", tmp_path / "plain", monkeypatch, "--scenario", "class")
    assert made["model"].mask is None and seen.marked == [None, None]
    assert not torch.equal(unmasked.matrix, run.matrix)


def test_distillation_alpha_follows_one_minus_one_over_t(tmp_path, monkeypatch):
    run, _, _, seen, built = _tiny_run("distillation", tmp_path, monkeypatch, "--distillation.alpha", "1-1/t")
    assert run.hyperparameters["alpha"] == "1-1/t" and built[0].hyperparameters()["alpha"] == "1-1/t"
    assert seen.alphas == [0.0, 0.5]  # t = 1, then 2
    _, _, _, seen, _ = _tiny_run("distillation", tmp_path / "constant", monkeypatch, "--distillation.alpha", "0.25")
    assert seen.alphas == [0.25, 0.25]


def test_replay_offer_once_offers_each_sample_once_per_task(tmp_path, monkeypatch):
    offered = {}
    for offer in ("every_epoch", "once"):
        run, benchmark, _, _, built = _tiny_run("replay", tmp_path / offer, monkeypatch, "--epochs", "2", "--replay.offer", offer)
        offered[offer] = built[0].memory.num_seen
        assert run.hyperparameters.get("offer", "every_epoch") == offer
    samples = sum(len(task) for task in benchmark.train)
    assert offered == {"every_epoch": 2 * samples, "once": samples}


def test_run_many_refuses_a_bad_jobs_count():
    for jobs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"jobs must be an int >= 1, got {jobs!r}")):
            runs.run_many([], jobs)


def test_keep_on_device_reaches_the_data_module(tmp_path, monkeypatch):
    _, _, plain, _, _ = _tiny_run("none", tmp_path / "plain", monkeypatch)
    assert plain["datamodule"].keep_on_device is False and plain["datamodule"]._tasks_device is None
    _, _, kept, _, _ = _tiny_run("none", tmp_path / "kept", monkeypatch, "--keep_on_device")
    assert kept["datamodule"].keep_on_device is True and str(kept["datamodule"]._tasks_device) == "cpu"
