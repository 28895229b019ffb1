"""ForgettingCurves logs what an independent evaluation measures, where TensorBoard reads it."""

from __future__ import annotations

import copy
import io

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import L2Regularization
from neurenix.metrics import ForgettingCurves
from neurenix.metrics import functional as MF
from neurenix.metrics.drawing import draw_accuracy_matrix
from tests.helpers import lit_classifier, make_mlp, make_task


class _Tasks(L.LightningDataModule):
    """The smallest task-sequence datamodule: what ForgettingCurves relies on, nothing more."""

    def __init__(self, num_tasks: int = 3) -> None:
        super().__init__()
        self.num_tasks, self.current_task = num_tasks, 0
        self.train = [_float(make_task(samples=32, seed=10 + t)) for t in range(num_tasks)]
        self.test = [_float(make_task(samples=20, seed=20 + t)) for t in range(num_tasks)]

    def train_dataloader(self):
        return DataLoader(self.train[self.current_task], batch_size=8)

    def test_dataloader(self):
        return [DataLoader(dataset, batch_size=7) for dataset in self.test]


def _float(dataset: TensorDataset) -> TensorDataset:
    x, y = dataset.tensors
    return TensorDataset(x.float(), y)


def _accuracies(net: torch.nn.Module, tasks: _Tasks, dtype: torch.dtype = torch.float32) -> list[float]:
    with torch.no_grad():
        return [(net(d.tensors[0].to(dtype)).argmax(1) == d.tensors[1]).float().mean().item() for d in tasks.test]


def _run_sequence(tmp_path, curves: ForgettingCurves, epochs_per_task: int = 1):
    tasks, net = _Tasks(), make_mlp(seed=3).float()
    expected = [_accuracies(net, tasks)]  # the untrained model first
    trainer = L.Trainer(
        callbacks=[curves, L2Regularization(net, importance=0.5)],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    steps = []
    for task in range(tasks.num_tasks):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = (task + 1) * epochs_per_task
        trainer.fit(lit_classifier(net), datamodule=tasks)
        expected.append(_accuracies(net, tasks))
        steps.append(trainer.global_step)
    return trainer, torch.tensor(expected[1:], dtype=torch.float64), torch.tensor(expected[0], dtype=torch.float64), steps


class _Events:
    """A run's TensorBoard events in step order.

    A plain ``trainer.fit`` per task writes one event file per fit, and TensorBoard reads them in
    the order of their names (``...<pid>.10`` before ``...<pid>.9``): not purged as out of order,
    then sorted by step.
    """

    def __init__(self, log_dir: str) -> None:
        self._events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0}, purge_orphaned_data=False)
        self._events.Reload()

    def Tags(self) -> dict:
        return self._events.Tags()

    def Scalars(self, tag: str) -> list:
        return sorted(self._events.Scalars(tag), key=lambda e: e.step)

    def Images(self, tag: str) -> list:
        return sorted(self._events.Images(tag), key=lambda e: e.step)

    def Tensors(self, tag: str) -> list:
        return sorted(self._events.Tensors(tag), key=lambda e: e.step)


def _scalars(trainer) -> _Events:
    return _Events(trainer.logger.log_dir)


def test_matrix_curves_and_summaries_match_an_independent_evaluation(tmp_path):
    curves = ForgettingCurves()
    trainer, r, b, steps = _run_sequence(tmp_path, curves)
    assert torch.allclose(curves.matrix.compute(), r, atol=1e-6)
    assert torch.allclose(curves.matrix.initial, b, atol=1e-6)

    events = _scalars(trainer)
    for task in range(3):
        logged = events.Scalars(f"accuracy/task_{task}")
        assert [e.step for e in logged] == [0, *steps]  # the untrained model, then each task's end
        assert [e.value for e in logged] == pytest.approx([b[task].item(), *r[:, task].tolist()], abs=1e-6)
    average = events.Scalars("continual/average_accuracy")
    assert [e.value for e in average] == pytest.approx([MF.average_accuracy(r, k).item() for k in range(3)], abs=1e-6)
    for tag, metric in [
        ("continual/backward_transfer", lambda k: MF.backward_transfer(r, k)),
        ("continual/forgetting", lambda k: MF.forgetting(r, k)),
        ("continual/forward_transfer", lambda k: MF.forward_transfer(r, b, k)),
    ]:
        logged = events.Scalars(tag)  # undefined after the first task: not logged there
        assert [e.step for e in logged] == steps[1:]
        assert [e.value for e in logged] == pytest.approx([metric(k).item() for k in (1, 2)], abs=1e-6)
    assert [e.step for e in events.Images("continual/accuracy_matrix")] == steps


