"""Every method's state travels in Lightning checkpoints: a run stopped in the middle of task 2
and resumed from its checkpoint by fresh objects ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import (
    EWC,
    MAS,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from tests.helpers import lit_classifier, make_mlp, make_task, quiet_trainer


def _task(seed: int) -> DataLoader:
    x, y = make_task(samples=32, seed=seed).tensors
    return DataLoader(TensorDataset(x.float(), y), batch_size=8, shuffle=False)


def _methods(net: torch.nn.Module, seed: int) -> list:
    # Seeds differ between the runs on purpose: the restored generators must win.
    return [
        EWC(net, importance=20.0, fisher_sample_size=16, seed=seed),
        ExperienceReplay(net, memory_size=10, replay_ratio=0.5, seed=seed + 1),
        SynapticIntelligence(net, importance=0.5),
        L2Regularization(net, importance=0.1),
        KnowledgeDistillation(net, temperature=2.0, alpha=0.3),
        MAS(net, importance=0.5, sample_size=16, seed=seed + 2),
        RWalk(net, importance=0.5, interval=3),  # 4 steps an epoch: the checkpoint falls mid-interval
    ]


class _Probe(L.Callback):
    """Records what the methods would do next, at the end of task 2's first epoch."""

    def __init__(self, methods: list) -> None:
        self.methods, self.seen = methods, None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.methods[0].finished_tasks == [0] and trainer.current_epoch == 0:
            self.seen = _next_moves(self.methods)


def _next_moves(methods: list) -> dict:
    ewc, replay, si, l2, distillation, mas, rwalk = methods
    memory = copy.deepcopy(replay.memory)
    probe_inputs = _task(9).dataset.tensors[0]
    with torch.no_grad():
        return {
            "ewc": ewc.get_ewc_loss(),
            "si": si.get_regularization_loss(),
            "l2": l2.get_regularization_loss(),
            "kd": distillation.get_distillation_loss(probe_inputs, ewc.model(probe_inputs)),
            "replay": memory.sample(4),
            "omega": si.omega,
            "mas": mas.get_regularization_loss(),
            "rwalk": rwalk.get_regularization_loss(),
            "rwalk_fisher": rwalk.fisher,
            "rwalk_task_scores": rwalk.task_scores,
        }


def test_resume_in_the_middle_of_task_2_matches_the_uninterrupted_run(tmp_path):
    init = make_mlp(seed=7).float()

    # Uninterrupted: task 0 for one epoch, task 1 for two.
    net = copy.deepcopy(init)
    methods = _methods(net, seed=100)
    probe = _Probe(methods)
    quiet_trainer(callbacks=[*methods, probe]).fit(lit_classifier(net), _task(1))
    quiet_trainer(callbacks=[*methods, probe], max_epochs=2).fit(lit_classifier(net), _task(2))

    # Interrupted: the same, but task 1 stops after its first epoch, leaving a checkpoint.
    stopped = copy.deepcopy(init)
    stopped_methods = _methods(stopped, seed=100)
    quiet_trainer(callbacks=stopped_methods).fit(lit_classifier(stopped), _task(1))
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    quiet_trainer(callbacks=[*stopped_methods, saver], enable_checkpointing=True).fit(lit_classifier(stopped), _task(2))
    (checkpoint,) = tmp_path.glob("*.ckpt")

    # The checkpoint is plain data: it loads without arbitrary unpickling.
    saved = torch.load(checkpoint, weights_only=True)
    restored_net = make_mlp(seed=99).float()  # different weights: Lightning restores them
    restored = _methods(restored_net, seed=555)
    restored_net.load_state_dict({k.removeprefix("net."): v for k, v in saved["state_dict"].items()})
    for method in restored:
        method.load_state_dict(saved["callbacks"][method.state_key])
    assert restored[0].active_task == 1 and restored[0].finished_tasks == [0]
    _assert_same(_next_moves(restored), probe.seen)

    # Resume with fresh objects through Lightning's own ckpt_path.
    resumed_net = make_mlp(seed=98).float()
    resumed = _methods(resumed_net, seed=777)
    quiet_trainer(callbacks=resumed, max_epochs=2).fit(lit_classifier(resumed_net), _task(2), ckpt_path=checkpoint)

    for (name, a), b in zip(net.named_parameters(), resumed_net.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    for original, again in zip(methods, resumed):
        assert original.finished_tasks == again.finished_tasks == [0, 1]
    _assert_same(_next_moves(resumed), _next_moves(methods))


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, tuple):
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a, b)


