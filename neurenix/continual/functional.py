"""The maths of the continual-learning methods, once, as pure functions.

The method classes (and so both the Lightning callbacks and the standalone ``train_step`` API)
call these and nothing else for their formulas. Lists of tensors are processed with PyTorch's
multi-tensor (``torch._foreach_*``) kernels: one fused launch per operation for all parameters.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "add_quadratic_penalty_grad_",
    "as_arguments",
    "distillation_loss",
    "LIKELIHOODS",
    "linear_squared_gradient_sum",
    "negative_log_likelihood",
    "packed",
    "quadratic_penalty",
    "reservoir_slots",
    "sample_model_labels",
    "si_accumulate_",
    "si_importance",
    "si_step_",
    "squared_gradient_sum",
]


#: A model's batched positional arguments: a tensor, or a tuple such as ``(inputs, task_ids)``.
ModelInputs = Union[Tensor, tuple[Tensor, ...]]


def as_arguments(inputs: ModelInputs) -> tuple[Tensor, ...]:
    """The positional arguments of a model call: ``inputs`` itself if it is a tuple."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


# --------------------------------------------------------------------------------------------
# EWC: diagonal Fisher from per-sample gradients
# --------------------------------------------------------------------------------------------

#: The output distributions p(y | x; θ) whose Fisher EWC takes: the model's outputs are the
#: logits of a categorical (softmax; cross-entropy), the means of a unit-variance Gaussian
#: (squared error), or the logits of independent Bernoullis (binary cross-entropy with logits).
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def negative_log_likelihood(outputs: Tensor, targets: Tensor, likelihood: str = "categorical") -> Tensor:
    """``−Σ_n log p(y_n | x_n; θ)`` over a batch, up to a constant: summed, so per-sample gradients are unscaled.

    - ``"categorical"``: ``cross_entropy(outputs, targets)``; targets are class indices ``(N,)``
      or class probabilities ``(N, C)``. Needs at least two output units (over one, the
      likelihood is constant and its Fisher zero).
    - ``"gaussian"``: ``½‖targets − outputs‖²``, the Gaussian of unit variance around the outputs
      (the likelihood behind a squared-error loss); targets hold one value per output.
    - ``"bernoulli"``: ``binary_cross_entropy_with_logits(outputs, targets)``; targets in
      ``[0, 1]``, one per output.

    Raises:
        ValueError: an unknown ``likelihood``, a categorical one over a single output unit, or
            targets that do not hold one value per output (Gaussian, Bernoulli).
    """
    if likelihood == "categorical":
        if outputs.dim() < 2 or outputs.shape[1] < 2:  # classes along dim 1, as cross_entropy reads them
            raise ValueError(
                f"a categorical likelihood needs at least two output units, got outputs of shape "
                f"{tuple(outputs.shape)}: over one unit it is constant and its Fisher is zero (for a one-output "
                "model use likelihood='gaussian' for regression or 'bernoulli' for binary classification)"
            )
        return F.cross_entropy(outputs, targets, reduction="sum")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}; got {likelihood!r}")
    if targets.numel() != outputs.numel():
        raise ValueError(
            f"a {likelihood} likelihood needs one target per output, got targets of shape {tuple(targets.shape)} "
            f"for outputs of shape {tuple(outputs.shape)}"
        )
    targets = targets.reshape(outputs.shape).to(outputs.dtype)
    if likelihood == "gaussian":
        return 0.5 * (targets - outputs).square().sum()
    return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")


