"""EWC: Fisher, penalty and its gradient, online mode, modes, errors and state, against references."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from neurenix.continual import EWC
from neurenix.continual import functional as CF
from tests.helpers import loader, make_mlp, make_task

CLOSE = dict(rtol=1e-12, atol=1e-14)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_sample_fisher(model, x, y):
    """Mean over samples of (∂ CE(model(x_n), y_n)/∂θ)², one autograd.grad per sample, in eval mode."""
    params = trainable(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            total[n] += g.square()
    for m, mode in modes:
        m.training = mode
    return {n: s / x.shape[0] for n, s in total.items()}


def snap(model):
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def assert_dicts_close(got, want, **tol):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **(tol or CLOSE))


def train(ewc, data, task_id, steps=3, lr=0.1):
    optimizer = torch.optim.SGD(ewc.model.parameters(), lr=lr)
    batches = list(loader(data))
    for i in range(steps):
        x, y = batches[i % len(batches)]
        ewc.train_step(optimizer, F.cross_entropy, x, y, task_id)


def hand_penalty(model, terms, importance):
    """importance/2 · Σ_t Σ F_t·(θ − θ*_t)² over (fisher, anchor) pairs."""
    params = trainable(model).items()
    return sum(importance / 2 * (f[n] * (p - a[n]).square()).sum() for f, a in terms for n, p in params)


def two_task_ewc(importance=10.0, **kwargs):
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, importance=importance, fisher_sample_size=1000, seed=0, **kwargs)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1)
    ewc.register_task(2, loader(task2))  # consolidates task 1
    train(ewc, task2, 2)
    return ewc, model, task1, task2


# ------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("ended_by", ["register_task", "train_step"])
def test_empirical_fisher_equals_per_sample_reference_at_end_of_task_params(ended_by):
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, importance=1.0, fisher_sample_size=1000, seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1)
    end_of_task, reference = snap(model), per_sample_fisher(model, *task1.tensors)
    if ended_by == "register_task":
        ewc.register_task(2, loader(task2))
    else:  # a new task_id in train_step consolidates task 1 before its step
        train(ewc, task2, 2, steps=1)
    assert ewc._tasks[1]["samples"] == 40
    assert_dicts_close(ewc._tasks[1]["anchor"], end_of_task, rtol=0, atol=0)
    assert_dicts_close(ewc._tasks[1]["fisher"], reference)


def test_a_bfloat16_model_sums_its_fisher_in_float32():
    # 512 one-sample batches: summed in bfloat16 (8 bits of mantissa) the Fisher came out 7 to 18%
    # off; summed in float32 it is the float32 model's to bfloat16's own precision.
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 20, generator=generator), torch.randint(0, 4, (512,), generator=generator)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).bfloat16()
    twin = copy.deepcopy(model).float()
    fishers = []
    for net, inputs in ((model, x.bfloat16()), (twin, x)):
        ewc = EWC(net, fisher_sample_size=512, seed=0)
        ewc.register_task(1, loader(TensorDataset(inputs, y), batch_size=1))
        ewc.register_task(2)
        fishers.append(ewc._tasks[1]["fisher"])
    for name, ours in fishers[0].items():
        assert ours.dtype == torch.bfloat16  # stored in the parameters' dtype
        theirs = fishers[1][name]
        assert ((ours.float() - theirs).norm() / theirs.norm()).item() < 0.01, name


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_under_a_true_precision_the_fisher_reads_inputs_converted_as_the_fit_s_batches(precision, dtype):
    # Lightning casts the module and every batch; the Fisher, which reads the task's loader
    # itself, must cast the same way (float32 inputs reached the converted model: a dtype error).
    from neurenix.continual.base import inputs_as_given
    from tests.helpers import lit_classifier, quiet_trainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = make_task(seed=1).tensors
    data = TensorDataset(x.float(), y)
    ewc = EWC(net, fisher_sample_size=1000, seed=0)
    quiet_trainer(callbacks=[ewc], precision=precision).fit(lit_classifier(net), loader(data))
    assert net[0].weight.dtype == dtype and ewc.finished_tasks == [0]

    reference = EWC(copy.deepcopy(net), fisher_sample_size=1000, seed=0)
    reference.enter_task(0)
    reference.finish_task(loader(TensorDataset(x.float().to(dtype), y)))
    assert_dicts_close(ewc._tasks[0]["fisher"], reference._tasks[0]["fisher"], rtol=0, atol=0)
    assert ewc._convert_inputs is inputs_as_given  # the fit's conversion only while it consolidates


@pytest.mark.parametrize("form", ["loader", "batches"])
def test_fisher_sample_size_smaller_than_dataset_uses_exactly_that_many_samples(form):
    model, (x, y) = make_mlp(), make_task(seed=1).tensors
    ewc = EWC(model, fisher_sample_size=13, seed=4)
    if form == "loader":  # map-style: a seeded uniform subset
        ewc.register_task(1, loader(TensorDataset(x, y), batch_size=8))
        chosen = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:13]
    else:  # any iterable of batches: the first samples
        ewc.register_task(1, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)])
        chosen = torch.arange(13)
    ewc.register_task(2)
    assert ewc._tasks[1]["samples"] == 13
    assert_dicts_close(ewc._tasks[1]["fisher"], per_sample_fisher(model, x[chosen], y[chosen]))


def test_true_fisher_reproduces_the_seeded_label_draws():
    model, task1 = make_mlp(), make_task(seed=1)
    ewc = EWC(model, fisher_sample_size=1000, fisher="true", seed=7)
    ewc.register_task(1, loader(task1, batch_size=8))
    train(ewc, task1, 1)
    ewc.register_task(2)
    gen = torch.Generator().manual_seed(7)
    order = torch.randperm(40, generator=gen)
    x, y = task1.tensors
    model.eval()
    labels = []
    for i in range(0, 40, 8):
        with torch.no_grad():
            logits = model(x[order[i : i + 8]])
        labels.append(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).squeeze(1))
    model.train()
    labels = torch.cat(labels)
    assert not torch.equal(labels, y[order])  # sampled labels, not the dataset's
    assert_dicts_close(ewc._tasks[1]["fisher"], per_sample_fisher(model, x[order], labels))


def test_true_fisher_approaches_its_expectation_over_the_model_distribution():
    model, (x, _) = make_mlp(), make_task(samples=4, seed=3).tensors
    repeats = 2500
    ewc = EWC(model, fisher_sample_size=4 * repeats, fisher="true", seed=1)
    inputs = x.repeat(repeats, 1)
    estimate, samples = ewc._estimate_fisher(snap(model), (inputs, torch.zeros(len(inputs), dtype=torch.long)))
    assert samples == 4 * repeats
    with torch.no_grad():
        probabilities = torch.softmax(model(x), -1)
    exact = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # mean_n Σ_c p(c|x_n) g_{n,c}²
    for i in range(4):
        for c in range(3):
            g2 = per_sample_fisher(model, x[i : i + 1], torch.tensor([c]))
            for n in exact:
                exact[n] += probabilities[i, c] * g2[n] / 4
    for n in exact:
        error = (estimate[n] - exact[n]).norm() / exact[n].norm()
        assert error < 0.04, (n, error.item())  # MC error here is ~0.01


# ------------------------------------------------------------------------- penalty and gradient
def test_get_ewc_loss_and_its_gradient_by_hand():
    ewc, model, _, _ = two_task_ewc(importance=10.0)
    fisher, anchor = ewc._tasks[1]["fisher"], ewc._tasks[1]["anchor"]
    loss = ewc.get_ewc_loss()
    expected = hand_penalty(model, [(fisher, anchor)], 10.0)
    assert expected.item() > 1e-6
    torch.testing.assert_close(loss, expected.detach(), **CLOSE)
    params = trainable(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(g, 10.0 * fisher[n] * (p.detach() - anchor[n]), **CLOSE)


def test_closed_form_gradient_in_add_penalty_gradients_and_train_step_matches_autograd():
    ewc, model, _, task2 = two_task_ewc(importance=10.0)
    x, y = task2.tensors[0][:8], task2.tensors[1][:8]
    params = list(trainable(model).values())
    before = [p.detach().clone() for p in params]
    reference = torch.autograd.grad(F.cross_entropy(model(x), y) + ewc.get_ewc_loss(), params)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ewc.add_penalty_gradients()
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p.grad, ref, **CLOSE)
    ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, y, 2)
    for p, b, g in zip(params, before, reference):  # one SGD step on task loss + penalty
        torch.testing.assert_close(p.detach(), b - 0.1 * g, **CLOSE)


def test_separate_mode_sums_one_penalty_per_task():
    model = make_mlp()
    ewc = EWC(model, importance=5.0, fisher_sample_size=1000, seed=0)
    terms = []
    for task in (1, 2, 3):
        data = make_task(seed=task)
        ewc.register_task(task, loader(data))
        train(ewc, data, task, steps=4, lr=0.3)
        terms.append((per_sample_fisher(model, *data.tensors), snap(model)))
    ewc.register_task(3, loader(make_task(seed=3)))  # after training: consolidates task 3
    train(ewc, make_task(seed=4), 4, steps=3, lr=0.3)
    assert sorted(ewc._tasks) == [1, 2, 3]
    for task, (fisher, anchor) in zip((1, 2, 3), terms):
        assert_dicts_close(ewc._tasks[task]["fisher"], fisher)
        assert_dicts_close(ewc._tasks[task]["anchor"], anchor, rtol=0, atol=0)
    loss = ewc.get_ewc_loss()
    torch.testing.assert_close(loss, hand_penalty(model, terms, 5.0).detach(), rtol=1e-11, atol=1e-13)
    params = trainable(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        want = sum(5.0 * f[n] * (p.detach() - a[n]) for f, a in terms)
        torch.testing.assert_close(g, want, rtol=1e-11, atol=1e-13)


def test_online_mode_keeps_decayed_fisher_sum_and_last_anchor():
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, importance=3.0, fisher_sample_size=1000, online=True, gamma=0.5, seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1, steps=4, lr=0.3)
    fisher1 = per_sample_fisher(model, *task1.tensors)
    ewc.register_task(2, loader(task2))
    train(ewc, task2, 2, steps=4, lr=0.3)
    fisher2, anchor2 = per_sample_fisher(model, *task2.tensors), snap(model)
    ewc.register_task(2, loader(task2))  # after training: consolidates task 2
    assert list(ewc._tasks) == [2]
    running = {n: 0.5 * fisher1[n] + fisher2[n] for n in fisher1}
    assert_dicts_close(ewc._tasks[2]["fisher"], running)
    assert_dicts_close(ewc._tasks[2]["anchor"], anchor2, rtol=0, atol=0)
    train(ewc, make_task(seed=3), 3, steps=2, lr=0.3)
    torch.testing.assert_close(ewc.get_ewc_loss(), hand_penalty(model, [(running, anchor2)], 3.0).detach(), **CLOSE)


# ------------------------------------------------------------------------- modes, frozen params, late data
def test_batchnorm_fisher_is_taken_in_eval_mode_and_modes_are_restored():
    model, task1 = make_mlp(batch_norm=True), make_task(seed=1)
    model.train()
    model[2].eval()  # the user's own choice for one submodule
    ewc = EWC(model, fisher_sample_size=1000, seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1)
    running_mean = model[1].running_mean.clone()
    reference = per_sample_fisher(model, *task1.tensors)
    ewc.register_task(2)
    assert_dicts_close(ewc._tasks[1]["fisher"], reference)
    assert model.training and model[0].training and model[1].training and model[3].training
    assert not model[2].training
    assert torch.equal(model[1].running_mean, running_mean)


def test_frozen_parameters_are_not_regularized():
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    model[0].requires_grad_(False)
    ewc = EWC(model, importance=10.0, fisher_sample_size=1000, seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1)
    reference = per_sample_fisher(model, *task1.tensors)
    ewc.register_task(2, loader(task2))
    train(ewc, task2, 2)
    assert set(ewc._tasks[1]["fisher"]) == set(ewc._tasks[1]["anchor"]) == {"2.weight", "2.bias"}
    assert_dicts_close(ewc._tasks[1]["fisher"], reference)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    model.zero_grad()
    F.cross_entropy(model(task2.tensors[0]), task2.tensors[1]).backward()
    ewc.add_penalty_gradients()
    assert model[0].weight.grad is None and model[0].bias.grad is None


@pytest.mark.parametrize("batch_norm", [False, True], ids=["mlp", "batchnorm"])
def test_update_fisher_for_a_task_consolidated_without_data_uses_its_end_of_task_model(batch_norm):
    model, task1, task2 = make_mlp(batch_norm=batch_norm), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, importance=1.0, fisher_sample_size=1000, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):  # a loop outside EWC trains task 1
        optimizer.zero_grad()
        F.cross_entropy(model(task1.tensors[0]), task1.tensors[1]).backward()
        optimizer.step()
    end_of_task = copy.deepcopy(model)  # parameters and BatchNorm running statistics
    with pytest.warns(UserWarning, match=r"update_fisher\(1, dataloader\)"):
        ewc.register_task(1)
    assert ewc._tasks[1]["samples"] == 0 and ewc.get_ewc_loss().item() == 0.0
    train(ewc, task2, 2, steps=3, lr=0.3)
    ewc.update_fisher(1, loader(task1))
    assert ewc._tasks[1]["samples"] == 40
    reference = per_sample_fisher(end_of_task, *task1.tensors)
    assert_dicts_close(ewc._tasks[1]["fisher"], reference)
    moved = per_sample_fisher(model, *task1.tensors)
    assert not torch.allclose(moved["0.weight"], reference["0.weight"], rtol=1e-3)


def test_online_update_fisher_adds_a_late_fisher_to_the_decayed_sum():
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, fisher_sample_size=1000, online=True, gamma=0.5, seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1, steps=4, lr=0.3)
    fisher1 = per_sample_fisher(model, *task1.tensors)
    ewc.register_task(2)  # consolidates task 1; task 2 gets no data
    train(ewc, task2, 2, steps=4, lr=0.3)
    fisher2 = per_sample_fisher(model, *task2.tensors)
    with pytest.warns(UserWarning, match="without data"):
        ewc.register_task(2)
    train(ewc, make_task(seed=3), 3, steps=2, lr=0.3)
    ewc.update_fisher(2, loader(task2))
    assert_dicts_close(ewc._tasks[2]["fisher"], {n: 0.5 * fisher1[n] + fisher2[n] for n in fisher1})
    with pytest.raises(ValueError, match=r"folded task 1's Fisher"):
        ewc.update_fisher(1, loader(task1))
    with pytest.raises(ValueError, match=r"already holds task 2's Fisher"):
        ewc.update_fisher(2, loader(task2))


def test_penalty_gradient_reaches_params_the_loss_missed_but_not_params_frozen_later():
    ewc, model, _, _ = two_task_ewc(importance=10.0)
    model[2].bias.requires_grad_(False)  # frozen after task 1 was consolidated
    model.zero_grad()
    loss = model[2].weight.square().sum()  # reaches 2.weight only
    loss.backward()
    ewc.add_penalty_gradients()
    assert model[2].bias.grad is None
    live = [model[0].weight, model[0].bias, model[2].weight]
    reference = torch.autograd.grad(model[2].weight.square().sum() + ewc.get_ewc_loss(), live)
    for p, ref in zip(live, reference):
        torch.testing.assert_close(p.grad, ref, **CLOSE)


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"model": "not a model"}, TypeError, r"model must be a torch.nn.Module, got str"),
     ({"importance": -1.0}, ValueError, r"importance must be >= 0.*-1\.0"),
     ({"fisher_sample_size": 0}, ValueError, r"fisher_sample_size must be >= 1.*got 0"),
     ({"fisher_sample_size": 2.5}, TypeError, r"fisher_sample_size must be an int.*2\.5"),
     ({"gamma": 1.5}, ValueError, r"gamma must be <= 1.*1\.5"),
     ({"gamma": -0.1}, ValueError, r"gamma must be >= 0.*-0\.1"),
     ({"fisher": "bad"}, ValueError, r"fisher must be one of 'empirical', 'true', 'predicted'.*'bad'")],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        EWC(**{"model": make_mlp(), **kwargs})


def test_update_fisher_errors():
    ewc = EWC(make_mlp(), seed=0)
    ewc.register_task(1)
    with pytest.raises(ValueError, match=r"task_id=7 was never registered"):
        ewc.update_fisher(7, loader(make_task()))
    with pytest.raises(ValueError, match=r"dataloader=None"):
        ewc.update_fisher(1, None)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_nan_data_is_refused_before_the_task_is_consolidated(fisher):
    x, y = make_task(seed=1).tensors
    x[3, 2], x[7, 0] = float("nan"), float("inf")
    ewc = EWC(make_mlp(), seed=0, fisher=fisher)
    ewc.register_task(1, loader(TensorDataset(x, y)))
    ewc.model[0].bias.data.add_(0.1)  # task 1 trained
    message = "dataloader must yield finite inputs, got NaN or infinity in 2 of the 40 samples drawn for task 1's Fisher"
    with pytest.raises(ValueError, match=re.escape(message)):
        ewc.register_task(2)
    assert ewc.active_task == 1 and ewc.finished_tasks == [] and ewc.get_ewc_loss().item() == 0.0
    ewc.update_fisher(1, loader(make_task(seed=2)))  # clean data for the task: it consolidates now
    ewc.register_task(2)
    assert ewc.finished_tasks == [1] and torch.isfinite(ewc.state_dict()["tasks"][1]["fisher"]["0.weight"]).all()


def test_nan_parameters_on_clean_data_raise_floating_point_error_naming_parameters():
    ewc = EWC(make_mlp(), seed=0)
    ewc.register_task(1, loader(make_task(seed=1)))
    ewc.model[0].weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"parameters \[.*'0\.weight'"):
        ewc.register_task(2)


# ------------------------------------------------------------------------- state
def test_state_dict_round_trip_through_weights_only_load():
    ewc, model, _, _ = two_task_ewc(importance=10.0, fisher="true")
    buffer = io.BytesIO()
    torch.save(ewc.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = EWC(model, importance=10.0, fisher_sample_size=1000, seed=999, fisher="true")
    restored.load_state_dict(state)
    assert torch.equal(restored.get_ewc_loss(), ewc.get_ewc_loss())
    assert torch.equal(restored._generator.get_state(), ewc._generator.get_state())
    assert torch.equal(torch.rand(5, generator=restored._generator), torch.rand(5, generator=ewc._generator))
    assert restored.finished_tasks == [1] and restored.active_task == 2
    for key in ("fisher", "anchor"):
        assert_dicts_close(restored._tasks[1][key], ewc._tasks[1][key], rtol=0, atol=0)


class _TwoHeads(torch.nn.Module):
    """A multi-head model: forward(inputs, task_ids), with BatchNorm so the Fisher takes the vmap path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh()).double()
        self.heads = torch.nn.Linear(5, 6).double()

    def forward(self, x, task_ids):
        return self.heads(self.body(x)).view(-1, 2, 3)[torch.arange(x.shape[0]), task_ids]


