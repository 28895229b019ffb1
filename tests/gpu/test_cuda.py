"""The methods on a CUDA device: the same values as on the CPU, and penalties that reach the
gradient correctly under ``16-mixed`` (a grad scaler) and ``bf16-mixed`` precision.

Marked ``gpu`` and skipped without CUDA; run them on a GPU machine with
``python -m pytest -q -m gpu tests/gpu``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    MAS,
    BiC,
    DarkExperienceReplay,
    ExperienceReplay,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.memory import ReservoirMemory
from neurenix.data import TaskSequenceDataModule, fit_sequence
from neurenix.metrics import ForgettingCurves
from tests.continual.test_callback import _reference_module
from tests.helpers import lit_classifier, make_task, quiet_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda", 0)


def _net(seed: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _task(seed: int, samples: int = 48) -> TensorDataset:
    x, y = make_task(samples=samples, seed=seed).tensors
    return TensorDataset(x.float(), y)


def _gpu_trainer(**kwargs):
    # cuBLAS has no deterministic mode without CUBLAS_WORKSPACE_CONFIG; the tolerances cover it.
    return quiet_trainer(accelerator="gpu", devices=1, deterministic=False, **kwargs)


def _cpu_trainer(**kwargs):
    return quiet_trainer(accelerator="cpu", deterministic=False, **kwargs)  # "auto" would pick the GPU


def _fit(module, callbacks, dataset, *, on_gpu: bool = True, **kwargs):
    trainer = _gpu_trainer(callbacks=callbacks, **kwargs) if on_gpu else _cpu_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, DataLoader(dataset, batch_size=8, shuffle=False))
    return trainer


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {"precision": "32-true"},
        {"precision": "16-mixed"},
        {"precision": "bf16-mixed"},
        {"precision": "16-mixed", "accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
    ],
    ids=["32", "16-mixed", "bf16-mixed", "16-mixed-accumulate-clip"],
)
@pytest.mark.parametrize("method_class", [EWC, L2Regularization, SynapticIntelligence])
def test_closed_form_penalty_equals_the_penalty_in_the_loss(method_class, trainer_kwargs):
    """Under a grad scaler the loss that autograd sees is scaled, our closed form is added after
    unscaling: both must give the same parameters."""
    net = _net()
    method = method_class(net, importance=5.0)
    trainer = _fit(lit_classifier(net, lr=0.1), [method], _task(1))
    assert method.finished_tasks == [0] and method.has_penalty
    assert trainer.strategy.root_device.type == "cuda"  # (Lightning moves the model back to the CPU after a fit)

    reference_net = copy.deepcopy(net)
    frozen = copy.deepcopy(method)
    frozen.model = reference_net
    frozen._bind_parameters()

    _fit(_reference_module(reference_net, lambda _net: frozen.penalty()), [], _task(2), max_epochs=2, **trainer_kwargs)
    _fit(lit_classifier(net, lr=0.1), [method], _task(2), max_epochs=2, **trainer_kwargs)

    tolerance = 1e-5 if trainer_kwargs["precision"] == "32-true" else 2e-3
    for (name, ours), theirs in zip(net.named_parameters(), reference_net.parameters()):
        assert torch.allclose(ours.cpu(), theirs.cpu(), atol=tolerance, rtol=0), name
    assert not torch.allclose(net[0].weight.cpu(), frozen._anchor["0.weight"].cpu())


def _deterministic_methods(net: nn.Module) -> list:
    """Every method whose result does not depend on a device's random generator (not replay)."""
    return [
        EWC(net, importance=50.0, fisher_sample_size=20, seed=11),
        L2Regularization(net, importance=2.0),
        SynapticIntelligence(net, importance=1.0, xi=0.1),
        KnowledgeDistillation(net, temperature=2.0, alpha=0.5),
        MAS(net, importance=1.0, sample_size=20, seed=12),
        RWalk(net, importance=1.0, interval=2),
    ]


