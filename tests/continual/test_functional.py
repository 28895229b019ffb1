"""Values of neurenix.continual.functional against references computed another way."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from neurenix.continual import functional as CF
from tests.helpers import make_mlp, make_task

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


# ------------------------------------------------------------------------- negative_log_likelihood
def test_negative_log_likelihood_of_each_distribution_by_hand():
    outputs, targets = t(0.5, -1.0, 2.0).reshape(3, 1), t(1.0, 0.0, 2.5)
    # Gaussian of unit variance: ½ Σ (y − f)² = ½ (0.25 + 1 + 0.25)
    assert CF.negative_log_likelihood(outputs, targets, "gaussian").item() == pytest.approx(0.75, abs=1e-15)
    # Bernoulli with logits: −Σ [y log σ(f) + (1 − y) log(1 − σ(f))], targets 1, 0 and (for the third) 1
    probabilities = [1 / (1 + math.exp(-f)) for f in (0.5, -1.0, 2.0)]
    hand = -(math.log(probabilities[0]) + math.log(1 - probabilities[1]) + math.log(probabilities[2]))
    assert CF.negative_log_likelihood(outputs, t(1.0, 0.0, 1.0), "bernoulli").item() == pytest.approx(hand, abs=1e-14)
    # categorical: −Σ log softmax(f)_y
    logits = t(1.0, 2.0, 0.0, 0.0, 0.0, 3.0).reshape(2, 3)
    hand = -(1.0 - math.log(math.e + math.e**2 + 1)) - (3.0 - math.log(2 + math.e**3))
    assert CF.negative_log_likelihood(logits, torch.tensor([0, 2]), "categorical").item() == pytest.approx(hand, abs=1e-14)


def test_negative_log_likelihood_refuses_what_has_no_fisher_or_does_not_fit():
    with pytest.raises(ValueError, match=r"a categorical likelihood needs at least two output units, got outputs of shape \(4, 1\)"):
        CF.negative_log_likelihood(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a gaussian likelihood needs one target per output, got targets of shape \(4,\) for outputs of shape \(4, 2\)"):
        CF.negative_log_likelihood(torch.zeros(4, 2), torch.zeros(4), "gaussian")
    with pytest.raises(ValueError, match=r"likelihood must be one of 'categorical', 'gaussian', 'bernoulli'; got 'poisson'"):
        CF.negative_log_likelihood(torch.zeros(4, 2), torch.zeros(4, 2), "poisson")


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_model_targets_are_drawn_from_the_likelihood_at_the_outputs(likelihood):
    outputs = torch.full((20000, 1), 0.7, dtype=D)
    drawn = CF.sample_model_labels(outputs, torch.Generator().manual_seed(0), likelihood)
    assert drawn.shape == outputs.shape
    if likelihood == "gaussian":  # N(0.7, 1): mean and variance within 4 standard errors
        assert abs(drawn.mean().item() - 0.7) < 4 / math.sqrt(20000)
        assert abs(drawn.var().item() - 1.0) < 4 * math.sqrt(2 / 20000)
    else:  # Bernoulli(σ(0.7)) in {0, 1}
        assert set(drawn.unique().tolist()) == {0.0, 1.0}
        p = 1 / (1 + math.exp(-0.7))
        assert abs(drawn.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / 20000)


# ------------------------------------------------------------------------- squared_gradient_sum
def per_sample_reference(model, x, y):
    """Σ_n (∂ CE(model(x_n), y_n) / ∂θ)², one autograd.grad per sample."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.square()
    return dict(zip(names, total))


def test_squared_gradient_sum_matches_per_sample_loop():
    model, (x, y) = make_mlp(), make_task(samples=17).tensors
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = CF.squared_gradient_sum(model, params, {}, x, y)
    reference = per_sample_reference(model, x, y)
    assert set(result) == set(reference)
    for name, ref in reference.items():
        assert result[name].dtype == D
        torch.testing.assert_close(result[name], ref, rtol=1e-12, atol=1e-14)