def test_a_bf16_true_fit_is_evaluated_on_inputs_converted_as_its_batches_are():
    # Lightning casts the module and each batch to bfloat16; the test sets' float32 inputs must
    # be cast the same way (they used to reach the bfloat16 model as they were: a dtype error).
    tasks, net = _Tasks(), make_mlp(seed=3).float()
    expected = [_accuracies(copy.deepcopy(net).bfloat16(), tasks, torch.bfloat16)]
    curves = ForgettingCurves()
    trainer = L.Trainer(callbacks=[curves], precision="bf16-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    for task in range(tasks.num_tasks):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = task + 1
        trainer.fit(lit_classifier(net), datamodule=tasks)
        expected.append(_accuracies(net, tasks, torch.bfloat16))
    assert net[0].weight.dtype == torch.bfloat16
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(curves.matrix.initial, expected[0], atol=1e-6)
    assert torch.allclose(curves.matrix.compute(), expected[1:], atol=1e-6)


class _Recording(torch.nn.Module):
    """``net``, noting for each evaluation-mode forward whether CPU autocast was on."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.autocast_in_eval = net, []

    def forward(self, x):
        if not self.training:
            self.autocast_in_eval.append(torch.is_autocast_enabled("cpu"))
        return self.net(x)


def test_a_bf16_mixed_fit_is_evaluated_under_its_autocast_as_lightning_tests_it():
    tasks, net = _Tasks(num_tasks=2), _Recording(make_mlp(seed=3).float())
    curves = ForgettingCurves()
    trainer = L.Trainer(callbacks=[curves], precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    expected = []
    for task in range(tasks.num_tasks):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = task + 1
        trainer.fit(lit_classifier(net), datamodule=tasks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected.append(_accuracies(net.net, tasks))  # the inner net: not recorded
    # Three evaluations (before training, after each task) of two test sets of 3 batches each.
    assert net.autocast_in_eval == [True] * 3 * 2 * 3
    assert torch.allclose(curves.matrix.compute(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_curves_inside_tasks_every_n_epochs(tmp_path):
    trainer, r, _, steps = _run_sequence(tmp_path, ForgettingCurves(every_n_epochs=1), epochs_per_task=2)
    logged = _scalars(trainer).Scalars("accuracy/task_0")
    # initial, then per task: after its first epoch (half-way) and at its end
    halfway = [s // 2 if i == 0 else (steps[i - 1] + s) // 2 for i, s in enumerate(steps)]
    assert [e.step for e in logged] == sorted([0, *halfway, *steps])
    assert [e.value for e in logged if e.step in steps] == pytest.approx(r[:, 0].tolist(), abs=1e-6)


def test_any_logger_gets_the_scalars(tmp_path):
    tasks, net = _Tasks(num_tasks=2), make_mlp().float()
    trainer = L.Trainer(callbacks=[ForgettingCurves()], logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_checkpointing=False)
    for task in range(2):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = task + 1
        trainer.fit(lit_classifier(net), datamodule=tasks)
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "accuracy/task_1" in text and "continual/backward_transfer" in text


def test_state_round_trip_and_a_datamodule_without_tasks(tmp_path):
    curves = ForgettingCurves()
    _run_sequence(tmp_path, curves)
    restored = ForgettingCurves()
    restored.load_state_dict(copy.deepcopy(curves.state_dict()))
    assert torch.equal(restored.matrix.compute().nan_to_num(-1), curves.matrix.compute().nan_to_num(-1))

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(_float(make_task()), batch_size=8)

    with pytest.raises(ValueError, match=r"Plain lacks \['num_tasks', 'current_task'\]"):
        L.Trainer(callbacks=[ForgettingCurves()], logger=False, enable_progress_bar=False).fit(
            lit_classifier(make_mlp().float()), datamodule=Plain()
        )


def test_every_n_epochs_is_checked():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1, got 0"):
        ForgettingCurves(every_n_epochs=0)


def test_the_shares_of_a_test_loader_cover_each_sample_once():
    """Under DDP each rank evaluates loader samples rank, rank + world_size, ... (a TaskDataset
    through the datamodule's own loader, batched by tensor index)."""
    from neurenix.data import TaskSequenceDataModule
    from neurenix.data.tasks import TaskDataset
    from neurenix.metrics.forgetting_curves import _share, _splittable

    task = TaskDataset(torch.arange(23.0).unsqueeze(1), torch.arange(23), 0)  # inputs name the samples
    loader = TaskSequenceDataModule([task], [task], eval_batch_size=4).test_dataloader()[0]
    assert _splittable(loader)
    seen = []
    for rank in range(3):
        batches = list(_share(loader, rank, 3))
        assert all(len(x) <= 4 and torch.equal(x[:, 0].long(), y) for x, y in batches)
        seen.append(torch.cat([y for _, y in batches]).tolist())
    assert seen == [list(range(r, 23, 3)) for r in range(3)]
    assert not _splittable([(torch.zeros(2, 1), torch.zeros(2))])  # not a DataLoader: every rank evaluates all


# ---------------------------------------------------------------------------- what a user reads
def _images(events: _Events) -> list[bytes]:
    return [Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB").tobytes() for e in events.Images("continual/accuracy_matrix")]


def _tables(events: _Events) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors("continual/accuracy_matrix/text_summary")]


def _exact(r: torch.Tensor, samples: int = 20) -> torch.Tensor:
    """Accuracies measured in float32 as the counts' exact ratios (a colour may change at the last digit)."""
    return (r * samples).round() / samples


def _up_to(r: torch.Tensor, row: int) -> torch.Tensor:
    """``r`` as measured after its ``row``-th task: later rows not measured yet."""
    partial = r.clone()
    partial[row + 1 :] = float("nan")
    return partial


def test_tensorboard_gets_the_matrix_as_a_labelled_figure_and_a_table(tmp_path):
    trainer, r, _, _ = _run_sequence(tmp_path, ForgettingCurves())
    r = _exact(r)
    events = _scalars(trainer)
    figures = [draw_accuracy_matrix(_up_to(r, k), [0, 1, 2], title=f"Test accuracy after task {k}") for k in range(3)]
    assert _images(events) == [figure.tobytes() for figure in figures]
    assert all(figure.size == figures[0].size for figure in figures) and figures[0].width > 120
    header = "| after \\ on | task 0 | task 1 | task 2 |\n|---|---|---|---|\n"
    rows = ["| task {} | {:.3f} | {:.3f} | {:.3f} |".format(k, *r[k].tolist()) for k in range(3)]
    assert _tables(events) == [header + "\n".join(rows[: k + 1]) for k in range(3)]


class _TasksNumberedFrom1(_Tasks):
    """A datamodule of a user's own whose tasks are 1 and 2, as in the API's examples."""

    def __init__(self) -> None:
        super().__init__(num_tasks=2)
        self.current_task = 1

    def train_dataloader(self):
        return DataLoader(self.train[self.current_task - 1], batch_size=8)


def test_task_ids_a_user_gives_label_every_output_as_the_methods_number_the_tasks(tmp_path):
    tasks, net = _TasksNumberedFrom1(), make_mlp(seed=3).float()
    curves, l2 = ForgettingCurves(every_n_epochs=1, task_ids=[1, 2]), L2Regularization(net, importance=0.5)
    trainer = L.Trainer(callbacks=[curves, l2], logger=TensorBoardLogger(tmp_path, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    expected = []
    for task in (1, 2):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = 2 * task
        trainer.fit(lit_classifier(net), datamodule=tasks)
        expected.append(_accuracies(net, tasks))
    r = _exact(torch.tensor(expected, dtype=torch.float64))
    assert curves.task_ids == l2.finished_tasks == [1, 2]
    assert torch.allclose(curves.matrix.compute(), r, atol=1e-6)

    events = _scalars(trainer)
    assert {tag for tag in events.Tags()["scalars"] if tag.startswith("accuracy/")} == {"accuracy/task_1", "accuracy/task_2"}
    ends = [e for e in events.Scalars("accuracy/task_2") if e.step in (8, 16)]  # 4 steps an epoch, 2 epochs a task
    assert [e.value for e in ends] == pytest.approx(r[:, 1].tolist(), abs=1e-6)
    assert _tables(events)[-1] == (
        "| after \\ on | task 1 | task 2 |\n|---|---|---|\n"
        + "| task 1 | {:.3f} | {:.3f} |\n| task 2 | {:.3f} | {:.3f} |".format(*r.flatten().tolist())
    )
    assert _images(events)[-1] == draw_accuracy_matrix(r, [1, 2], title="Test accuracy after task 2").tobytes()


def test_a_current_task_that_is_not_one_of_the_tasks_is_refused_before_it_trains():
    tasks, net = _TasksNumberedFrom1(), make_mlp(seed=3).float()
    tasks.current_task = 2  # numbered from 1, but ForgettingCurves was not told
    before = copy.deepcopy(net.state_dict())
    curves = ForgettingCurves()
    trainer = L.Trainer(callbacks=[curves], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=1)
    message = (
        r"the datamodule's current_task is 2, which is not one of its tasks \[0, 1\] \(the ids of "
        r"test_dataloader\(\)'s loaders\): number the tasks 0..1 .* ForgettingCurves\(task_ids=\[...\]\)"
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(lit_classifier(net), datamodule=tasks)
    assert all(torch.equal(before[name], value) for name, value in net.state_dict().items())  # not a step taken
    assert int(curves.matrix.total.sum()) == 0

    tasks.current_task = 0
    with pytest.raises(ValueError, match=r"current_task is 0, which is not one of its tasks \[1, 2\].*make current_task one of them"):
        L.Trainer(callbacks=[ForgettingCurves(task_ids=[1, 2])], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, max_epochs=1).fit(lit_classifier(net), datamodule=tasks)


@pytest.mark.parametrize(
    "task_ids, error, message",
    [
        ("12", TypeError, "task_ids must be a sequence of ints, got str: '12'"),
        ([1, "2"], TypeError, r"task_ids must hold ints, got str '2' in \[1, '2'\]"),
        ([1, True], TypeError, "got bool True"),
        ([], ValueError, r"task_ids must name each task once \(at least one\), got \[\]"),
        ([1, 1], ValueError, r"task_ids must name each task once \(at least one\), got \[1, 1\]"),
    ],
)
def test_task_ids_are_checked(task_ids, error, message):
    with pytest.raises(error, match=message):
        ForgettingCurves(task_ids=task_ids)


def test_task_ids_must_name_one_task_per_test_loader():
    with pytest.raises(ValueError, match=r"task_ids=\[1, 2, 3\] names 3 tasks, but _Tasks has 2: give one id per test loader"):
        L.Trainer(callbacks=[ForgettingCurves(task_ids=[1, 2, 3])], logger=False, enable_progress_bar=False).fit(
            lit_classifier(make_mlp().float()), datamodule=_Tasks(num_tasks=2)
        )


def test_a_library_sequence_is_labelled_from_0_as_the_methods_number_it(tmp_path):
    from neurenix.data import TaskSequenceDataModule, fit_sequence

    source = _Tasks(num_tasks=2)
    datamodule = TaskSequenceDataModule(source.train, source.test, batch_size=8)
    net = make_mlp(seed=3).float()
    curves, l2 = ForgettingCurves(), L2Regularization(net, importance=0.5)
    trainer = L.Trainer(callbacks=[curves, l2], logger=TensorBoardLogger(tmp_path, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    fit_sequence(trainer, lit_classifier(net), datamodule, epochs_per_task=1)
    assert curves.task_ids == l2.finished_tasks == datamodule.tasks_seen == [0, 1]
    events = _scalars(trainer)
    assert {tag for tag in events.Tags()["scalars"] if tag.startswith("accuracy/")} == {"accuracy/task_0", "accuracy/task_1"}
    assert _tables(events)[-1].splitlines()[0] == "| after \\ on | task 0 | task 1 |"


# ------------------------------------------------------------------------------------ predictor
class _Predictor:
    """Scores from a network of its own; records what each call saw."""

    def __init__(self, module_to_watch: torch.nn.Module) -> None:
        self.net, self.watched, self.calls = make_mlp(seed=8).float(), module_to_watch, []

    def __call__(self, inputs, task_ids=None):
        self.calls.append((torch.is_grad_enabled(), self.watched.training, task_ids))
        return self.net(inputs)


def test_a_predictor_is_evaluated_after_each_task_in_place_of_the_module(tmp_path):
    tasks, net = _Tasks(), make_mlp(seed=3).float()
    module = lit_classifier(net)
    predictor = _Predictor(module)
    curves = ForgettingCurves(predictor=predictor)
    untrained = _accuracies(net, tasks)
    trainer = L.Trainer(callbacks=[curves], logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    for task in range(tasks.num_tasks):
        tasks.current_task = task
        trainer.fit_loop.max_epochs = task + 1
        trainer.fit(module, datamodule=tasks)
    # The predictor's network never trains: every row is its accuracy; the untrained row the module's.
    predicted = torch.tensor(_accuracies(predictor.net, tasks), dtype=torch.float64)
    assert torch.allclose(curves.matrix.accuracies(), predicted.expand(3, 3), atol=1e-6)
    assert curves.matrix.initial.tolist() == pytest.approx(untrained)
    assert _accuracies(predictor.net, tasks) != _accuracies(net, tasks)  # the two are told apart
    # Called as the module would be: without gradients, the module in eval mode, once per test batch.
    assert len(predictor.calls) == 3 * 3 * 3 and set(predictor.calls) == {(False, False, None)}


def test_predictor_must_be_callable():
    with pytest.raises(TypeError, match=r"predictor must be a callable \(inputs, task_ids\) -> \(N, C\) scores, got int: 3"):
        ForgettingCurves(predictor=3)