def test_fisher_of_a_multi_head_model_gets_the_task_ids_of_each_sample():
    model = _TwoHeads().eval()
    x, y = make_task(samples=12).tensors
    task_ids = torch.arange(12) % 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, task_ids), batch_size=5)
    ewc = EWC(model, fisher_sample_size=100)
    ewc.register_task(0, loader)
    ewc.enter_task(1)  # consolidates task 0 at the current parameters

    params = [p for p in model.parameters()]
    reference = [torch.zeros_like(p) for p in params]
    for i in range(12):
        loss = F.cross_entropy(model(x[i : i + 1], task_ids[i : i + 1]), y[i : i + 1])
        for total, g in zip(reference, torch.autograd.grad(loss, params)):
            total += g.square() / 12
    for (name, _), expected in zip(model.named_parameters(), reference):
        torch.testing.assert_close(ewc._tasks[0]["fisher"][name], expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------- likelihoods other than softmax
def regression_task(samples: int = 40, seed: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    return TensorDataset(x, x @ torch.tensor([[1.5], [-0.5]], dtype=torch.float64) + 0.3)


def one_output_model(nonlinear: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(2, 1)] + ([torch.nn.Tanh()] if nonlinear else [])
    return torch.nn.Sequential(*layers).double()


def hand_fisher(model, x, residual):
    """A one-layer model's per-sample gradients are residual_n · (x_n, 1): F = mean(r² x²), mean(r²)."""
    r2 = residual.detach().square().reshape(-1, 1)
    return {"0.weight": (r2 * x.square()).mean(0, keepdim=True), "0.bias": r2.mean(0)}


@pytest.mark.parametrize("how", ["named", "MSELoss in train_step", "mse_loss in train_step"])
def test_regression_fisher_is_the_gaussian_one_by_hand(how):
    model = one_output_model()
    x, y = regression_task().tensors
    ewc = EWC(model, fisher_sample_size=40, seed=0, **({"likelihood": "gaussian"} if how == "named" else {}))
    ewc.register_task(0, loader(TensorDataset(x, y)))
    loss = {"named": F.mse_loss, "MSELoss in train_step": torch.nn.MSELoss(), "mse_loss in train_step": F.mse_loss}[how]
    ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.01), loss, x[:8], y[:8], task_id=0)
    with torch.no_grad():
        residual = model(x) - y  # ∂/∂f of ½(f − y)²
    ewc.register_task(1)
    assert_dicts_close(ewc._tasks[0]["fisher"], hand_fisher(model, x, residual))