def test_every_method_but_replay_on_one_trainer_gives_the_cpu_result():
    cpu_net, gpu_net = _net(seed=5), _net(seed=5)
    cpu_methods, gpu_methods = _deterministic_methods(cpu_net), _deterministic_methods(gpu_net)
    for seed in (1, 2, 3):
        _fit(lit_classifier(cpu_net, lr=0.1), cpu_methods, _task(seed), on_gpu=False)
        trainer = _fit(lit_classifier(gpu_net, lr=0.1), gpu_methods, _task(seed))
        assert trainer.strategy.root_device.type == "cuda"
    assert cpu_methods[0].state_dict()["tasks"][0]["fisher"]["0.weight"].device.type == "cpu"

    for (name, theirs), ours in zip(cpu_net.named_parameters(), gpu_net.parameters()):
        assert torch.allclose(ours.cpu(), theirs, atol=1e-5, rtol=0), name
    for cpu_method, gpu_method in zip(cpu_methods, gpu_methods):
        assert gpu_method.finished_tasks == cpu_method.finished_tasks == [0, 1, 2]
        _assert_states_close(gpu_method.state_dict(), cpu_method.state_dict(), type(cpu_method).__name__)


def test_replay_on_cuda_keeps_memory_and_generator_on_the_device_and_repeats_from_its_seed():
    """Replay's generator lives with its samples (no host-device copy per step): a CUDA stream of
    decisions, so the same seed repeats the same run on the GPU (not the CPU's run)."""
    runs = []
    for _ in range(2):
        net = _net(seed=5)
        replay = ExperienceReplay(net, memory_size=12, replay_ratio=0.5, seed=12)
        for seed in (1, 2):
            _fit(lit_classifier(net, lr=0.1), [replay, L2Regularization(net, importance=2.0)], _task(seed))
        runs.append((net, replay.memory))
    (net_a, memory_a), (net_b, memory_b) = runs
    assert memory_a.device.type == "cuda" and memory_a._generator.device.type == "cuda"
    state_a, state_b = memory_a.state_dict(), memory_b.state_dict()
    assert state_a["inputs"].device.type == "cuda" and state_a["num_seen"] == 96 and len(memory_a) == 12
    assert torch.equal(state_a["inputs"], state_b["inputs"]) and torch.equal(state_a["task_ids"], state_b["task_ids"])
    assert set(state_a["task_ids"].tolist()) == {0, 1}
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)  # the same replayed batches


def test_si_under_16_mixed_adds_nothing_for_a_step_the_scaler_skipped():
    """The grad scaler skips a step whose gradient overflowed: SI's importance must equal that of
    the same run without the batch (recording the inf gave NaN for the rest of the task)."""
    x, y = _task(1).tensors
    kept = torch.cat([torch.arange(0, 16), torch.arange(24, 48)])  # batch 2 (of 8) left out
    results = []
    for overflow_at, dataset in ((2, TensorDataset(x, y)), (None, TensorDataset(x[kept], y[kept]))):
        net = _net(seed=7)
        module = lit_classifier(net, lr=0.1)
        step = type(module).training_step
        module.training_step = lambda batch, index, step=step, module=module, at=overflow_at: (
            step(module, batch, index) * (math.inf if index == at else 1.0)
        )
        si = SynapticIntelligence(net, importance=1.0, xi=0.1)
        trainer = _fit(module, [si], dataset, precision="16-mixed")
        results.append((si.big_omega, trainer.precision_plugin.scaler.get_scale()))
    (skipped, scale_skipped), (reference, scale_reference) = results
    assert scale_skipped == scale_reference / 2  # one skipped step halves the scale
    for name, omega in skipped.items():
        assert torch.isfinite(omega).all(), name
        assert torch.allclose(omega.cpu(), reference[name].cpu(), rtol=2e-3, atol=1e-6), name


