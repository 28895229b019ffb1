"""Task-free training: the shift detector, boundaries found in real streams, consolidation mid-fit,
logging, accumulation, the plain-loop door and the cross-rank decision (two real processes)."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import EWC, ContinualLossMixin, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence
from neurenix.continual.boundary import ShiftDetector, TaskBoundaryDetector
from neurenix.data import FashionMNIST, permuted_benchmark, split_benchmark
from neurenix.data.stream import task_free_stream
from tests.helpers import quiet_trainer

FASHION = Path("/usr/share/datasets/fashion-mnist")
#: A detected boundary may come this many steps after the true one (the test window must fill).
DETECTION_DELAY = 3
#: The estimated change point is within this many steps of the true boundary.
CHANGE_TOLERANCE = 1


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, inputs: int, classes: int, hidden: int = 64, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def fit(model: L.LightningModule, loader: DataLoader, callbacks: list, **options) -> None:
    quiet_trainer(callbacks=callbacks, **options).fit(model, loader)


def accuracy(model: nn.Module, dataset) -> float:
    inputs, targets = dataset[:][:2]
    with torch.no_grad():
        return float((model(inputs).argmax(-1) == targets).float().mean())


def assert_found(detector: TaskBoundaryDetector, true_boundaries: list[int]) -> None:
    assert len(detector.boundaries) == len(true_boundaries), (detector.boundaries, true_boundaries)
    for found, change, true in zip(detector.boundaries, detector.change_points, true_boundaries):
        assert 0 <= found - true <= DETECTION_DELAY, (detector.boundaries, true_boundaries)
        assert abs(change - true) <= CHANGE_TOLERANCE, (detector.change_points, true_boundaries)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread each, or OpenMP threads spin against each other on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rule_stream(num_tasks: int = 3, steps: int = 40, batch: int = 16, seed: int = 0) -> tuple[DataLoader, list[int]]:
    """Task ``t`` labels by the sign of feature ``t`` (half its labels differ from the previous task's)."""
    generator = torch.Generator().manual_seed(seed)
    rules = torch.eye(8)[:num_tasks]
    x = torch.randn(num_tasks * steps * batch, 8, generator=generator)
    task = torch.arange(x.shape[0]) // (steps * batch)
    y = ((x * rules[task]).sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch), [steps * t for t in range(1, num_tasks)]


def fashion_subset(samples: int = 10000):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    datasets = (FashionMNIST(FASHION, train=train) for train in (True, False))
    return tuple(SimpleNamespace(data=d.data[:samples], targets=d.targets[:samples]) for d in datasets)


# ------------------------------------------------------------------------------------ detector core


def test_a_step_change_is_found_where_it_began():
    values = (torch.randn(300, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0).tolist()
    values[150:] = [v + 1.0 for v in values[150:]]
    detector = ShiftDetector(window=20, test_window=5, threshold=3.0)
    found = [(step, change) for step, v in enumerate(values) if (change := detector.update(v)) is not None]
    assert len(found) == 1 and found[0][1] == 150 and 150 <= found[0][0] <= 152


def test_noise_and_a_falling_learning_curve_never_trigger():
    noise = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    learning = [2.3 * 0.99**step + 0.05 * float(n) for step, n in enumerate(noise[:1000])]
    for values in (noise.tolist(), learning):
        detector = ShiftDetector()
        assert all(detector.update(v) is None for v in values)
    with pytest.raises(FloatingPointError, match="non-finite signal value at step 1000: nan"):
        detector.update(float("nan"))


def test_min_task_length_and_warmup_hold_detections_back():
    values = [1.0 + 0.01 * (k % 3) for k in range(40)] + [5.0] * 20
    # No option: found at once. min_task_length 41: one step later. Warm-up 35: the reference is
    # not full before the jump, which then becomes part of it: never found.
    for options, expected in (({}, [40]), ({"min_task_length": 41}, [41]), ({"warmup": 35}, [])):
        detector = ShiftDetector(window=10, test_window=2, **options)
        assert [step for step, v in enumerate(values) if detector.update(v) is not None] == expected


@pytest.mark.parametrize(
    "kwargs, error, message",
    [({"window": 1}, ValueError, "window must be >= 2, got 1"), ({"test_window": 0}, ValueError, "test_window must be >= 1"),
     ({"threshold": 0.0}, ValueError, "threshold must be > 0.0"), ({"min_increase": -1}, ValueError, "min_increase must be >= 0"),
     ({"signal": "f1"}, ValueError, "signal must be one of 'loss', 'accuracy'; got 'f1'"),
     ({"methods": [nn.Linear(2, 2)]}, TypeError, r"methods\[0\] must be a neurenix continual method"),
     ({"recent_batches": 0}, ValueError, "recent_batches must be >= 1")],
)
def test_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        TaskBoundaryDetector(**kwargs)


def test_state_round_trip_continues_identically():
    values = torch.rand(120, generator=torch.Generator().manual_seed(2)).tolist() + [9.0] * 10
    whole, first = ShiftDetector(window=10, test_window=2), ShiftDetector(window=10, test_window=2)
    expected = [whole.update(v) for v in values]
    head = [first.update(v) for v in values[:60]]
    resumed = ShiftDetector(window=10, test_window=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.update(v) for v in values[60:]] == expected
    assert any(change is not None for change in expected)


# ------------------------------------------------------------------------------------ real streams


def test_digits_class_incremental_boundaries_found_and_training_unchanged():
    stream = task_free_stream(split_benchmark("digits", 5, scenario="class"), passes=8)
    watched, plain = Classifier(64, 10), Classifier(64, 10)
    detector = TaskBoundaryDetector()
    fit(watched, stream.train_dataloader(), [detector])
    fit(plain, stream.train_dataloader(), [])
    assert_found(detector, stream.boundaries)
    assert detector.current_task == 4
    for a, b in zip(watched.parameters(), plain.parameters()):  # the detector only looks
        assert torch.equal(a, b)


def test_fashion_mnist_split_stream_boundaries_found():
    stream = task_free_stream(split_benchmark(fashion_subset(), 5, scenario="class"), passes=1)
    detector = TaskBoundaryDetector()
    fit(Classifier(784, 10), stream.train_dataloader(), [detector])
    assert_found(detector, stream.boundaries)


@pytest.mark.parametrize("source, passes", [("digits", 10), ("fashion", 2)])
def test_no_detection_in_a_stationary_stream(source, passes):
    data = "digits" if source == "digits" else fashion_subset()
    stream = task_free_stream(split_benchmark(data, 1, scenario="class"), passes=passes)
    assert stream.num_steps > 400
    for signal in ("loss", "accuracy"):
        detector = TaskBoundaryDetector(signal=signal)
        fit(Classifier(stream.train[0][0].numel(), 10), stream.train_dataloader(), [detector])
        assert detector.boundaries == []


def test_ewc_with_detected_boundaries_forgets_the_first_task_less():
    """Permuted digits, 3 tasks, one fit: without boundaries EWC never consolidates before the end
    (its penalty stays zero), so it forgets like plain training; with the detector it keeps task 0."""
    stream = task_free_stream(permuted_benchmark("digits", 3, scenario="domain"), passes=2)
    first_task = {}
    for variant in ("none", "ewc", "ewc+detector"):
        model = Classifier(64, 10)
        callbacks = [] if variant == "none" else [EWC(model.net, importance=1000.0, seed=0)]
        detector = TaskBoundaryDetector()
        fit(model, stream.train_dataloader(), callbacks + ([detector] if "detector" in variant else []))
        first_task[variant] = accuracy(model, stream.test[0])
    assert_found(detector, stream.boundaries)
    assert first_task["ewc"] == first_task["none"] < 0.6  # measured: 0.504
    assert first_task["ewc+detector"] > first_task["none"] + 0.2  # measured: 0.836


# ------------------------------------------------------------------------------------ mid-fit consolidation


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_every_method_consolidates_at_each_boundary_and_boundaries_are_logged():
    loader, true_boundaries = rule_stream()
    model = Classifier(8, 2, lr=1e-2)
    methods = [EWC(model.net, importance=1.0, seed=0), SynapticIntelligence(model.net, importance=0.1),
               L2Regularization(model.net, importance=0.01), KnowledgeDistillation(model.net, alpha=0.1),
               ExperienceReplay(model.net, memory_size=64, replay_ratio=0.25, seed=0)]
    detector = TaskBoundaryDetector(window=10, test_window=3)
    recorder = Recorder()
    fit(model, loader, [detector, *methods], logger=recorder, log_every_n_steps=1)
    assert_found(detector, true_boundaries)
    assert all(m.finished_tasks == [0, 1, 2] and m.active_task is None for m in methods)  # the fit's end: task 2
    # Task 0's Fisher came from the batches kept (the last 13) that precede the change, 16 samples each.
    kept_before_change = 13 - (detector.boundaries[0] - detector.change_points[0])
    assert methods[0]._tasks[0]["samples"] == kept_before_change * 16
    assert methods[0]._tasks[2]["samples"] == 13 * 16  # at the fit's end: the last 13, not the whole loader
    assert set(methods[4].memory.state_dict()["task_ids"].tolist()) == {0, 1, 2}
    markers = [(step, m["task_boundary/task"]) for step, m in recorder.logged if "task_boundary/task" in m]
    assert markers == [(step, float(task)) for task, step in enumerate(detector.boundaries, start=1)]
    assert sum("task_boundary/signal" in m for _, m in recorder.logged) == 120


def test_with_accumulation_a_boundary_waits_for_the_next_optimizer_step():
    loader, true_boundaries = rule_stream(steps=61)  # an odd task length: the shift arrives mid-step
    model = Classifier(8, 2, lr=1e-2)
    detector = TaskBoundaryDetector(window=10, test_window=3)
    fit(model, loader, [detector, L2Regularization(model.net, importance=0.01)], accumulate_grad_batches=2)
    assert len(detector.boundaries) == 2 and all(step % 2 == 0 for step in detector.boundaries)
    assert all(0 <= found - true <= DETECTION_DELAY + 1 for found, true in zip(detector.boundaries, true_boundaries))


def test_plain_loop_observe_then_train_step():
    loader, true_boundaries = rule_stream()
    net = Classifier(8, 2).net
    ewc = EWC(net, importance=10.0, seed=0)
    detector = TaskBoundaryDetector(net, [ewc], window=10, test_window=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    began = []
    for step, (inputs, targets) in enumerate(loader):
        if detector.observe(inputs, targets):
            began.append(step)
        ewc.train_step(optimizer, nn.functional.cross_entropy, inputs, targets, task_id=detector.current_task)
    assert began == detector.boundaries
    assert_found(detector, true_boundaries)
    assert ewc.finished_tasks == [0, 1] and ewc.active_task == 2
    assert all(ewc._tasks[task]["samples"] > 0 for task in (0, 1))
    with pytest.raises(ValueError, match="needs the model"):
        TaskBoundaryDetector().observe(inputs, targets)


# ------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        loader, true_boundaries = rule_stream(batch=16)
        net = Classifier(8, 2, seed=rank).net  # each rank its own model: local signals differ
        ewc = EWC(net, importance=10.0, seed=0)
        detector = TaskBoundaryDetector(net, [ewc], window=10, test_window=3)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        signals = []
        for inputs, targets in loader:
            shard = slice(rank * 8, rank * 8 + 8)  # each rank half of every global batch
            detector.observe(inputs[shard], targets[shard])
            signals.append(detector.last_signal)
            ewc.train_step(optimizer, nn.functional.cross_entropy, inputs[shard], targets[shard], detector.current_task)
        assert_found(detector, true_boundaries)
        torch.save({"boundaries": detector.boundaries, "signals": signals, "fisher": ewc._tasks[0]["samples"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_every_boundary(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    for _ in range(120):  # seconds: a disagreement would leave one rank waiting in a collective
        if context.join(timeout=1):
            break
    else:
        pytest.fail("the two-process job did not finish")
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first["boundaries"] == second["boundaries"] and len(first["boundaries"]) == 2
    assert first["signals"] == second["signals"]  # one global signal, bitwise equal on both ranks
    assert first["fisher"] == second["fisher"] > 0  # the Fisher's samples summed over both ranks