# ------------------------------------------------------------------------- hyper-parameters
def _checkpoint_of(tmp_path, make_methods) -> tuple:
    """A checkpoint written after task 0 (one epoch) with ``make_methods(net)``, and those methods."""
    net = make_mlp(seed=7).float()
    methods = make_methods(net)
    trainer = quiet_trainer(callbacks=methods)
    trainer.fit(lit_classifier(net), _task(1))
    path = tmp_path / "task0.ckpt"
    trainer.save_checkpoint(path)
    return path, methods


def _resume(path, methods, net) -> None:
    quiet_trainer(callbacks=methods, max_epochs=2).fit(lit_classifier(net), _task(1), ckpt_path=path)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_a_method_with_other_hyperparameters_refuses_the_checkpoint_before_any_state_loads(tmp_path):
    path, _ = _checkpoint_of(tmp_path, lambda net: [L2Regularization(net, importance=0.1), EWC(net, importance=20.0, seed=0)])
    net = make_mlp(seed=8).float()
    l2, ewc = L2Regularization(net, importance=0.1), EWC(net, importance=5.0, seed=0)
    saved = "EWC{'importance': 20.0, 'fisher_sample_size': 1000, 'online': False, 'gamma': 1.0, 'fisher': 'empirical'}"
    wanted = "EWC{'importance': 5.0, 'fisher_sample_size': 1000, 'online': False, 'gamma': 1.0, 'fisher': 'empirical'}"
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {saved}, not for {wanted}: build")):
        _resume(path, [l2, ewc], net)
    # Lightning calls every on_load_checkpoint before any load_state_dict: nothing was loaded.
    for method in (l2, ewc):
        assert method.finished_tasks == [] and method.active_task is None


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize(
    "saved, wanted, key",
    [
        (lambda net: MAS(net, importance=2.0, sample_size=16, seed=0), lambda net: MAS(net, importance=1.0, sample_size=16, seed=0),
         "MAS{'importance': 2.0, 'sample_size': 16}"),
        (lambda net: RWalk(net, interval=3), lambda net: RWalk(net, interval=5),
         "RWalk{'importance': 1.0, 'alpha': 0.9, 'epsilon': 0.001, 'interval': 3}"),
    ],
    ids=["MAS", "RWalk"],
)
def test_mas_and_rwalk_with_other_hyperparameters_refuse_the_checkpoint(tmp_path, saved, wanted, key):
    path, _ = _checkpoint_of(tmp_path, lambda net: [saved(net)])
    net = make_mlp(seed=8).float()
    method = wanted(net)
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {key}, not for {method.state_key}: build")):
        _resume(path, [method], net)
    assert method.finished_tasks == [] and method.active_task is None


def test_two_methods_of_one_class_each_resume_their_own_state(tmp_path):
    # Fishers from 8 and from all 32 samples differ: a swapped state would show.
    path, saved = _checkpoint_of(tmp_path, lambda net: [EWC(net, importance=20.0, fisher_sample_size=8, seed=0), EWC(net, importance=5.0, seed=1)])
    net = make_mlp(seed=8).float()
    resumed = [EWC(net, importance=5.0, seed=2), EWC(net, importance=20.0, fisher_sample_size=8, seed=3)]  # other order, other seeds
    loaded: dict = {}

    class Grab(L.Callback):  # the methods' state right after Lightning restored it
        def on_train_start(self, trainer, pl_module):
            loaded.update({method.importance: copy.deepcopy(method.state_dict()["tasks"]) for method in resumed})

    quiet_trainer(callbacks=[*resumed, Grab()], max_epochs=2).fit(lit_classifier(net), _task(1), ckpt_path=path)
    fishers = [method.state_dict()["tasks"][0]["fisher"]["0.weight"] for method in saved]
    assert not torch.allclose(*fishers)
    for method in saved:
        (task,) = loaded[method.importance].values()
        _assert_same(task["fisher"], method.state_dict()["tasks"][0]["fisher"])
    assert [method.finished_tasks for method in resumed] == [[0, 1], [0, 1]]


def test_a_method_the_checkpoint_has_no_state_of_the_class_of_starts_empty(tmp_path):
    path, _ = _checkpoint_of(tmp_path, lambda net: [EWC(net, importance=20.0, seed=0)])
    net = make_mlp(seed=8).float()
    ewc, added = EWC(net, importance=20.0, seed=0), L2Regularization(net, importance=0.1)
    _resume(path, [ewc, added], net)
    assert ewc.finished_tasks == [0, 1] and added.finished_tasks == [0]  # it knows nothing of task 0