def squared_gradient_sum(
    model: nn.Module,
    params: Mapping[str, Tensor],
    others: Mapping[str, Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    likelihood: str = "categorical",
) -> dict[str, Tensor]:
    """``Σ_n (∂/∂θ log p(y_n | x_n; θ))²`` over the samples of a batch, per parameter.

    Each sample's gradient is its own (``torch.func.vmap`` over ``grad``), so this is the diagonal
    of the Fisher information times the batch size, not the square of a mini-batch mean.
    ``log p`` is the ``likelihood`` of :func:`negative_log_likelihood` (by default the
    log-softmax of the model's outputs at the label).

    Args:
        model: evaluated with ``functional_call``; its own tensors are not used for ``params``.
        params: the tensors to differentiate, by name (the point θ at which the Fisher is taken).
        others: every other parameter and buffer the forward needs, by name.
        inputs: a batch of inputs ``(N, ...)``, or a tuple of the model's batched arguments
            (``(inputs, task_ids)`` for a multi-head model).
        targets: the labels ``(N, ...)`` (dataset labels: empirical Fisher; labels sampled from
            the model: true Fisher).
        likelihood: one of :data:`LIKELIHOODS`.
    """

    def sample_nll(sample_params: dict[str, Tensor], args: tuple[Tensor, ...], y: Tensor) -> Tensor:
        outputs = functional_call(model, (sample_params, dict(others)), tuple(a.unsqueeze(0) for a in args))
        return negative_log_likelihood(outputs, y.unsqueeze(0), likelihood)

    per_sample = vmap(grad(sample_nll), in_dims=(None, 0, 0))(dict(params), as_arguments(inputs), targets)
    return {name: g.square().sum(0) for name, g in per_sample.items()}


def linear_squared_gradient_sum(
    model: nn.Module,
    params: Mapping[str, Tensor],
    others: Mapping[str, Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    likelihood: str = "categorical",
) -> Optional[dict[str, Tensor]]:
    """:func:`squared_gradient_sum` in closed form for networks whose parameters are all in ``nn.Linear``.

    A linear layer's per-sample weight gradient is the outer product ``δ_n a_nᵀ`` of the gradient
    at its output and its input, so ``Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ (a²)``: one matrix product per
    layer instead of ``N`` materialized gradients (the identity behind BackPACK's
    ``SumGradSquared``, Dangel et al. 2020). The cost is about one training step.

    Returns ``None``, computing nothing further, when the identity does not apply: a parameter
    outside an ``nn.Linear``, a layer called more than once (shared weights), or a layer input
    that is not ``(N, features)``. The caller then uses :func:`squared_gradient_sum`.
    """
    layers = _linear_layers_owning(model, params)
    if layers is None:
        return None
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    seen: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in layers.values()}

    def record(layer: nn.Module, args: tuple, output: Tensor) -> None:
        seen[layer].append((args[0], output))

    handles = [layer.register_forward_hook(record) for layer in seen]
    try:
        logits = functional_call(model, (leaves, dict(others)), as_arguments(inputs))
    finally:
        for handle in handles:
            handle.remove()
    batch = targets.shape[0]
    calls = list(seen.values())
    if any(len(c) != 1 or c[0][0].dim() != 2 or c[0][0].shape[0] != batch for c in calls):
        return None
    loss = negative_log_likelihood(logits, targets, likelihood)  # summed: per-sample gradients, unscaled
    output_grads = torch.autograd.grad(loss, [c[0][1] for c in calls])
    squared = {}
    for (layer, ((layer_input, _),)), delta in zip(seen.items(), output_grads):
        delta_sq = delta.detach().square()
        for name, kind in _names_of(layer, layers):
            squared[name] = delta_sq.T @ layer_input.detach().square() if kind == "weight" else delta_sq.sum(0)
    return squared


def _linear_layers_owning(model: nn.Module, params: Mapping[str, Tensor]) -> Optional[dict[str, nn.Module]]:
    """``{parameter name: its nn.Linear}``, or ``None`` if some parameter is not a Linear's."""
    modules = dict(model.named_modules())
    owners = {}
    for name in params:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        if type(module) is not nn.Linear or kind not in ("weight", "bias"):
            return None
        owners[name] = module
    return owners


def _names_of(layer: nn.Module, owners: Mapping[str, nn.Module]) -> list[tuple[str, str]]:
    return [(name, name.rpartition(".")[2]) for name, owner in owners.items() if owner is layer]


def sample_model_labels(
    logits: Tensor, generator: Optional[torch.Generator] = None, likelihood: str = "categorical"
) -> Tensor:
    """Targets drawn from the model's predictive distribution (the ``likelihood`` at ``logits``).

    One label per row from ``softmax(logits)`` (categorical); ``logits + ε``, ``ε ~ N(0, I)``
    (Gaussian); a 0/1 value per output from ``sigmoid(logits)`` (Bernoulli).
    """
    outputs = logits.detach().float()
    if likelihood == "gaussian":
        return outputs + torch.randn(outputs.shape, generator=generator, device=outputs.device)
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(outputs), generator=generator)
    return torch.multinomial(torch.softmax(outputs, dim=-1), 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------------
# Quadratic penalties (EWC, L2, SI): scale/2 · Σ W · (θ − θ̄)²
# --------------------------------------------------------------------------------------------


def quadratic_penalty(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    weights: Optional[Sequence[Tensor]],
    scale: float,
) -> Tensor:
    """``scale/2 · Σ_i W_i · (θ_i − θ̄_i)²`` summed over all tensors; differentiable in ``params``.

    ``weights=None`` means every ``W_i = 1`` (plain L2).
    """
    if not params:
        raise ValueError("quadratic_penalty needs at least one parameter, got none")
    diffs = torch._foreach_sub(list(params), list(anchors))
    squares = torch._foreach_mul(diffs, diffs)
    if weights is not None:
        squares = torch._foreach_mul(squares, list(weights))
    total = torch.stack([s.sum() for s in squares]).sum()
    return total * (scale / 2)


@torch.no_grad()
def add_quadratic_penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    weights: Optional[Sequence[Tensor]],
    scale: float,
    workspace: Sequence[Tensor],
) -> None:
    """``grads += scale · W · (θ − θ̄)``: the closed-form gradient of :func:`quadratic_penalty`.

    No allocation: ``workspace`` (tensors shaped like ``params``, overwritten) holds ``θ − θ̄``.
    Subtracting the anchor first keeps the result exact where ``θ ≈ θ̄`` (no cancellation between
    ``W·θ`` and ``W·θ̄``). On the CPU, two kernels per tensor and seven reads or writes of
    parameter-sized memory (``W = 1``: six), which bound the cost; on a GPU, three multi-tensor
    kernels (see :func:`_one_tensor_at_a_time`).
    """
    if _one_tensor_at_a_time(params):
        for i, (g, p, a, diff) in enumerate(zip(grads, params, anchors, workspace)):
            torch.sub(p, a, out=diff)
            if weights is None:
                g.add_(diff, alpha=scale)
            else:
                g.addcmul_(diff, weights[i], value=scale)
        return
    grads, workspace = list(grads), list(workspace)
    torch._foreach_copy_(workspace, list(params))
    torch._foreach_sub_(workspace, list(anchors))
    if weights is None:
        torch._foreach_add_(grads, workspace, alpha=scale)
    else:
        torch._foreach_addcmul_(grads, workspace, list(weights), value=scale)