def _assert_states_close(ours, theirs, where: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        if theirs.is_floating_point():
            assert torch.allclose(ours.cpu(), theirs, atol=1e-5, rtol=1e-4), where
        else:
            assert torch.equal(ours.cpu(), theirs), where
    elif isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in theirs:
            _assert_states_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            _assert_states_close(a, b, f"{where}[{index}]")


@pytest.mark.parametrize("hidden_layer", [nn.Tanh, nn.Identity], ids=["vmap", "closed-form-linear"])
def test_fisher_on_cuda_equals_the_fisher_on_the_cpu(hidden_layer):
    torch.manual_seed(0)
    cpu_net = nn.Sequential(nn.Linear(6, 16), hidden_layer(), nn.Linear(16, 3))
    gpu_net = copy.deepcopy(cpu_net).to(CUDA)
    data = DataLoader(_task(4, samples=64), batch_size=16)
    cpu_ewc, gpu_ewc = EWC(cpu_net, fisher_sample_size=50), EWC(gpu_net, fisher_sample_size=50)
    for ewc in (cpu_ewc, gpu_ewc):
        ewc.enter_task(0)
        ewc.finish_task(data)  # CPU batches: moved to the model's device
    for name, expected in cpu_ewc.state_dict()["tasks"][0]["fisher"].items():
        got = gpu_ewc.state_dict()["tasks"][0]["fisher"][name]
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), expected, rtol=1e-4, atol=1e-7), name


def test_a_bf16_true_model_on_cuda_keeps_si_sums_in_float32_and_penalties_in_closed_form():
    """``bf16-true``: the parameters are bfloat16. SI's path integral and EWC's Fisher sums are
    float32; the closed-form penalty gradients (multi-tensor kernels over mixed dtypes) equal
    autograd's."""
    net = _net(seed=9)
    si, ewc = SynapticIntelligence(net, importance=1.0), EWC(net, importance=50.0, fisher_sample_size=40, seed=1)
    for seed in (1, 2):
        trainer = _fit(lit_classifier(net, lr=0.1), [si, ewc], _task(seed), precision="bf16-true")
        assert trainer.strategy.root_device.type == "cuda"
    assert net[0].weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in si.big_omega.values())
    fisher = ewc.state_dict()["tasks"][1]["fisher"]
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in fisher.values())
    net.to(CUDA)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05)
    for method in (si, ewc):
        method.prepare_for_device()
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        method.add_penalty_gradients()
        closed = [p.grad.float() for p in net.parameters()]
        for p in net.parameters():
            p.grad = None
        method.penalty().backward()
        for ours, theirs in zip(closed, (p.grad.float() for p in net.parameters())):
            assert torch.allclose(ours, theirs, rtol=2e-2, atol=1e-3 * theirs.abs().max().item())


def test_state_saved_on_cuda_loads_on_the_cpu_with_weights_only():
    gpu_net = _net().to(CUDA)
    ewc = EWC(gpu_net, fisher_sample_size=30)
    ewc.register_task(0, DataLoader(_task(1), batch_size=8))
    with torch.no_grad():
        gpu_net[0].weight.add_(0.1)
    buffer = io.BytesIO()
    torch.save(ewc.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True, map_location="cpu")

    cpu_net = copy.deepcopy(gpu_net).cpu()
    restored = EWC(cpu_net, fisher_sample_size=30)
    restored.load_state_dict(state)
    assert torch.allclose(restored.get_ewc_loss(), ewc.get_ewc_loss().cpu(), rtol=1e-5)

    # and back: a CPU state into a method whose model is on the GPU
    back = EWC(copy.deepcopy(gpu_net), fisher_sample_size=30)
    back.load_state_dict(restored.state_dict())
    assert back.get_ewc_loss().device.type == "cuda"
    assert torch.allclose(back.get_ewc_loss().cpu(), restored.get_ewc_loss(), rtol=1e-5)


def test_a_cpu_device_with_a_model_on_cuda_is_an_error_that_says_so():
    with pytest.raises(ValueError, match=r"device='cpu' was given but the model's parameter '0.weight' is on 'cuda:0'"):
        EWC(_net().to(CUDA), device="cpu")