def test_squared_gradient_sum_is_taken_at_the_given_params_not_the_models():
    model, (x, y) = make_mlp(), make_task(samples=9).tensors
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=D))
    params = {n: p.detach().clone() for n, p in moved.named_parameters()}
    result = CF.squared_gradient_sum(model, params, {}, x, y)
    reference = per_sample_reference(moved, x, y)
    for name, ref in reference.items():
        torch.testing.assert_close(result[name], ref, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(result["0.weight"], per_sample_reference(model, x, y)["0.weight"])


@pytest.mark.parametrize("at_other_params", [False, True])
def test_linear_closed_form_matches_per_sample_loop(at_other_params):
    model, (x, y) = make_mlp(), make_task(samples=17).tensors
    point = copy.deepcopy(model)
    if at_other_params:  # evaluated at the given parameters, not the model's own
        with torch.no_grad():
            for p in point.parameters():
                p.mul_(1.7)
    params = {n: p.detach().clone() for n, p in point.named_parameters()}
    result = CF.linear_squared_gradient_sum(model, params, {}, x, y)
    for name, ref in per_sample_reference(point, x, y).items():
        torch.testing.assert_close(result[name], ref, rtol=1e-12, atol=1e-14)


class _Shared(torch.nn.Module):
    """One Linear applied twice: per-sample gradients are sums, the closed form does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(6, 6).double()

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))[:, :3]


class _Sequence(torch.nn.Module):
    """A Linear over (N, T, features): the per-sample gradient sums over T."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        return self.layer(x.view(x.shape[0], 2, 3)).sum(1)


@pytest.mark.parametrize("model", [make_mlp(batch_norm=True), _Shared(), _Sequence()], ids=["batchnorm", "shared", "sequence"])
def test_linear_closed_form_declines_where_it_does_not_hold(model):
    x, y = make_task(samples=5).tensors
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    others = dict(model.named_buffers())
    assert CF.linear_squared_gradient_sum(model.eval(), params, others, x, y) is None
    # ...and the general path still agrees with the per-sample loop there.
    result = CF.squared_gradient_sum(model, params, others, x, y)
    for name, ref in per_sample_reference(model, x, y).items():
        torch.testing.assert_close(result[name], ref, rtol=1e-10, atol=1e-12)


def test_squared_gradient_sum_uses_others_for_the_parameters_not_differentiated():
    model, (x, y) = make_mlp(), make_task(samples=6).tensors
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("2.")}
    others = {n: p.detach() for n, p in model.named_parameters() if n.startswith("0.")}
    result = CF.squared_gradient_sum(model, params, others, x, y)
    reference = per_sample_reference(model, x, y)
    assert set(result) == {"2.weight", "2.bias"}
    for name in result:
        torch.testing.assert_close(result[name], reference[name], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- quadratic penalty
PARAMS = [t(1.0, 2.0), t(3.0).reshape(1, 1)]
ANCHORS = [t(0.5, 2.5), t(1.0).reshape(1, 1)]
WEIGHTS = [t(2.0, 4.0), t(0.25).reshape(1, 1)]
# diffs: [0.5, -0.5], [[2]]; Σ W d² = 0.5 + 1 + 1 = 2.5; Σ d² = 0.25 + 0.25 + 4 = 4.5


def test_quadratic_penalty_value_by_hand():
    value = CF.quadratic_penalty(PARAMS, ANCHORS, WEIGHTS, scale=3.0)
    assert value.dim() == 0
    assert value.item() == pytest.approx(3.0 / 2 * 2.5, abs=1e-15)


def test_quadratic_penalty_without_weights_is_plain_l2():
    assert CF.quadratic_penalty(PARAMS, ANCHORS, None, scale=3.0).item() == pytest.approx(1.5 * 4.5, abs=1e-15)


def test_quadratic_penalty_autograd_gradient_is_scale_w_diff():
    params = [p.clone().requires_grad_(True) for p in PARAMS]
    grads = torch.autograd.grad(CF.quadratic_penalty(params, ANCHORS, WEIGHTS, scale=3.0), params)
    torch.testing.assert_close(grads[0], t(3.0, -6.0), rtol=0, atol=1e-15)  # 3·[2·0.5, 4·(-0.5)]
    torch.testing.assert_close(grads[1], t(1.5).reshape(1, 1), rtol=0, atol=1e-15)  # 3·0.25·2
    grads = torch.autograd.grad(CF.quadratic_penalty(params, ANCHORS, None, scale=3.0), params)
    torch.testing.assert_close(grads[0], t(1.5, -1.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(grads[1], t(6.0).reshape(1, 1), rtol=0, atol=1e-15)


def test_quadratic_penalty_without_parameters_raises():
    with pytest.raises(ValueError, match="at least one parameter"):
        CF.quadratic_penalty([], [], None, scale=1.0)


@pytest.fixture(params=["one-tensor-at-a-time", "multi-tensor"])
def kernel_path(request, monkeypatch):
    """Run a test on both code paths of the in-place updates: the CPU's one call per tensor and
    the multi-tensor (``torch._foreach_*``) calls that GPUs get."""
    if request.param == "multi-tensor":
        monkeypatch.setattr(CF, "_one_tensor_at_a_time", lambda tensors: False)
    return request.param


@pytest.mark.parametrize(
    "weights, expected",
    [(WEIGHTS, [t(1.0 + 3.0, 1.0 - 6.0), t(-1.0 + 1.5).reshape(1, 1)]),
     (None, [t(1.0 + 1.5, 1.0 - 1.5), t(-1.0 + 6.0).reshape(1, 1)])],
    ids=["weights", "no-weights"],
)
def test_add_quadratic_penalty_grad_adds_to_existing_grads(weights, expected, kernel_path):
    grads = [t(1.0, 1.0), t(-1.0).reshape(1, 1)]
    workspace = [torch.empty_like(p) for p in PARAMS]
    params_before = [p.clone() for p in PARAMS]
    CF.add_quadratic_penalty_grad_(grads, PARAMS, ANCHORS, weights, 3.0, workspace)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    for p, before in zip(PARAMS, params_before):
        assert torch.equal(p, before)


def test_add_quadratic_penalty_grad_equals_autograd_of_penalty_on_random_tensors(kernel_path):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    params = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
    anchors = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
    weights = [torch.rand(s, generator=gen, dtype=D) for s in shapes]
    start = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
    leaves = [p.clone().requires_grad_(True) for p in params]
    auto = torch.autograd.grad(CF.quadratic_penalty(leaves, anchors, weights, 7.5), leaves)
    grads = [s.clone() for s in start]
    CF.add_quadratic_penalty_grad_(grads, params, anchors, weights, 7.5, [torch.empty_like(p) for p in params])
    for g, s, a in zip(grads, start, auto):
        torch.testing.assert_close(g, s + a, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
def test_add_quadratic_penalty_grad_paths_agree_bit_for_bit_on_parameters(weighted, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    shapes = [(40, 30), (30,), (3, 4, 5), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]  # require grad, as in training
    anchors = [p.detach() + 1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    weights = [torch.rand(s, generator=gen) for s in shapes] if weighted else None
    start = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for one_at_a_time in (True, False):
        monkeypatch.setattr(CF, "_one_tensor_at_a_time", lambda tensors, answer=one_at_a_time: answer)
        grads = [g.clone() for g in start]
        CF.add_quadratic_penalty_grad_(grads, params, anchors, weights, 1000.0, [torch.empty_like(p) for p in params])
        results.append(grads)
    for a, b in zip(*results):
        assert torch.equal(a, b) and a.grad_fn is None and not a.requires_grad


# ------------------------------------------------------------------------- synaptic intelligence
def test_si_accumulate_by_hand():
    omega, grads = [t(0.5, -1.0)], [t(2.0, 3.0)]
    before, after = [t(1.0, 1.0)], [t(1.5, 0.5)]
    CF.si_accumulate_(omega, grads, before, after)
    # Δθ = [0.5, -0.5]; −g·Δθ = [-1, 1.5]
    torch.testing.assert_close(omega[0], t(-0.5, 0.5), rtol=0, atol=1e-15)
    assert torch.equal(grads[0], t(2.0, 3.0)) and torch.equal(after[0], t(1.5, 0.5))


def test_si_step_closes_the_pending_step_then_records_this_one(kernel_path):
    omega = [t(0.5, -1.0), t(0.0)]
    pending_grads, pending_params = [t(2.0, 3.0), t(4.0)], [t(1.0, 1.0), t(2.0)]
    grads, params = [t(-1.0, 0.25), None], [t(1.5, 0.5), t(1.0)]
    CF.si_step_(omega, pending_grads, pending_params, grads, params, close_pending=True)
    # Δθ = [0.5, -0.5], [-1]; ω −= g_prev·Δθ: [0.5 − 1, −1 + 1.5], [0 + 4]
    torch.testing.assert_close(omega[0], t(-0.5, 0.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(omega[1], t(4.0), rtol=0, atol=1e-15)
    assert torch.equal(pending_grads[0], t(-1.0, 0.25)) and torch.equal(pending_grads[1], t(0.0))  # None: zero
    assert torch.equal(pending_params[0], t(1.5, 0.5)) and torch.equal(pending_params[1], t(1.0))
    assert torch.equal(grads[0], t(-1.0, 0.25)) and torch.equal(params[0], t(1.5, 0.5))  # inputs untouched
    # Without a pending step (the first of a task) only the recording happens.
    CF.si_step_(omega, pending_grads, pending_params, [t(7.0, 8.0), t(9.0)], [t(0.0, 0.0), t(3.0)], close_pending=False)
    torch.testing.assert_close(omega[0], t(-0.5, 0.5), rtol=0, atol=1e-15)
    assert torch.equal(pending_grads[1], t(9.0)) and torch.equal(pending_params[0], t(0.0, 0.0))


def test_si_step_equals_si_accumulate_then_copies_on_parameters(kernel_path):
    gen = torch.Generator().manual_seed(4)
    shapes = [(40, 30), (30,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    omega, pending_grads = [torch.randn(s, generator=gen) for s in shapes], [torch.randn(s, generator=gen) for s in shapes]
    pending_params = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    expected = [o.clone() for o in omega]
    CF.si_accumulate_(expected, pending_grads, [q.clone() for q in pending_params], [p.detach() for p in params])
    CF.si_step_(omega, pending_grads, pending_params, grads, params, close_pending=True)
    for o, e, pg, g, pp, p in zip(omega, expected, pending_grads, grads, pending_params, params):
        assert torch.equal(o, e) and torch.equal(pg, g) and torch.equal(pp, p.detach())
        assert not (o.requires_grad or pg.requires_grad or pp.requires_grad)


def test_si_step_records_a_non_finite_gradient_as_zero(kernel_path):
    # A gradient scaler skips the step whose gradient overflowed: θ does not move, and the step
    # must add nothing to ω (recorded as is, inf · 0 would make ω NaN for the rest of the task).
    omega = [t(0.5, -1.0, 2.0)]
    pending_grads, pending_params = [t(0.0, 0.0, 0.0)], [t(0.0, 0.0, 0.0)]
    params = [t(1.0, 2.0, 3.0)]
    CF.si_step_(omega, pending_grads, pending_params, [t(float("inf"), float("nan"), 4.0)], params, close_pending=False)
    assert torch.equal(pending_grads[0], t(0.0, 0.0, 4.0))
    CF.si_step_(omega, pending_grads, pending_params, [t(1.0, 1.0, 1.0)], params, close_pending=True)  # skipped: Δθ = 0
    assert torch.equal(omega[0], t(0.5, -1.0, 2.0))
    CF.si_step_(omega, pending_grads, pending_params, [t(float("-inf"), 1.0, 1.0)], [t(2.0, 2.0, 2.0)], close_pending=True)
    # Δθ = [1, 0, −1] after the step recorded with g = [1, 1, 1]: ω −= [1, 0, −1]
    torch.testing.assert_close(omega[0], t(-0.5, -1.0, 3.0), rtol=0, atol=1e-15)
    assert torch.equal(pending_grads[0], t(0.0, 1.0, 1.0))


@pytest.mark.parametrize("packed_storage", [False, True], ids=["tensors", "one-storage"])
def test_si_step_clears_non_finite_entries_of_packed_pending_gradients(kernel_path, packed_storage):
    storage, pending = CF.packed({"w": t(9.0, 9.0), "b": t(9.0)})
    assert storage.shape == (3,) and pending["w"].data_ptr() == storage.data_ptr()
    omega, pending_params = [t(0.0, 0.0), t(0.0)], [t(0.0, 0.0), t(0.0)]
    grads = [t(float("nan"), 2.0), t(float("-inf"))]
    CF.si_step_(omega, list(pending.values()), pending_params, grads, [t(1.0, 1.0), t(1.0)], False, storage if packed_storage else None)
    assert torch.equal(storage, t(0.0, 2.0, 0.0))
    assert torch.equal(pending["w"], t(0.0, 2.0)) and torch.equal(pending["b"], t(0.0))


def test_packed_copies_tensors_into_views_of_one_flat_tensor():
    tensors = {"w": torch.arange(6.0, dtype=D).reshape(2, 3), "s": torch.tensor(7.0, dtype=D), "b": t(8.0, 9.0)}
    storage, views = CF.packed(tensors)
    assert torch.equal(storage, t(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0))
    assert list(views) == ["w", "s", "b"]
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor) and views[name].shape == tensor.shape
        assert views[name].untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    views["b"].fill_(0.0)
    assert torch.equal(storage[-2:], t(0.0, 0.0)) and torch.equal(tensors["b"], t(8.0, 9.0))  # copies
    # Nothing to pack, or tensors of several dtypes: no storage and the tensors as they are.
    assert CF.packed({}) == (None, {})
    mixed = {"a": t(1.0), "b": torch.ones(2, dtype=torch.float32)}
    storage, views = CF.packed(mixed)
    assert storage is None and views["a"] is mixed["a"] and views["b"] is mixed["b"]


def test_si_importance_by_hand_including_negative_omega():
    result = CF.si_importance(t(2.0, -1.0, 0.3), t(1.0, 2.0, 0.0), xi=0.1)
    torch.testing.assert_close(result, t(2.0 / 1.1, 0.0, 3.0), rtol=1e-15, atol=1e-15)


# ------------------------------------------------------------------------- distillation
def kl_reference(student, teacher, temperature):
    """T² · Σ_n Σ_c p_t (log p_t − log p_s) / N with softmax written out in Python floats."""
    def log_softmax(row):
        z = [v / temperature for v in row]
        m = max(z)
        log_sum = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - log_sum for v in z]
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        log_ps, log_pt = log_softmax(s_row), log_softmax(t_row)
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
    return temperature**2 * total / len(student)


STUDENT = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-2.0, 0.0, 0.5, 0.5]]
TEACHER = [[0.5, 0.5, 1.0, -1.0], [2.0, -1.0, 0.0, 0.3], [1.0, 1.0, -0.5, 2.5]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_loss_by_hand(temperature):
    value = CF.distillation_loss(torch.tensor(STUDENT, dtype=D), torch.tensor(TEACHER, dtype=D), temperature)
    assert value.item() == pytest.approx(kl_reference(STUDENT, TEACHER, temperature), rel=1e-6)


def test_distillation_loss_is_zero_for_identical_logits():
    logits = torch.tensor(STUDENT, dtype=D)
    assert abs(CF.distillation_loss(logits, logits.clone(), 2.0).item()) < 1e-7


def test_distillation_loss_units_mask_renormalizes_over_the_chosen_columns():
    units = torch.tensor([True, False, True, True])
    value = CF.distillation_loss(torch.tensor(STUDENT, dtype=D), torch.tensor(TEACHER, dtype=D), 2.0, units=units)
    pick = lambda rows: [[r[0], r[2], r[3]] for r in rows]  # noqa: E731
    assert value.item() == pytest.approx(kl_reference(pick(STUDENT), pick(TEACHER), 2.0), rel=1e-6)
    full = CF.distillation_loss(torch.tensor(STUDENT, dtype=D), torch.tensor(TEACHER, dtype=D), 2.0)
    assert abs(value.item() - full.item()) > 1e-3  # the mask changed something


def test_distillation_loss_gradient_reaches_the_student_only_through_masked_units():
    student = torch.tensor(STUDENT, dtype=D, requires_grad=True)
    units = torch.tensor([True, False, True, True])
    CF.distillation_loss(student, torch.tensor(TEACHER, dtype=D), 2.0, units=units).backward()
    assert torch.all(student.grad[:, 1] == 0) and torch.all(student.grad[:, [0, 2, 3]].abs().sum(1) > 0)


def test_distillation_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\).*\(3, 5\)"):
        CF.distillation_loss(torch.zeros(3, 4), torch.zeros(3, 5), 1.0)


# ------------------------------------------------------------------------- reservoir sampling
def algorithm_r_reference(num_seen, batch_size, memory_size, uniform):
    """One item at a time (Vitter's Algorithm R) with the given draws: {slot: batch position}."""
    memory = {}
    for k in range(batch_size):
        n = num_seen + k
        slot = n if n < memory_size else math.floor(uniform[k].item() * (n + 1))
        if slot < memory_size:
            memory[slot] = k  # a later item of the batch overwrites an earlier one
    return memory


def stored_by(slots, memory_size):
    """{slot: batch position} of the items that ``reservoir_slots`` keeps."""
    return {slot: k for k, slot in enumerate(slots.tolist()) if slot < memory_size}


def test_reservoir_slots_fill_in_stream_order_while_not_full():
    slots = CF.reservoir_slots(3, 5, 10, generator=torch.Generator().manual_seed(0))
    assert slots.tolist() == [3, 4, 5, 6, 7]


def test_reservoir_slots_send_what_is_kept_nowhere_to_the_spare_slot():
    # Memory of 2 full after 2 items; item n replaces slot floor(u * (n + 1)) if below 2.
    generator = torch.Generator().manual_seed(5)
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=D)
    draws = [math.floor(uniform[k].item() * (n + 1)) for k, n in enumerate(range(2, 6))]
    slots = CF.reservoir_slots(2, 4, 2, generator=generator)
    expected = [d if d < 2 else 2 for d in draws]
    for k, slot in enumerate(expected):  # an item overwritten by a later one of the batch goes nowhere
        if slot < 2 and slot in expected[k + 1:]:
            expected[k] = 2
    assert slots.tolist() == expected
    assert slots.shape == (4,) and slots.dtype == torch.long


@pytest.mark.parametrize("num_seen, batch_size, memory_size", [(0, 12, 8), (6, 9, 8), (3, 20, 3), (50, 30, 5), (100, 7, 40)])
def test_reservoir_slots_match_one_by_one_algorithm_r(num_seen, batch_size, memory_size):
    duplicates_seen = False
    for seed in range(30):
        slots = CF.reservoir_slots(num_seen, batch_size, memory_size, generator=torch.Generator().manual_seed(seed))
        uniform = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed), dtype=D)
        expected = algorithm_r_reference(num_seen, batch_size, memory_size, uniform)
        kept = [s for s in slots.tolist() if s < memory_size]
        assert len(set(kept)) == len(kept), "a slot was returned twice"
        assert all(0 <= s <= memory_size for s in slots.tolist())
        assert stored_by(slots, memory_size) == expected
        draws = [n if n < memory_size else math.floor(uniform[k].item() * (n + 1))
                 for k, n in enumerate(range(num_seen, num_seen + batch_size))]
        drawn = [d for d in draws if d < memory_size]
        duplicates_seen |= len(drawn) != len(set(drawn))
    if (num_seen, batch_size, memory_size) == (3, 20, 3):
        assert duplicates_seen, "the case meant to exercise within-batch collisions had none"


def test_reservoir_keeps_every_stream_item_with_equal_probability():
    stream, memory_size, batch, trials = 40, 8, 7, 1500
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(stream)
    for _ in range(trials):
        memory = torch.full((memory_size + 1,), -1)  # the last slot is the spare one
        for start in range(0, stream, batch):
            size = min(batch, stream - start)
            slots = CF.reservoir_slots(start, size, memory_size, generator=gen)
            memory[slots] = start + torch.arange(size)
        memory = memory[:memory_size]
        assert (memory >= 0).all() and len(set(memory.tolist())) == memory_size
        counts[memory] += 1
    frequency = counts / trials
    expected, sd = memory_size / stream, math.sqrt(0.2 * 0.8 / trials)
    assert (frequency - expected).abs().max().item() < 4.5 * sd


# ------------------------------------------------------------------------- DER: logit matching
def test_logit_matching_loss_by_hand():
    outputs, stored = t(1.0, 2.0, 3.0, 4.0).reshape(2, 2), t(0.0, 2.0, 5.0, 1.0).reshape(2, 2)
    # differences 1, 0, −2, 3: squares 1, 0, 4, 9, mean over batch and units 14 / 4
    assert CF.logit_matching_loss(outputs, stored).item() == 3.5


def test_logit_matching_loss_gradient_is_two_differences_over_numel():
    outputs = torch.randn(5, 7, dtype=D, requires_grad=True)
    stored = torch.randn(5, 7, dtype=D)
    (gradient,) = torch.autograd.grad(CF.logit_matching_loss(outputs, stored), outputs)
    torch.testing.assert_close(gradient, 2 * (outputs.detach() - stored) / 35, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logit_matching_loss_of_16_bit_outputs_is_float32(dtype):
    # differences of several hundred: their squares overflow float16 (max 65504), so only a
    # float32 computation gets this right
    outputs = (torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 300).to(dtype).requires_grad_()
    stored = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)) * 300
    loss = CF.logit_matching_loss(outputs, stored)
    assert loss.dtype == torch.float32
    reference = (outputs.detach().to(D) - stored.to(D)).square().mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    (gradient,) = torch.autograd.grad(loss, outputs)
    assert gradient.dtype == dtype and torch.isfinite(gradient).all()


def test_logit_matching_loss_shape_mismatch_names_both_shapes():
    message = r"outputs and stored_logits must have the same shape, got \(4, 10\) and \(4, 5\)"
    with pytest.raises(ValueError, match=message):
        CF.logit_matching_loss(torch.zeros(4, 10), torch.zeros(4, 5))


# ------------------------------------------------------------------------- ER-ACE: masks
def test_present_classes_mask_marks_the_labels_in_the_batch():
    mask = CF.present_classes_mask(torch.tensor([3, 1, 3]), 5)
    assert mask.dtype == torch.bool and mask.tolist() == [False, True, False, True, False]
    int32_mask = CF.present_classes_mask(torch.tensor([0, 4], dtype=torch.int32), 5)
    assert int32_mask.tolist() == [True, False, False, False, True]


def test_present_classes_mask_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer, got 0"):
        CF.present_classes_mask(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match=r"targets must be integer class labels, got dtype torch.float32"):
        CF.present_classes_mask(torch.tensor([0.0, 1.0]), 3)


def test_masked_logits_by_hand():
    logits = t(1.0, 2.0, 3.0, 0.0, 5.0, -1.0).reshape(2, 3)
    mask = torch.tensor([True, False, True])
    lowest = torch.finfo(D).min
    assert CF.masked_logits(logits, mask).tolist() == [[1.0, lowest, 3.0], [0.0, lowest, -1.0]]
    per_row = torch.tensor([[True, True, False], [False, True, True]])
    assert CF.masked_logits(logits, per_row).tolist() == [[1.0, 2.0, lowest], [lowest, 5.0, -1.0]]


def test_cross_entropy_of_masked_logits_is_over_the_kept_units_only():
    logits = t(1.0, 2.0, 3.0, 0.0, 5.0, -1.0).reshape(2, 3).requires_grad_()
    targets = torch.tensor([2, 0])
    loss = F.cross_entropy(CF.masked_logits(logits, torch.tensor([True, False, True])), targets)
    # by hand, over units 0 and 2: −(3 − log(e + e³)) and −(0 − log(1 + e⁻¹)), averaged
    hand = (-(3 - math.log(math.e + math.e**3)) - (0 - math.log(1 + math.exp(-1)))) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-15)
    sliced = F.cross_entropy(logits[:, [0, 2]], torch.tensor([1, 0]))  # the kept units, relabelled
    assert loss.item() == pytest.approx(sliced.item(), abs=1e-15)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient[:, 1].tolist() == [0.0, 0.0]
    (sliced_gradient,) = torch.autograd.grad(sliced, logits)
    torch.testing.assert_close(gradient, sliced_gradient, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_logits_stay_finite_in_16_bit(dtype):
    logits = torch.tensor([[30.0, 2.0, -4.0, 1.0], [0.5, 25.0, 3.0, -2.0]], dtype=dtype, requires_grad=True)
    mask = CF.present_classes_mask(torch.tensor([0, 2]), 4)
    masked = CF.masked_logits(logits, mask)
    assert masked.dtype == dtype and torch.isfinite(masked).all()
    assert torch.softmax(masked.float(), dim=1)[:, [1, 3]].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    loss = F.cross_entropy(masked, torch.tensor([0, 2]))
    (gradient,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    assert gradient[:, [1, 3]].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    reference = F.cross_entropy(logits.detach().double()[:, [0, 2]], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2, abs=2e-2)


def test_masked_logits_refuses_a_mask_that_does_not_fit():
    with pytest.raises(ValueError, match=r"mask must be a boolean tensor, got dtype torch.int64"):
        CF.masked_logits(torch.zeros(2, 3), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) does not broadcast to logits of shape \(2, 3\)"):
        CF.masked_logits(torch.zeros(2, 3), torch.ones(4, dtype=torch.bool))


# ------------------------------------------------------------------------- A-GEM
def test_agem_projects_a_conflicting_gradient_across_parameters_by_hand():
    grads, reference = [t(1.0), t(0.0)], [t(-1.0), t(1.0)]  # g = [1, 0], g_ref = [−1, 1]: g·g_ref = −1
    coefficient = CF.agem_project_(grads, reference)
    assert coefficient.dim() == 0 and coefficient.item() == -0.5  # −1 / 2
    assert [g.item() for g in grads] == [0.5, 0.5]
    grads, reference = [t(1.0, 0.0), t(2.0)], [t(-1.0, 1.0), t(-1.0)]  # g·g_ref = −3, g_ref·g_ref = 3
    CF.agem_project_(grads, reference)
    assert grads[0].tolist() == [0.0, 1.0] and grads[1].tolist() == [1.0]  # g + g_ref
    assert (grads[0] * reference[0]).sum().item() + (grads[1] * reference[1]).sum().item() == 0.0


def test_agem_leaves_a_gradient_without_conflict_unchanged_bit_for_bit():
    cases = [
        ([t(0.3, 0.7), t(0.1)], [t(1.0, 0.5), t(0.25)]),  # g·g_ref = 0.675 > 0
        ([t(0.3, 0.0), t(0.7)], [t(0.0, 1.0), t(0.0)]),  # g·g_ref = 0 exactly: no conflict either
    ]
    for dtype in (D, torch.float16):
        for grads, reference in cases:
            grads = [g.to(dtype) for g in grads]
            before = [g.clone() for g in grads]
            assert CF.agem_project_(grads, reference).item() == 0.0
            assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_agem_with_a_zero_reference_gradient_changes_nothing_and_makes_no_nan():
    grads = [t(1.0, -2.0), t(3.0)]
    coefficient = CF.agem_project_(grads, [t(0.0, 0.0), t(0.0)])
    assert coefficient.item() == 0.0
    assert grads[0].tolist() == [1.0, -2.0] and grads[1].tolist() == [3.0]


def test_agem_projection_of_random_conflicts_is_orthogonal_to_the_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        shapes = [(3, 4), (4,), (2, 2, 2)]
        grads = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
        reference = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
        g, r = torch.cat([x.reshape(-1) for x in grads]), torch.cat([x.reshape(-1) for x in reference])
        if g @ r > 0:
            reference = [-x for x in reference]
            r = -r
        expected = g - (g @ r) / (r @ r) * r
        CF.agem_project_(grads, reference)
        projected = torch.cat([x.reshape(-1) for x in grads])
        torch.testing.assert_close(projected, expected, rtol=0, atol=1e-14)
        assert abs((projected @ r).item()) < 1e-13


def test_agem_works_on_float16_gradients_in_float32():
    # g·g_ref = −90000 and g_ref·g_ref = 180000 overflow float16 (max 65504): only float32 dot
    # products find the conflict and c = −0.5
    grads = [torch.tensor([300.0, 0.0], dtype=torch.float16)]
    for reference in ([torch.tensor([-300.0, 300.0])], [torch.tensor([-300.0, 300.0], dtype=torch.float16)]):
        projected = [g.clone() for g in grads]
        coefficient = CF.agem_project_(projected, reference)
        assert coefficient.dtype == torch.float32 and coefficient.item() == -0.5
        assert projected[0].dtype == torch.float16 and projected[0].tolist() == [150.0, 150.0]


def test_agem_refuses_gradients_that_do_not_match():
    with pytest.raises(ValueError, match=r"equal length, got 2 and 1 tensors"):
        CF.agem_project_([t(1.0), t(2.0)], [t(1.0)])
    with pytest.raises(ValueError, match=r"grads\[1\] and reference\[1\] differ in shape: \(2,\) and \(3,\)"):
        CF.agem_project_([t(1.0), t(1.0, 2.0)], [t(1.0), t(1.0, 2.0, 3.0)])
    with pytest.raises(ValueError, match=r"non-empty lists of equal length, got 0 and 0 tensors"):
        CF.agem_project_([], [])


# ------------------------------------------------------------------------- GEM: the dual QP
GRAM_2X2 = t(2.0, 1.0, 1.0, 2.0).reshape(2, 2)


@pytest.mark.parametrize(
    "linear, expected",
    [
        ((-3.0, -3.0), [1.0, 1.0]),  # both positive: M v = −q, v = M⁻¹[3, 3]
        ((-4.0, 1.0), [2.0, 0.0]),  # M⁻¹[4, −1] = [3, −2] is infeasible; v₂ = 0, v₁ = 4/2; Mv + q = [0, 3]
        ((1.0, 2.0), [0.0, 0.0]),  # q ≥ 0: v = 0 already satisfies Mv + q ≥ 0
    ],
)
def test_gem_dual_of_a_2x2_problem_by_hand(linear, expected):
    v = CF.gem_dual(GRAM_2X2, t(*linear))
    assert v.dtype == D and v.device.type == "cpu"
    torch.testing.assert_close(v, t(*expected), rtol=0, atol=1e-15)


def assert_kkt(M, q, v):
    """v ≥ 0, Mv + q ≥ 0, v·(Mv + q) = 0, up to the rounding of Mv + q."""
    residual = M @ v + q
    scale = q.abs().max() + (M.abs() @ v.abs()).max()
    assert (v >= 0).all()
    assert residual.min().item() >= -1e-12 * scale.item()
    assert (v * residual).abs().max().item() <= 1e-12 * scale.item() * (1 + v.abs().max().item())


def test_gem_dual_matches_scipy_nnls_on_random_positive_definite_problems():
    nnls = pytest.importorskip("scipy.optimize").nnls
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 5, 8, 13, 20):
        for _ in range(5):
            G = torch.randn(k, k + 10, generator=gen, dtype=D)
            M, q = G @ G.T, G @ torch.randn(k + 10, generator=gen, dtype=D)
            # the same problem as least squares: M = L Lᵀ, A = Lᵀ and b = −L⁻¹q give
            # ‖Av − b‖² = vᵀMv + 2qᵀv + const
            L = torch.linalg.cholesky(M)
            b = -torch.linalg.solve_triangular(L, q.unsqueeze(1), upper=False).squeeze(1)
            reference, _ = nnls(L.T.numpy(), b.numpy())
            v = CF.gem_dual(M, q)
            torch.testing.assert_close(v, torch.from_numpy(reference), rtol=1e-9, atol=1e-9)
            assert_kkt(M, q, v)


@pytest.mark.parametrize("kind", ["duplicates", "more_tasks_than_dimensions", "zero_row"])
def test_gem_dual_satisfies_kkt_on_rank_deficient_problems(kind):
    gen = torch.Generator().manual_seed(1)
    for k in (2, 5, 11, 20):
        for _ in range(10):
            if kind == "duplicates":
                half = torch.randn((k + 1) // 2, 30, generator=gen, dtype=D)
                G = torch.cat([half, half])[:k]
            elif kind == "more_tasks_than_dimensions":
                G = torch.randn(k, 3, generator=gen, dtype=D)
            else:
                G = torch.randn(k, 30, generator=gen, dtype=D)
                G[0] = 0.0
            M, q = G @ G.T, G @ torch.randn(G.shape[1], generator=gen, dtype=D)
            v = CF.gem_dual(M, q)
            assert_kkt(M, q, v)


def test_gem_dual_on_a_singular_block_adds_the_authors_diagonal():
    # Not a Gram pair (q is outside M's range), so the active-set method reaches the singular
    # block diag(1, 0); it then solves with M + 1e-3·I: v = [1/1.001, 1/0.001]
    v = CF.gem_dual(t(1.0, 0.0, 0.0, 0.0).reshape(2, 2), t(-1.0, -1.0))
    torch.testing.assert_close(v, t(1 / 1.001, 1000.0), rtol=1e-12, atol=0)


def test_gem_dual_refuses_bad_input():
    with pytest.raises(ValueError, match=r"gram must be \(K, K\) and linear \(K,\), got \(2, 3\) and \(2,\)"):
        CF.gem_dual(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"gram and linear must be finite"):
        CF.gem_dual(torch.eye(2), torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"gram must be positive semi-definite, got smallest eigenvalue -1"):
        CF.gem_dual(t(1.0, 0.0, 0.0, -1.0).reshape(2, 2), t(-1.0, -1.0))


# ------------------------------------------------------------------------- GEM: the projection
def test_gem_project_with_one_constraint_and_no_margin_is_agem():
    gen = torch.Generator().manual_seed(2)
    for dtype in (D, torch.float32):
        g, r = torch.randn(40, generator=gen, dtype=dtype), torch.randn(40, generator=gen, dtype=dtype)
        r = -r if g @ r > 0 else r
        z = CF.gem_project(g, r.unsqueeze(0), margin=0.0)
        agem = [g.clone()]
        CF.agem_project_(agem, [r])
        assert z.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(z, agem[0], rtol=tolerance, atol=tolerance)


def test_gem_project_with_one_constraint_and_a_margin_by_hand():
    g, G = t(1.0, 0.0), t(-1.0, 1.0).reshape(1, 2)  # v* = 0.5 without a margin
    torch.testing.assert_close(CF.gem_project(g, G, margin=0.0), t(0.5, 0.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(CF.gem_project(g, G, margin=0.25), t(0.5, 0.5), rtol=0, atol=1e-15)  # v = max(0.5, 0.25)
    torch.testing.assert_close(CF.gem_project(g, G, margin=1.0), t(0.0, 1.0), rtol=0, atol=1e-15)  # v = 1


def test_gem_project_keeps_every_constraint_where_the_papers_margin_would_not():
    # G = [[1, 0], [−2, 0.1]], g = [−1, −1]: v* = [21, 10] (both positive). The paper's
    # z = Gᵀ(v* + 0.5) + g = [−0.5, 0.05] has G z = [−0.5, 1.005]: task 1 is hurt. With v ≥ 0.5 in
    # the QP (the authors' code) v = [21, 10] and z = 21·[1, 0] + 10·[−2, 0.1] + g = [0, 0].
    G, g = t(1.0, 0.0, -2.0, 0.1).reshape(2, 2), t(-1.0, -1.0)
    z = CF.gem_project(g, G, margin=0.5)
    torch.testing.assert_close(z, t(0.0, 0.0), rtol=0, atol=1e-11)


def test_gem_project_satisfies_every_constraint_on_random_conflicts():
    gen = torch.Generator().manual_seed(4)
    for k in (1, 2, 5, 10):
        for margin in (0.0, 0.5, 2.0):
            G = torch.randn(k, 50, generator=gen, dtype=D)
            G[k // 2 :] -= 2 * G[0]  # earlier tasks that conflict with each other too
            g = -G.sum(0) + 0.1 * torch.randn(50, generator=gen, dtype=D)
            assert (G @ g < 0).any()
            z = CF.gem_project(g, G, margin)
            assert (G @ z).min().item() >= -1e-10 * G.norm().item() * z.norm().item()
            if margin == 0.0:  # the closest gradient to g that keeps them: no feasible step nearer
                for _ in range(20):
                    feasible = z + 0.01 * torch.randn(50, generator=gen, dtype=D)
                    if (G @ feasible >= 0).all():
                        assert (feasible - g).norm() >= (z - g).norm() - 1e-12


def test_gem_project_without_conflict_returns_the_gradient_itself():
    g, G = t(1.0, 2.0, 3.0), t(1.0, 0.0, 0.0, 0.0, 1.0, -0.5).reshape(2, 3)  # G g = [1, 0.5]
    assert CF.gem_project(g, G) is g
    assert g.tolist() == [1.0, 2.0, 3.0]
    assert CF.gem_project(g, torch.zeros(0, 3, dtype=D)) is g  # no earlier task


def test_gem_project_passes_a_non_finite_gradient_through():
    g = t(float("inf"), -1.0)
    assert CF.gem_project(g, t(-1.0, 1.0).reshape(1, 2)) is g


def test_gem_project_of_float16_gradients_is_float16_and_close_to_float64():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(3, 64, generator=gen).to(torch.float16)
    g = (-G.float().sum(0) + torch.randn(64, generator=gen)).to(torch.float16)
    z = CF.gem_project(g, G, margin=0.5)
    reference = CF.gem_project(g.double(), G.double(), margin=0.5)
    assert z.dtype == torch.float16
    torch.testing.assert_close(z.double(), reference, rtol=2e-3, atol=2e-3)


def test_gem_project_in_column_chunks_equals_one_chunk(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(4, 100, generator=gen, dtype=D)
    g = -G.sum(0)
    whole = CF.gem_project(g, G)
    monkeypatch.setattr(CF, "_GRAM_CHUNK", 7)
    torch.testing.assert_close(CF.gem_project(g, G), whole, rtol=1e-13, atol=1e-13)


def test_gem_project_refuses_bad_input():
    with pytest.raises(ValueError, match=r"grad must be \(P,\) and constraints \(K, P\), got \(3,\) and \(2, 4\)"):
        CF.gem_project(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"margin must be a finite number >= 0, got -0.1"):
        CF.gem_project(torch.zeros(3), torch.zeros(2, 3), margin=-0.1)