def test_binary_fisher_is_the_bernoulli_one_by_hand_on_the_vmap_path_too():
    x = regression_task().tensors[0]
    y = (x[:, :1] > 0).double()
    for nonlinear in (False, True):  # Linear alone: the closed form; with Tanh after it: vmap
        model = one_output_model(nonlinear)
        ewc = EWC(model, fisher_sample_size=40, seed=0)
        ewc.register_task(0, loader(TensorDataset(x, y)))
        ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), x[:8], y[:8], 0)
        ewc.register_task(1)
        with torch.no_grad():
            f = model(x)
            residual = (torch.sigmoid(f) - y) * ((1 - f.square()) if nonlinear else 1)  # chain rule through tanh
        assert_dicts_close(ewc._tasks[0]["fisher"], hand_fisher(model, x, residual))


def test_true_fisher_of_a_gaussian_has_the_expected_value():
    # Targets drawn as f(x) + ε make E[F] = mean(x²) for the weight and 1 for the bias (seeded: the
    # 5% tolerance is 2.5 standard errors of the 20,000-sample mean).
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    model = one_output_model()
    ewc = EWC(model, fisher_sample_size=20000, fisher="true", likelihood="gaussian", seed=0)
    ewc.register_task(0, (x, torch.zeros(20000, 1, dtype=torch.float64)))
    ewc.register_task(1)  # consolidates the (pretrained) task 0 now
    fisher = ewc._tasks[0]["fisher"]
    torch.testing.assert_close(fisher["0.weight"], x.square().mean(0, keepdim=True), rtol=0.05, atol=0)
    torch.testing.assert_close(fisher["0.bias"], torch.ones(1, dtype=torch.float64), rtol=0.05, atol=0)