def test_standalone_train_step_on_cuda_equals_the_cpu():
    cpu_net, gpu_net = _net(seed=7), _net(seed=7).to(CUDA)
    results = []
    for net in (cpu_net, gpu_net):
        si = SynapticIntelligence(net, importance=1.0)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for task_id, seed in enumerate((1, 2)):
            for x, y in DataLoader(_task(seed), batch_size=8):  # CPU batches, moved by train_step
                si.train_step(optimizer, nn.functional.cross_entropy, x, y, task_id=task_id)
        results.append((net, si))
    (cpu_net, cpu_si), (gpu_net, gpu_si) = results
    for ours, theirs in zip(gpu_net.parameters(), cpu_net.parameters()):
        assert torch.allclose(ours.cpu(), theirs, atol=1e-5, rtol=0)
    for name, expected in cpu_si.big_omega.items():
        assert torch.allclose(gpu_si.big_omega[name].cpu(), expected, atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_forgetting_curves_on_cuda_count_what_an_independent_evaluation_counts(precision):
    net = _net(seed=9)
    test_sets = [_task(seed + 10, samples=64) for seed in (1, 2, 3)]
    datamodule = TaskSequenceDataModule([_task(seed, samples=64) for seed in (1, 2, 3)], test_sets, batch_size=16, seed=0)
    curves = ForgettingCurves()
    trainer = _gpu_trainer(callbacks=[EWC(net, importance=10.0, fisher_sample_size=32), curves], precision=precision)
    fit_sequence(trainer, lit_classifier(net, lr=0.1), datamodule, epochs_per_task=2)
    assert trainer.strategy.root_device.type == "cuda"

    matrix = curves.matrix.compute().cpu()
    assert matrix.shape == (3, 3) and torch.isfinite(matrix).all()
    # The last row, measured on the GPU (under the fit's autocast, as Lightning's test loop),
    # against the trained model evaluated on the CPU in float64: at most a near-tie flips.
    model = copy.deepcopy(net).cpu().double().eval()
    with torch.no_grad():
        expected = torch.stack(
            [(model(x.double()).argmax(dim=1) == y).double().mean() for x, y in (t.tensors for t in test_sets)]
        )
    assert torch.allclose(matrix[2], expected, atol=1.5 / 64, rtol=0), (matrix[2], expected)


@pytest.mark.parametrize(
    "method_class, options",
    [(DarkExperienceReplay, {"alpha": 0.5, "beta": 0.5}), (ERACE, {}), (AGEM, {})],
    ids=["der++", "er_ace", "agem"],
)
def test_a_training_step_on_cuda_never_synchronizes_with_the_host(method_class, options):
    """CUDA's own detector raises at any synchronizing call (item, nonzero, a copy to the host, ...)."""
    model = _net().to(CUDA)
    method = method_class(model, memory_size=20, seed=0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for task in range(3):
        for step in range(4):
            x = torch.randn(8, 6, device=CUDA, generator=generator)
            y = torch.randint(0, 3, (8,), device=CUDA, generator=generator)
            if step == 0:  # a task's first step ends the task before, which may read the device
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
                continue
            torch.cuda.set_sync_debug_mode("error")
            try:
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert len(method.memory) == 20


def test_storing_in_the_reservoir_on_cuda_never_synchronizes_with_the_host():
    memory = ReservoirMemory(50, CUDA, seed=0)
    x, y = torch.randn(32, 6, device=CUDA), torch.randint(0, 3, (32,), device=CUDA)
    memory.add(x, y, 0)  # allocates the storage
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            memory.add(x, y, torch.zeros(32, dtype=torch.long, device=CUDA))
            memory.sample(16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(memory) == 50 and memory.num_seen == 352


@pytest.mark.parametrize("method_class", [ICaRL, BiC])
def test_an_exemplar_method_under_16_mixed_on_cuda_keeps_exemplars_teacher_and_predictor_on_the_device(method_class):
    net = _net(seed=5)
    method = method_class(net, memory_size=12, replay_ratio=0.5, seed=12)
    for seed in (1, 2):
        _fit(lit_classifier(net, lr=0.1), [method], _task(seed), precision="16-mixed")
    state = method.memory.state_dict()
    assert state["inputs"].device.type == "cuda" and len(method.memory) == 12
    assert next(method.teacher.parameters()).device.type == "cuda"
    scores = method.classifier(_task(3).tensors[0].to(CUDA))
    assert scores.device.type == "cuda" and bool(torch.isfinite(scores[:, :3]).all())