def _one_tensor_at_a_time(tensors: Sequence[Tensor]) -> bool:
    """Whether element-wise updates of ``tensors`` are cheaper as one call per tensor than as
    multi-tensor (``torch._foreach_*``) calls: on the CPU.

    There PyTorch's multi-tensor ops loop over the tensors with one kernel each anyway, so a
    per-tensor loop costs no more kernels, runs each tensor's updates back to back (a small
    tensor stays in cache between them), and writes results straight to their destination
    (``out=``) where a multi-tensor op would need a copy first: a pass over the parameters fewer.
    On a GPU one multi-tensor kernel replaces a launch per tensor.
    """
    return not tensors or tensors[0].device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Synaptic Intelligence (Zenke, Poole & Ganguli 2017)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def si_accumulate_(
    omega: Sequence[Tensor],
    grads: Sequence[Tensor],
    params_before: Sequence[Tensor],
    params_after: Sequence[Tensor],
) -> None:
    """``ω += −g · (θ_after − θ_before)``: one step of SI's path integral, in place in ``omega``.

    ``params_before`` is overwritten (it holds ``θ_before − θ_after`` afterwards), so the caller
    needs no scratch memory.
    """
    params_before = list(params_before)
    torch._foreach_sub_(params_before, list(params_after))
    torch._foreach_addcmul_(list(omega), list(grads), params_before)


@torch.no_grad()
def si_step_(
    omega: Sequence[Tensor],
    pending_grads: Sequence[Tensor],
    pending_params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    params: Sequence[Tensor],
    close_pending: bool,
    pending_grads_storage: Optional[Tensor] = None,
) -> None:
    """SI's work for one optimizer step, in place: close the step taken, then record this one.

    With ``close_pending``, the step taken since the last call is added to the path integral,
    ``ω += −g_prev · (θ − θ_prev)`` (:func:`si_accumulate_`, ``pending_*`` holding ``g_prev`` and
    ``θ_prev``); then ``pending_grads`` and ``pending_params`` take this step's gradient (zero for a
    ``None`` gradient) and parameters ``θ``, whose change is known only after the step.

    Non-finite gradient entries are recorded as zero. A gradient scaler (AMP ``16-mixed``) skips
    the optimizer step whose gradient overflowed, so that step's true contribution is zero, while
    ``inf · 0`` would turn ``ω`` into NaN for the rest of the task (and Ω, the penalty and every
    later gradient with it). On a GPU, where each kernel is a launch and no multi-tensor
    ``nan_to_num`` exists, ``pending_grads_storage`` (one tensor of which ``pending_grads`` are
    views, covering all of it) lets one kernel do it for every tensor.

    Eleven reads or writes of parameter-sized memory (four without ``close_pending``): the
    product needs copies of ``θ_prev``, which the optimizer overwrites, and of ``g_prev``, which
    the next backward (and a penalty's gradient) overwrites.
    """
    if _one_tensor_at_a_time(params):
        for om, pending_grad, pending_param, g, p in zip(omega, pending_grads, pending_params, grads, params):
            if close_pending:
                pending_param.sub_(p)  # −Δθ
                om.addcmul_(pending_grad, pending_param)
            _record_gradient(pending_grad, g)
            pending_param.copy_(p)
        return
    pending_grads, pending_params, params = list(pending_grads), list(pending_params), list(params)
    if close_pending:
        si_accumulate_(omega, pending_grads, pending_params, params)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    torch._foreach_copy_(pending_grads + pending_params, grads + params)
    for storage in [pending_grads_storage] if pending_grads_storage is not None else pending_grads:
        torch.nan_to_num_(storage, nan=0.0, posinf=0.0, neginf=0.0)