def test_a_one_output_model_with_class_labels_is_refused_not_given_a_zero_fisher():
    model = one_output_model()
    ewc = EWC(model, seed=0)
    x = regression_task().tensors[0]
    ewc.register_task(0, loader(TensorDataset(x, torch.zeros(40, dtype=torch.long))))
    with pytest.raises(ValueError, match=r"a categorical likelihood needs at least two output units, got outputs of shape "
                                         r"\(8, 1\).*use likelihood='gaussian' for regression or 'bernoulli'"):
        ewc.register_task(1)


def test_floating_point_targets_without_a_known_loss_are_refused_before_the_step():
    model = one_output_model()
    before = snap(model)
    ewc = EWC(model)
    x, y = regression_task().tensors
    with pytest.raises(ValueError, match=r"EWC cannot tell the likelihood of floating-point targets \(torch.float64, from "
                                         r"train_step's targets, with a loss_fn \(<lambda>\) that names none\)"):
        ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.1), lambda f, t: (f - t).square().mean(), x, y, 0)
    assert ewc.active_task is None and all(torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_likelihood_joins_the_state_key_only_when_given():
    model = one_output_model()
    assert "likelihood" not in EWC(model).state_key  # checkpoints written before it existed still load
    assert "'likelihood': 'gaussian'" in EWC(model, likelihood="gaussian").state_key
    with pytest.raises(ValueError, match=r"likelihood must be one of 'categorical', 'gaussian', 'bernoulli'; got 'mse'"):
        EWC(model, likelihood="mse")


# ------------------------------------------------------------------------- the "predicted" Fisher
def test_predicted_fisher_equals_the_per_sample_reference_at_the_model_s_argmax_labels():
    model, task1, task2 = make_mlp(), make_task(seed=1), make_task(seed=2)
    ewc = EWC(model, fisher_sample_size=1000, fisher="predicted", seed=0)
    ewc.register_task(1, loader(task1))
    train(ewc, task1, 1)
    x = task1.tensors[0]
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1)
    model.train()
    reference = per_sample_fisher(model, x, predicted)
    assert not torch.equal(predicted, task1.tensors[1])  # differs from the empirical Fisher's labels
    ewc.register_task(2, loader(task2))
    assert_dicts_close(ewc._tasks[1]["fisher"], reference)


def test_predicted_bernoulli_labels_are_the_positive_logits():
    logits = torch.tensor([[0.3, -1.0], [-0.2, 2.0]])
    assert torch.equal(CF.predicted_labels(logits, "bernoulli"), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(CF.predicted_labels(logits), torch.tensor([0, 1]))


def test_predicted_fisher_refuses_a_gaussian_likelihood_before_any_change():
    message = "fisher='predicted' needs a likelihood with a most likely label (categorical or bernoulli)"
    with pytest.raises(ValueError, match=re.escape(message)):
        EWC(make_mlp(), fisher="predicted", likelihood="gaussian")
    model = make_mlp(classes=2)
    ewc = EWC(model, fisher="predicted")
    before = snap(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(message) + r".*loss_fn mse_loss"):
        ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, x, torch.zeros(4, 2, dtype=torch.float64), 0)
    assert ewc.active_task is None and all(torch.equal(p, before[n]) for n, p in trainable(model).items())