def _record_gradient(pending: Tensor, grad: Optional[Tensor]) -> None:
    """``pending = grad`` with non-finite entries as zero (see :func:`si_step_`); zero for ``None``."""
    if grad is None:
        pending.zero_()
    else:
        torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0, out=pending)


def packed(tensors: Mapping[str, Tensor]) -> tuple[Optional[Tensor], dict[str, Tensor]]:
    """Copies of ``tensors`` as views of one new flat tensor, which is returned with them.

    One kernel over the flat tensor then updates them all. ``(None, dict(tensors))`` (no copy)
    when there are none or they differ in device or dtype.
    """
    values = list(tensors.values())
    if not values or len({(t.device, t.dtype) for t in values}) > 1:
        return None, dict(tensors)
    storage = torch.cat([t.detach().reshape(-1) for t in values])
    views, offset = {}, 0
    for name, tensor in tensors.items():
        views[name] = storage[offset : offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    return storage, views


@torch.no_grad()
def si_importance(omega: Tensor, delta: Tensor, xi: float) -> Tensor:
    """``relu(ω / (Δ² + ξ))``: one task's contribution to SI's importance ``Ω``.

    ``Δ = θ_end − θ_start`` is the parameter's total change over the task; the ReLU keeps
    parameters whose path integral is negative (they went uphill) from being pulled away.
    """
    return torch.relu(omega / (delta.square() + xi))


# --------------------------------------------------------------------------------------------
# Knowledge distillation (Hinton et al. 2015; LwF, Li & Hoiem 2016)
# --------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    units: Optional[Tensor] = None,
) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch.

    Args:
        student_logits: ``(N, C)`` outputs of the model being trained.
        teacher_logits: ``(N, C)`` outputs of the frozen teacher on the same inputs.
        temperature: ``T > 0``; the ``T²`` factor keeps gradient magnitudes comparable across
            temperatures (Hinton et al. 2015).
        units: optional boolean mask ``(C,)`` of the output units to distil (in a
            class-incremental run, the classes the teacher has seen); ``None`` uses all.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if units is not None:
        student_logits = student_logits[..., units]
        teacher_logits = teacher_logits[..., units]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # 16-bit logits in float32
    student_log_p = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2


# --------------------------------------------------------------------------------------------
# Experience replay: reservoir sampling (Vitter 1985, Algorithm R), vectorized over a batch
# --------------------------------------------------------------------------------------------


def reservoir_slots(
    num_seen: int,
    batch_size: int,
    memory_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """Where the next ``batch_size`` stream items go in a reservoir of ``memory_size`` slots.

    Item ``n`` of the stream (0-based, ``n = num_seen + k``) fills slot ``n`` while the memory is
    not full; afterwards it replaces slot ``j``, ``j`` uniform in ``[0, n]``, if ``j <
    memory_size``. Every item seen so far is then in memory with the same probability. When two
    items of one batch pick the same slot the later one wins, exactly as inserting one by one.

    Returns:
        ``(positions, slots)``: batch positions of the items to store and the slot of each
        (no slot repeated).
    """
    stream_index = torch.arange(num_seen, num_seen + batch_size, device=device, dtype=torch.float64)
    uniform = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    draw = torch.floor(uniform * (stream_index + 1)).long()
    slots = torch.where(stream_index < memory_size, stream_index.long(), draw)
    accepted = slots < memory_size
    positions = torch.nonzero(accepted).squeeze(1)
    slots = slots[positions]
    # Keep the last item per slot: sort by slot (stable, so batch order is kept within a slot)
    # and take the final entry of each run of equal slots.
    slots, order = torch.sort(slots, stable=True)
    positions = positions[order]
    last_of_run = torch.ones_like(slots, dtype=torch.bool)
    last_of_run[:-1] = slots[1:] != slots[:-1]
    return positions[last_of_run], slots[last_of_run]
