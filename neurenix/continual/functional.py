"""The maths of the continual-learning methods, once, as pure functions.

The method classes (and so both the Lightning callbacks and the standalone ``train_step`` API)
call these and nothing else for their formulas. Lists of tensors are processed with PyTorch's
multi-tensor (``torch._foreach_*``) kernels: one fused launch per operation for all parameters.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "add_quadratic_penalty_grad_",
    "agem_project_",
    "as_arguments",
    "BIAS_FIT_STEPS",
    "bias_corrected",
    "bic_loss",
    "class_sums",
    "closest_to_mean_order",
    "distillation_loss",
    "fit_bias_correction",
    "GEM_DIAGONAL_EPS",
    "gem_dual",
    "gem_project",
    "herding_order",
    "icarl_loss",
    "icarl_targets",
    "LIKELIHOODS",
    "likelihood_objective",
    "linear_gradient_power_sum",
    "linear_squared_gradient_sum",
    "logit_matching_loss",
    "masked_logits",
    "mas_importance_sum",
    "nearest_mean_scores",
    "negative_log_likelihood",
    "packed",
    "per_sample_gradient_power_sum",
    "predicted_labels",
    "present_classes_mask",
    "quadratic_penalty",
    "reservoir_slots",
    "rwalk_average_scores",
    "rwalk_fisher_update_",
    "rwalk_interval_score",
    "rwalk_weights",
    "sample_model_labels",
    "si_accumulate_",
    "si_importance",
    "si_step_",
    "squared_gradient_sum",
    "squared_output_norm",
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
    return per_sample_gradient_power_sum(model, params, others, inputs, targets, likelihood_objective(likelihood), 2)


#: ``objective(outputs, targets)``: a batch's objective summed over its samples, whose per-sample
#: gradients :func:`per_sample_gradient_power_sum` takes.
Objective = Callable[[Tensor, Tensor], Tensor]


def likelihood_objective(likelihood: str) -> Objective:
    """``(outputs, targets) ↦ −Σ log p``: EWC's per-sample objective, for the gradient sums."""

    def objective(outputs: Tensor, targets: Tensor) -> Tensor:
        return negative_log_likelihood(outputs, targets, likelihood)

    return objective


def _power(tensor: Tensor, power: int) -> Tensor:
    """``|x|^power`` element-wise for ``power`` 1 (``abs``) or 2 (``square``)."""
    if power == 2:
        return tensor.square()
    if power == 1:
        return tensor.abs()
    raise ValueError(f"power must be 1 or 2, got {power!r}")


def per_sample_gradient_power_sum(
    model: nn.Module,
    params: Mapping[str, Tensor],
    others: Mapping[str, Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    objective: Objective,
    power: int,
) -> dict[str, Tensor]:
    """``Σ_n |∂ objective(f(x_n), y_n)/∂θ|^power`` with each sample's own gradient (``vmap`` over ``grad``).

    The general form of :func:`squared_gradient_sum` (EWC: the log-likelihood, ``power`` 2) and
    of :func:`mas_importance_sum` (MAS: the squared output norm, ``power`` 1).
    """

    def sample_objective(sample_params: dict[str, Tensor], args: tuple[Tensor, ...], y: Tensor) -> Tensor:
        outputs = functional_call(model, (sample_params, dict(others)), tuple(a.unsqueeze(0) for a in args))
        return objective(outputs, y.unsqueeze(0))

    per_sample = vmap(grad(sample_objective), in_dims=(None, 0, 0))(dict(params), as_arguments(inputs), targets)
    return {name: _power(g, power).sum(0) for name, g in per_sample.items()}


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
    return linear_gradient_power_sum(model, params, others, inputs, targets, likelihood_objective(likelihood), 2)


def linear_gradient_power_sum(
    model: nn.Module,
    params: Mapping[str, Tensor],
    others: Mapping[str, Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    objective: Objective,
    power: int,
) -> Optional[dict[str, Tensor]]:
    """``Σ_n |∂ objective_n/∂θ|^power`` in closed form for all-``nn.Linear`` networks, else ``None``.

    ``objective(outputs, targets)`` is summed over the batch, so the gradient at a layer's output
    is each sample's own ``δ_n``; ``|δ_n a_nᵀ|^p = |δ_n|^p |a_n|^pᵀ`` for ``p`` 1 and 2 alike.
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
    loss = objective(logits, targets)  # summed: per-sample gradients, unscaled
    output_grads = torch.autograd.grad(loss, [c[0][1] for c in calls])
    sums = {}
    for (layer, ((layer_input, _),)), delta in zip(seen.items(), output_grads):
        delta_p = _power(delta.detach(), power)
        for name, kind in _names_of(layer, layers):
            sums[name] = delta_p.T @ _power(layer_input.detach(), power) if kind == "weight" else delta_p.sum(0)
    return sums


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


def predicted_labels(logits: Tensor, likelihood: str = "categorical") -> Tensor:
    """The targets the model finds most likely at ``logits``: the "predicted" Fisher's labels.

    The class of the largest logit (categorical; what Hsu et al. 2018's code and FACIL's
    ``max_pred`` use); ``1`` where a logit is positive, else ``0`` (Bernoulli).

    Raises:
        ValueError: a Gaussian likelihood, whose most likely target is the output itself: its
            gradient, and so the Fisher, would be zero.
    """
    if likelihood == "categorical":
        return logits.detach().argmax(dim=-1)
    if likelihood == "bernoulli":
        return (logits.detach() > 0).to(logits.dtype)
    raise ValueError(
        f"predicted labels need a likelihood with a most likely label (categorical or bernoulli), got {likelihood!r}: "
        "a Gaussian's is the output itself, where the gradient and so the Fisher are zero"
    )


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
) -> Tensor:
    """The slot of each of the next ``batch_size`` stream items in a reservoir of ``memory_size`` slots.

    Item ``n`` of the stream (0-based, ``n = num_seen + k``) fills slot ``n`` while the memory is
    not full; afterwards it replaces slot ``j``, ``j`` uniform in ``[0, n]``, if ``j <
    memory_size``. Every item seen so far is then in memory with the same probability. When two
    items of one batch pick the same slot the later one wins, exactly as inserting one by one.

    Returns:
        A ``long`` tensor of ``batch_size`` slots: item ``k`` goes to slot ``slots[k]``, or
        nowhere when ``slots[k] == memory_size`` (not drawn, or overwritten by a later item of the
        batch). No slot below ``memory_size`` appears twice. The shape does not depend on the
        draws, so storing a batch is one indexed write into storage with a spare row at index
        ``memory_size`` that takes the items kept nowhere: no host-device synchronization.
    """
    stream_index = torch.arange(num_seen, num_seen + batch_size, device=device, dtype=torch.float64)
    uniform = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    draw = torch.floor(uniform * (stream_index + 1)).long()
    slots = torch.where(stream_index < memory_size, stream_index.long(), draw).clamp_(max=memory_size)
    # Keep the last item per slot: sort by slot (stable, so batch order is kept within a slot);
    # an item is kept where the next one in that order has another slot.
    ordered, order = torch.sort(slots, stable=True)
    last_of_run = torch.ones_like(ordered, dtype=torch.bool)
    last_of_run[:-1] = ordered[1:] != ordered[:-1]
    kept = torch.empty_like(last_of_run).scatter_(0, order, last_of_run)
    return torch.where(kept, slots, memory_size)


# --------------------------------------------------------------------------------------------
# Dark Experience Replay (Buzzega et al. 2020)
# --------------------------------------------------------------------------------------------


def logit_matching_loss(outputs: Tensor, stored_logits: Tensor) -> Tensor:
    """``mean((z − z_stored)²)`` over the batch and the output units: DER's memory term.

    ``z`` are the model's outputs on memory samples now, ``z_stored`` the logits it gave them when
    they were stored. The paper writes a squared norm over the units; this is its mean, as
    ``F.mse_loss`` in the authors' code takes it (``alpha`` absorbs the number of units). Computed
    in float32 (float64 stays float64): 16-bit outputs are cast up first, so the result is float32
    and differentiable in ``outputs``.

    Raises:
        ValueError: ``outputs`` and ``stored_logits`` of different shapes.
    """
    if outputs.shape != stored_logits.shape:
        raise ValueError(
            "outputs and stored_logits must have the same shape, got "
            f"{tuple(outputs.shape)} and {tuple(stored_logits.shape)}"
        )
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    return F.mse_loss(outputs.to(dtype), stored_logits.to(dtype))


# --------------------------------------------------------------------------------------------
# ER-ACE: asymmetric cross-entropy (Caccia et al. 2022)
# --------------------------------------------------------------------------------------------


def present_classes_mask(targets: Tensor, num_classes: int) -> Tensor:
    """A boolean ``(num_classes,)`` mask, ``True`` at the labels present in ``targets``.

    ER-ACE's incoming batch is scored by cross-entropy over these classes only. Built on the
    targets' device with one scatter (no ``unique().tolist()``, so no host-device sync). Labels
    must lie in ``[0, num_classes)``; they are not checked here, as that check would need a
    sync (``cross_entropy`` refuses them anyway).

    Raises:
        ValueError: ``num_classes`` below 1 or ``targets`` that are not integer labels.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class labels, got dtype {targets.dtype}")
    mask = torch.zeros(num_classes, dtype=torch.bool, device=targets.device)
    return mask.index_fill_(0, targets.reshape(-1).long(), True)


def masked_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits`` with the units where ``mask`` is ``False`` set to the dtype's lowest finite value.

    Their softmax is then 0 and their gradient 0, so cross-entropy over the result equals
    cross-entropy over the kept units alone. The lowest finite value rather than ``-inf``: a
    masked target or a row masked entirely gives a large finite loss, not ``inf`` or NaN.

    Args:
        logits: ``(N, C)`` outputs.
        mask: boolean, ``(C,)`` (broadcast over the batch) or ``(N, C)``; ``True`` keeps a unit.

    Raises:
        ValueError: a mask that is not boolean or does not broadcast to ``logits``' shape.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor, got dtype {mask.dtype}")
    if mask.dim() > logits.dim() or any(m not in (1, n) for m, n in zip(reversed(mask.shape), reversed(logits.shape))):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to logits of shape {tuple(logits.shape)}"
        )
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


# --------------------------------------------------------------------------------------------
# A-GEM (Chaudhry et al. 2019)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def agem_project_(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """``g ← g − (g·g_ref / g_ref·g_ref) g_ref`` in place when ``g·g_ref < 0``: A-GEM's projection.

    ``g`` and ``g_ref`` are the whole model's gradients, one tensor per parameter; the dot products
    run over all of them. ``g`` is unchanged when ``g·g_ref ≥ 0``, when ``g_ref = 0`` and when a
    dot product is not finite (an overflowed 16-bit step, which the gradient scaler skips).

    No host-device sync: the coefficient stays a 0-d tensor, chosen with ``torch.where``. Dot
    products and the update are computed in float32 (float64 stays float64); each gradient is
    written back in its own dtype.

    Args:
        grads: the gradients to project, in place.
        reference: the reference gradients, shaped like ``grads``.

    Returns:
        The 0-d coefficient ``c`` (``g ← g − c·g_ref``; 0 where nothing was projected), for logging.

    Raises:
        ValueError: no gradients, or ``grads`` and ``reference`` that do not match tensor for tensor.
    """
    grads, reference = list(grads), list(reference)
    _check_same_shapes(grads, reference)
    dtype = torch.promote_types(torch.promote_types(grads[0].dtype, reference[0].dtype), torch.float32)
    dot = _total_dot(grads, reference, dtype)
    reference_norm = _total_dot(reference, reference, dtype)
    coefficient = dot / reference_norm  # 0/0 = NaN for g_ref = 0: discarded by the where below
    projects = (dot < 0) & (reference_norm > 0) & torch.isfinite(coefficient)
    coefficient = torch.where(projects, coefficient, torch.zeros_like(coefficient))
    step = -coefficient
    for g, r in zip(grads, reference):
        g.addcmul_(r.to(dtype), step)  # r in float32: the product in float32, rounded once into g
    return coefficient


def _check_same_shapes(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> None:
    if not grads or len(grads) != len(reference):
        raise ValueError(
            "grads and reference must be non-empty lists of equal length, got "
            f"{len(grads)} and {len(reference)} tensors"
        )
    for i, (g, r) in enumerate(zip(grads, reference)):
        if g.shape != r.shape:
            raise ValueError(f"grads[{i}] and reference[{i}] differ in shape: {tuple(g.shape)} and {tuple(r.shape)}")


def _total_dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``Σ_i a_i·b_i`` over lists of tensors, as a 0-d tensor of ``dtype``."""
    return torch.stack([torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]).sum()


# --------------------------------------------------------------------------------------------
# GEM (Lopez-Paz & Ranzato 2017)
# --------------------------------------------------------------------------------------------

#: What GEM's authors add to the diagonal of ``G Gᵀ`` (their ``eps``); here only when needed.
GEM_DIAGONAL_EPS = 1e-3
_GRAM_CHUNK = 1 << 20  # columns of G per float64 copy: bounds the extra memory to K·8 MiB


def gem_dual(gram: Tensor, linear: Tensor) -> Tensor:
    """The exact ``v ≥ 0`` minimising ``½ vᵀMv + qᵀv``: GEM's dual quadratic program.

    ``M = G Gᵀ`` (``K × K``, positive semi-definite) and ``q = G g``, ``K`` the number of earlier
    tasks. Solved by Lawson and Hanson's active-set method for non-negative least squares in its
    Gram form (``min ‖Av − b‖²`` with ``AᵀA = M``, ``Aᵀb = −q``), which needs only ``M`` and ``q``:
    ``scipy.optimize.nnls`` would need ``A`` itself, ``P × K`` with ``P`` the number of parameters,
    copied from the device to the host every step. The iterate ``v ≥ 0`` always; at most ``3K``
    outer iterations (the bound of Lawson and Hanson's code), after which the last iterate is
    returned.

    A singular ``M`` (duplicate or dependent constraints) needs no regularization: in exact
    arithmetic the method only factorizes blocks of linearly independent constraints, and ``Gᵀv``, the projection, is unique
    even where ``v`` is not. Only if such a block is numerically singular in float64 (nearly
    parallel constraints) is ``GEM_DIAGONAL_EPS · max(1, max diag M)`` added to the diagonal, the
    authors' ``1e-3`` for gradients of norm up to 1, and the problem solved again.

    Args:
        gram: ``M``, ``(K, K)``.
        linear: ``q``, ``(K,)``.

    Returns:
        ``v``, float64, on the CPU (the solve runs there, in float64).

    Raises:
        ValueError: shapes that do not fit, values that are not finite, or a ``gram`` that is not
            positive semi-definite.
    """
    M = gram.detach().to("cpu", torch.float64)
    q = linear.detach().to("cpu", torch.float64)
    k = q.shape[0] if q.dim() == 1 else -1
    if k < 0 or M.shape != (k, k):
        raise ValueError(f"gram must be (K, K) and linear (K,), got {tuple(gram.shape)} and {tuple(linear.shape)}")
    if not (torch.isfinite(M).all() and torch.isfinite(q).all()):
        raise ValueError("gram and linear must be finite")
    v = _gram_nnls(M, q)
    if v is None:
        jitter = GEM_DIAGONAL_EPS * max(1.0, M.diagonal().max().item())
        v = _gram_nnls(M + jitter * torch.eye(k, dtype=torch.float64), q)
    if v is None:  # even with the diagonal added: M has a clearly negative eigenvalue
        smallest = torch.linalg.eigvalsh(M)[0].item()
        raise ValueError(f"gram must be positive semi-definite, got smallest eigenvalue {smallest:.6g}")
    return v


def _gram_nnls(M: Tensor, q: Tensor) -> Optional[Tensor]:
    """Lawson-Hanson on ``M``, ``q`` (float64, CPU); ``None`` if a passive block is singular."""
    k = q.shape[0]
    v = torch.zeros(k, dtype=torch.float64)
    passive = torch.zeros(k, dtype=torch.bool)
    for _ in range(3 * k):
        w = -(M @ v + q)  # the negative gradient; KKT: w ≤ 0 where v = 0, w = 0 where v > 0
        # the rounding error of w: below it, a positive w_j is noise (a duplicate constraint's)
        tolerance = 10 * k * torch.finfo(torch.float64).eps * (q.abs().max() + (M.abs() @ v.abs()).max())
        candidates = torch.where(passive, -torch.inf, w)
        j = int(candidates.argmax())
        if candidates[j] <= tolerance:
            break
        passive[j] = True
        v = _inner_loop(M, q, v, passive)
        if v is None:
            return None
    return v


def _inner_loop(M: Tensor, q: Tensor, v: Tensor, passive: Tensor) -> Optional[Tensor]:
    """Lawson-Hanson's inner loop: the passive set's unconstrained minimum, stepping back to keep
    ``v ≥ 0`` and releasing the variables that reach 0 (at least one per turn, so at most ``K``)."""
    while passive.any():
        s = _passive_solution(M, q, passive)
        if s is None:
            return None
        blocking = passive & (s <= 0)
        if not blocking.any():
            return s
        gap = v[blocking] - s[blocking]  # ≥ 0; 0 only for a variable at 0 whose s is 0: it stops at once
        ratios = torch.where(gap > 0, v[blocking] / gap, torch.zeros_like(gap))
        alpha = ratios.min()
        v = v + alpha * (s - v)
        reached = torch.zeros_like(passive)
        reached[blocking] = ratios == alpha
        passive &= ~reached & (v > 0)
        v = torch.where(passive, v, torch.zeros_like(v))
    return v


def _passive_solution(M: Tensor, q: Tensor, passive: Tensor) -> Optional[Tensor]:
    """``s`` with ``M_PP s_P = −q_P`` and ``s = 0`` off the passive set ``P``; ``None`` if ``M_PP``
    is singular."""
    index = passive.nonzero().squeeze(1)
    factor, info = torch.linalg.cholesky_ex(M[index][:, index])
    if info.item() != 0:
        return None
    s = torch.zeros_like(q)
    s[index] = torch.cholesky_solve(-q[index].unsqueeze(1), factor).squeeze(1)
    return s


def gem_project(grad: Tensor, constraints: Tensor, margin: float = 0.5) -> Tensor:
    """GEM's projection of ``grad`` onto the gradients that increase no earlier task's loss.

    With ``g = grad`` and ``G = constraints`` (one row per earlier task's reference gradient):
    ``g`` itself (the same tensor) if ``G g ≥ 0``; otherwise ``z = Gᵀv + g``, with ``v`` the
    solution of the dual ``min ½ vᵀ(GGᵀ)v + (Gg)ᵀv`` subject to ``v ≥ margin``.

    The margin follows the authors' code, which constrains ``v ≥ margin`` in the quadratic
    program; the paper (Sec. 3) instead adds ``γ ≥ 0`` to the solution ``v*`` of ``v ≥ 0``. The two
    agree at ``margin = 0``; only the code's keeps every constraint (its KKT conditions give
    ``G z = GGᵀv + Gg ≥ 0``), while the paper's adds ``γ GGᵀ1`` to ``G z``, negative where earlier
    tasks' gradients conflict with each other. Avalanche and Mammoth follow the authors' code.
    Solved as ``v = margin + u``, ``u ≥ 0`` the minimiser of ``½ uᵀMu + (q + margin·M1)ᵀu``
    (:func:`gem_dual`).

    One host-device sync, which the maths needs: the conflict test and the ``K × K`` solve run on
    the host. ``GGᵀ`` and ``G g`` are taken in float64 (immune to TF32 matmuls) in column chunks
    that bound the copy's memory; ``z`` is summed in float32 and returned in ``grad``'s dtype.

    Args:
        grad: the flattened gradient, ``(P,)``.
        constraints: ``G``, ``(K, P)``.
        margin: ``γ ≥ 0``; larger values bias the step towards improving earlier tasks.

    Raises:
        ValueError: shapes that do not fit, or a ``margin`` that is negative or not finite.
    """
    if grad.dim() != 1 or constraints.dim() != 2 or constraints.shape[1] != grad.shape[0]:
        raise ValueError(
            f"grad must be (P,) and constraints (K, P), got {tuple(grad.shape)} and {tuple(constraints.shape)}"
        )
    if not 0 <= margin < float("inf"):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    gram, dots = _gram_and_dots(constraints, grad)
    gram, dots = torch.cat([gram, dots.unsqueeze(1)], dim=1).cpu().split([gram.shape[1], 1], dim=1)  # one copy
    dots = dots.squeeze(1)
    if not (dots < 0).any() or not (torch.isfinite(gram).all() and torch.isfinite(dots).all()):
        return grad  # no conflict, or an overflowed 16-bit step that the gradient scaler skips
    v = margin + gem_dual(gram, dots + margin * gram.sum(1))
    dtype = torch.promote_types(torch.promote_types(grad.dtype, constraints.dtype), torch.float32)
    z = grad.to(dtype, copy=True)
    for row, weight in zip(constraints, v.tolist()):
        z.add_(row.to(dtype), alpha=weight)
    return z.to(grad.dtype)


def _gram_and_dots(constraints: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``G Gᵀ`` and ``G g`` in float64, on ``grad``'s device."""
    k = constraints.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=grad.device)
    dots = torch.zeros(k, dtype=torch.float64, device=grad.device)
    for start in range(0, grad.shape[0], _GRAM_CHUNK):
        block = constraints[:, start : start + _GRAM_CHUNK].to(torch.float64)
        gram.addmm_(block, block.T)
        dots.addmv_(block, grad[start : start + _GRAM_CHUNK].to(torch.float64))
    return gram, dots


# --------------------------------------------------------------------------------------------
# Exemplars and nearest-mean classification (iCaRL: Rebuffi et al. 2017)
# --------------------------------------------------------------------------------------------


def herding_order(features: Tensor, count: int) -> Tensor:
    """iCaRL's herding: rows of ``features`` chosen greedily so that the mean of the first ``k``
    stays closest to the mean of all rows.

    With ``μ`` the mean of the ``N`` rows and ``p_1 .. p_{k-1}`` the rows picked so far, pick ``k``
    is the unpicked row ``i`` minimizing ``‖μ − (Σ_{j<k} φ_{p_j} + φ_i) / k‖`` (the paper's
    Algorithm 4), computed as ``‖k·μ − Σ_{j<k} φ_{p_j} − φ_i‖`` (the same minimizer, without a
    division's rounding) in float64 over all rows at once: one tensor operation per pick, the loop
    runs over picks only. Ties go to the lowest row index. iCaRL normalizes features to unit L2
    norm first (``F.normalize(features, dim=1)``): the caller does.

    Args:
        features: ``(N, D)`` rows, one per candidate.
        count: how many to pick, ``>= 0``.

    Returns:
        The row indices of the first ``min(count, N)`` picks, in pick order (``long``).
    """
    _check_features(features)
    count = _check_count(count)
    rows = features.to(torch.float64)
    target = rows.mean(0)
    picks = min(count, rows.shape[0])
    order = torch.empty(picks, dtype=torch.long, device=rows.device)
    running = torch.zeros_like(target)
    picked = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    norms = rows.square().sum(1)
    for k in range(1, picks + 1):
        # ‖a − φ_i‖² = ‖a‖² − 2 a·φ_i + ‖φ_i‖² with a = k·μ − Σ picked: ‖a‖² is the same for every
        # row, so a matrix-vector product ranks them, with no (N, D) temporary per pick.
        distances = torch.addmv(norms, rows, k * target - running, alpha=-2.0).masked_fill_(picked, float("inf"))
        choice = torch.argmin(distances)  # the first minimum: the lowest index on ties
        order[k - 1] = choice
        picked[choice] = True
        running += rows[choice]
    return order


def closest_to_mean_order(features: Tensor, count: int) -> Tensor:
    """The ``min(count, N)`` rows of ``features`` nearest (Euclidean) to their mean, nearest
    first, ties by lowest index (float64 distances). The caller normalizes features first where
    wanted (iCaRL's ``F.normalize``).

    Args:
        features: ``(N, D)`` rows, one per candidate.
        count: how many to return, ``>= 0``.
    """
    _check_features(features)
    count = _check_count(count)
    rows = features.to(torch.float64)
    distances = (rows - rows.mean(0)).square().sum(1)
    return torch.sort(distances, stable=True).indices[:count]


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``features`` and per-class counts, to be summed across ranks before
    dividing (a class mean is then the same on every rank, whatever each rank's shard holds).

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integer class labels in ``[0, num_classes)``.
        num_classes: ``C``.

    Returns:
        ``(sums, counts)``: ``(C, D)`` in ``features``' dtype promoted to at least float32 (sums of
        16-bit features would lose their low bits), and ``(C,)`` ``long``.
    """
    _check_features(features)
    num_classes = _check_count(num_classes, "num_classes")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be (N,) integer class labels for features of shape {tuple(features.shape)}, got "
            f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got labels from {int(labels.min())} to {int(labels.max())}"
        )
    dtype = torch.promote_types(features.dtype, torch.float32)
    sums = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device)
    sums.index_add_(0, labels, features.to(dtype))
    counts = torch.bincount(labels, minlength=num_classes)
    return sums, counts


def nearest_mean_scores(features: Tensor, means: Tensor, seen: Optional[Tensor] = None) -> Tensor:
    """Nearest-mean-of-exemplars scores: ``scores[n, c] = −‖f_n − μ_c‖²``, so that the arg max over
    classes is the nearest class mean (iCaRL's classifier).

    The squared differences are summed directly (not as ``‖f‖² − 2 f·μ + ‖μ‖²``, which cancels
    badly for nearby points, nor as a square root squared again), in the promoted dtype of the two, at least float32. iCaRL normalizes both the
    features and the class means to unit L2 norm: the caller does.

    Args:
        features: ``(N, D)``.
        means: ``(C, D)`` class means.
        seen: ``(C,)`` bool, the classes that have a mean (exemplars); the others score ``−inf``,
            so that they are never predicted. ``None``: every class has one.

    Returns:
        ``(N, C)`` scores.
    """
    _check_features(features)
    if means.dim() != 2 or means.shape[1] != features.shape[1]:
        raise ValueError(
            f"means must be (C, D) with D = {features.shape[1]} as the features, got means of shape {tuple(means.shape)}"
        )
    if seen is not None and (seen.dtype != torch.bool or seen.shape != (means.shape[0],)):
        raise ValueError(
            f"seen must be a ({means.shape[0]},) bool tensor (one per mean), got shape {tuple(seen.shape)} and dtype {seen.dtype}"
        )
    dtype = torch.promote_types(torch.promote_types(features.dtype, means.dtype), torch.float32)
    features, means = features.to(dtype), means.to(dtype)
    # Rows in chunks, so that the (rows, C, D) differences stay within _SCORE_CHUNK elements.
    rows = max(1, _SCORE_CHUNK // max(1, means.numel()))
    scores = torch.cat(
        [-(chunk.unsqueeze(1) - means).square().sum(2) for chunk in features.split(rows)]
    ) if features.shape[0] else features.new_zeros(0, means.shape[0])
    if seen is not None:
        scores = scores.masked_fill(~seen.to(scores.device), float("-inf"))
    return scores


#: Most elements of the temporary differences in :func:`nearest_mean_scores` (64 MiB in float32).
_SCORE_CHUNK = 2**24


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        described = f"shape {tuple(features.shape)} and dtype {features.dtype}" if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be an (N, D) floating-point tensor, got {described}")


def _check_count(count: object, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name} must be an int >= 0, got {count!r}")
    return count


# --------------------------------------------------------------------------------------------
# iCaRL: sigmoid classification with distillation targets (Rebuffi et al. 2017)
# --------------------------------------------------------------------------------------------


def icarl_targets(
    targets: Tensor, num_units: int, old_logits: Optional[Tensor] = None, old_classes: Optional[Tensor] = None
) -> Tensor:
    """iCaRL's per-unit targets (Alg. 3): one-hot labels, and the previous network's sigmoid
    outputs on the units of the classes it learned.

    Args:
        targets: ``(N,)`` class labels in ``[0, num_units)``.
        num_units: ``C``, the model's output units.
        old_logits: ``(N, C)`` outputs of the previous network on the same inputs, or ``None``
            (the first task: one-hot targets everywhere).
        old_classes: boolean ``(C,)`` mask of the classes the previous network learned; required
            with ``old_logits``.

    Returns:
        ``(N, C)`` float32 (float64 for float64 logits) targets in ``[0, 1]``, without gradient.

    Raises:
        ValueError: ``old_logits`` without ``old_classes``, or shapes that do not fit.
    """
    dtype = torch.float32 if old_logits is None else torch.promote_types(old_logits.dtype, torch.float32)
    one_hot = F.one_hot(targets.long(), num_units).to(dtype)
    if old_logits is None:
        return one_hot
    if old_classes is None:
        raise ValueError("old_logits were given without old_classes, the mask of the units they are targets for")
    if old_logits.shape != one_hot.shape or old_classes.dtype != torch.bool or old_classes.shape != (num_units,):
        raise ValueError(
            f"old_logits must be (N, C) = {tuple(one_hot.shape)} and old_classes a boolean ({num_units},) mask, got "
            f"{tuple(old_logits.shape)} and {old_classes.dtype} {tuple(old_classes.shape)}"
        )
    distilled = torch.sigmoid(old_logits.detach().to(dtype))
    return torch.where(old_classes.to(one_hot.device), distilled.to(one_hot.device), one_hot)


def icarl_loss(
    logits: Tensor, targets: Tensor, old_logits: Optional[Tensor] = None, old_classes: Optional[Tensor] = None
) -> Tensor:
    """iCaRL's loss: binary cross-entropy of every output unit's sigmoid against
    :func:`icarl_targets`, the mean over samples and units.

    ``−mean_{i,y} [q_iy log σ(z_iy) + (1 − q_iy) log(1 − σ(z_iy))]`` with ``q_iy`` the one-hot
    label for a class the previous network did not learn, and ``σ(z_old,iy)`` (that network's
    output, a soft target) for one it did. The paper writes a sum over samples and units; its
    code (and Avalanche's and FACIL's) takes the mean, which only rescales the learning rate.
    Computed from logits (``binary_cross_entropy_with_logits``: stable for large ``|z|``) in
    float32 at least: 16-bit logits are cast up first.

    Raises:
        ValueError: ``logits`` not ``(N, C)``, ``targets`` not ``(N,)``, or as :func:`icarl_targets`.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, C) and targets (N,) class labels, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    soft = icarl_targets(targets, logits.shape[1], old_logits, old_classes).to(dtype)
    return F.binary_cross_entropy_with_logits(logits.to(dtype), soft)


# --------------------------------------------------------------------------------------------
# MAS: Memory Aware Synapses (Aljundi et al. 2018)
# --------------------------------------------------------------------------------------------


def squared_output_norm(outputs: Tensor, targets: Optional[Tensor] = None) -> Tensor:
    """``Σ_n ‖f(x_n)‖²₂`` over a batch of outputs ``(N, ...)``: MAS's label-free objective.

    Summed over the samples, so that each sample's gradient is its own (``targets`` is ignored:
    MAS needs no labels; it is there to fit :data:`Objective`). 16-bit outputs are squared in float32.
    """
    return outputs.to(torch.promote_types(outputs.dtype, torch.float32)).square().sum()


def mas_importance_sum(
    model: nn.Module, params: Mapping[str, Tensor], others: Mapping[str, Tensor], inputs: ModelInputs
) -> dict[str, Tensor]:
    """``Σ_n |∂‖f(x_n)‖²₂/∂θ|`` over the samples of a batch, per parameter; MAS's ``Ω`` is its mean.

    Each sample's gradient is its own (the paper's Eq. 4 takes the absolute value per sample,
    before averaging): in closed form for networks of ``nn.Linear`` layers
    (``Σ_n |δ_n a_nᵀ| = |δ|ᵀ|a|``, see :func:`linear_squared_gradient_sum`), else with ``vmap``.

    Args:
        model: evaluated with ``functional_call``; its own tensors are not used for ``params``.
        params: the tensors to differentiate, by name.
        others: every other parameter and buffer the forward needs, by name.
        inputs: a batch ``(N, ...)``, or a tuple of the model's batched arguments.
    """
    arguments = as_arguments(inputs)
    no_labels = torch.zeros(arguments[0].shape[0], device=arguments[0].device)
    sums = linear_gradient_power_sum(model, params, others, arguments, no_labels, squared_output_norm, 1)
    if sums is None:
        sums = per_sample_gradient_power_sum(model, params, others, arguments, no_labels, squared_output_norm, 1)
    return sums


# --------------------------------------------------------------------------------------------
# RWalk: Riemannian Walk (Chaudhry et al. 2018)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def rwalk_fisher_update_(fisher: Sequence[Tensor], grads: Sequence[Optional[Tensor]], alpha: float) -> None:
    """``F ← α·g² + (1 − α)·F`` in place: RWalk's online Fisher (EWC++, the paper's Eq. 6), one step.

    ``g`` is the step's gradient of the unregularized loss (``None``: no gradient, ``F`` kept).
    Entries where ``g`` is not finite keep their ``F``: a gradient scaler skips the step whose
    gradient overflowed, and ``inf²`` would stay in ``F`` for good. ``g`` is squared in ``F``'s
    dtype (float32 for a 16-bit model).
    """
    for f, g in zip(fisher, grads):
        if g is None:
            continue
        square = g.to(f.dtype).square()
        f.lerp_(torch.where(torch.isfinite(square), square, f), alpha)


@torch.no_grad()
def rwalk_interval_score(omega: Tensor, change: Tensor, fisher: Tensor, epsilon: float) -> Tensor:
    """``relu(ω / (½·F·Δ² + ε))``: RWalk's score of one interval of training (the paper's Eq. 7).

    ``ω = −Σ g·Δθ`` is the interval's path integral (the first-order loss change each parameter
    caused), ``Δ`` the parameter's change over the interval, and ``½·F·Δ²`` the KL divergence
    between the model's output distributions at the interval's ends (second order, diagonal
    Fisher): the loss decrease per unit of distance moved in distribution space. Negative scores
    (the parameter went uphill) count as zero.
    """
    return torch.relu(omega / (0.5 * fisher * change.square() + epsilon))


def rwalk_average_scores(previous: Optional[Tensor], new: Tensor) -> Tensor:
    """``½·(s_previous + s_new)``: RWalk's score after a task (``s_new`` alone after the first)."""
    return new.clone() if previous is None else 0.5 * (previous + new)


@torch.no_grad()
def rwalk_weights(fisher: Mapping[str, Tensor], scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``F / max F + s / max s`` per parameter: RWalk's penalty weights, both terms scaled into ``[0, 1]``.

    The maxima run over all parameters, so that neither term dominates the other whatever its
    scale (the Fisher of squared mini-batch gradients and the scores differ by orders of
    magnitude). A term that is zero everywhere stays zero.
    """
    def scaled(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        peak = torch.stack([v.max() for v in values.values()]).max()
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        return {name: v / peak for name, v in values.items()}

    fisher, scores = scaled(fisher), scaled(scores)
    return {name: fisher[name] + scores[name] for name in fisher}


# --------------------------------------------------------------------------------------------
# BiC: bias correction (Wu et al. 2019)
# --------------------------------------------------------------------------------------------


def bic_loss(
    logits: Tensor,
    targets: Tensor,
    classes: Tensor,
    old_logits: Optional[Tensor] = None,
    old_classes: Optional[Tensor] = None,
    temperature: float = 2.0,
) -> Tensor:
    """BiC's training loss: ``λ·L_d + (1 − λ)·L_c`` with ``λ = n_old / (n_old + n_new)``.

    ``L_c`` is the cross-entropy of the labels over the softmax of the ``classes`` units (the
    classes learned so far, old and new: the paper's network has no others); ``L_d`` the soft
    cross-entropy ``−Σ_k π̂_k log π_k`` over the old classes, ``π̂ = softmax(ẑ_old / T)`` from
    the previous network and ``π = softmax(z_old / T)`` from the current one (the paper's Eq. 1,
    without a ``T²`` factor), both means over the batch. Without ``old_logits`` (the first task)
    the loss is ``L_c`` alone. Computed in float32 at least.

    Args:
        logits: ``(N, C)`` outputs of the network being trained (bias-corrected where it applies).
        targets: ``(N,)`` class labels, each in ``classes``.
        classes: boolean ``(C,)`` mask of the classes learned so far (``n_old + n_new`` of them).
        old_logits: ``(N, C)`` outputs of the previous network on the same inputs, or ``None``.
        old_classes: boolean ``(C,)`` mask of the classes the previous network learned
            (``n_old``, inside ``classes``); required with ``old_logits``.
        temperature: ``T > 0``, the distillation's temperature (the paper's 2).

    Raises:
        ValueError: shapes that do not fit, or ``old_logits`` without ``old_classes``.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or classes.shape != logits.shape[1:] or classes.dtype != torch.bool:
        raise ValueError(
            f"logits must be (N, C), targets (N,) class labels and classes a boolean (C,) mask, got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)} and {classes.dtype} {tuple(classes.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    masked = z.masked_fill(~classes.to(z.device), float("-inf"))
    classification = F.cross_entropy(masked, targets.to(z.device).long())
    if old_logits is None:
        return classification
    if old_classes is None or old_logits.shape != logits.shape or old_classes.shape != classes.shape or old_classes.dtype != torch.bool:
        raise ValueError(
            f"old_logits must be (N, C) = {tuple(logits.shape)} with old_classes a boolean ({classes.shape[0]},) mask, got "
            f"{tuple(old_logits.shape)} and {None if old_classes is None else tuple(old_classes.shape)}"
        )
    # Everything stays on the device (no read of the class counts, no boolean selection, whose
    # size would be read): the units outside the old classes are masked, so their softmax is 0.
    old = old_classes.to(z.device)
    num_old, num_all = old.sum(), (classes.to(z.device) | old).sum()
    teacher = F.softmax(masked_logits(old_logits.detach().to(dtype), old) / temperature, dim=1)
    distillation = -(teacher * F.log_softmax(masked_logits(z, old) / temperature, dim=1)).sum(1).mean()
    share = num_old.to(dtype) / num_all.clamp(min=1).to(dtype)  # λ: the old classes' share of those learned
    return torch.where(num_old > 0, share * distillation + (1 - share) * classification, classification)


def bias_corrected(logits: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale · z + shift`` per output unit: BiC's bias layers (``scale`` 1 and ``shift`` 0 on
    the units without a correction), in the logits' dtype. ``scale``/``shift`` are ``(C,)``."""
    return logits * scale.to(logits.device, logits.dtype) + shift.to(logits.device, logits.dtype)


#: Most Newton steps :func:`fit_bias_correction` takes (it converges in far fewer on held-out logits).
BIAS_FIT_STEPS = 100


def fit_bias_correction(logits: Tensor, targets: Tensor, new_classes: Tensor, l2: float = 0.0) -> tuple[float, float]:
    """BiC's stage 2: the ``(α, β)`` minimizing the mean cross-entropy of ``targets`` over the
    logits with ``α·z + β`` on the ``new_classes`` units (the others as they are), plus
    ``l2/2 · ((α − 1)² + β²)``.

    The loss is convex in ``(α, β)`` (a log-sum-exp of affine functions, less an affine one), so
    a damped Newton method in float64 from ``(1, 0)`` finds its minimum exactly and
    deterministically (the paper runs SGD on the two scalars; the minimum is the same). Without
    ``l2`` a held-out set that the correction can separate perfectly has no finite minimum: the
    steps stop after :data:`BIAS_FIT_STEPS`; ``l2 > 0`` makes the minimum unique and finite.

    Args:
        logits: ``(N, C)`` cached logits of the held-out samples (the network frozen), restricted
            to the classes learned so far (or ``−inf`` elsewhere).
        targets: ``(N,)`` their class labels.
        new_classes: boolean ``(C,)`` mask of the units corrected.
        l2: ``>= 0``, the pull towards no correction.

    Returns:
        ``(α, β)`` as floats; ``(1.0, 0.0)`` for no samples.

    Raises:
        ValueError: shapes that do not fit, or a negative ``l2``.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or new_classes.shape != logits.shape[1:] or new_classes.dtype != torch.bool:
        raise ValueError(
            f"logits must be (N, C), targets (N,) class labels and new_classes a boolean (C,) mask, got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)} and {new_classes.dtype} {tuple(new_classes.shape)}"
        )
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    if logits.shape[0] == 0:
        return 1.0, 0.0
    z, labels, new = logits.detach().double(), targets.long().to(logits.device), new_classes.to(logits.device)

    def loss(theta: Tensor) -> Tensor:
        corrected = torch.where(new, theta[0] * z + theta[1], z)
        penalty = 0.5 * l2 * ((theta[0] - 1) ** 2 + theta[1] ** 2)
        return F.cross_entropy(corrected, labels) + penalty

    theta = torch.tensor([1.0, 0.0], dtype=torch.float64, device=z.device)
    value = loss(theta)
    for _ in range(BIAS_FIT_STEPS):
        gradient = grad(loss)(theta)
        if float(gradient.abs().max()) < 1e-12:
            break
        hessian = torch.func.hessian(loss)(theta) + 1e-12 * torch.eye(2, dtype=z.dtype, device=z.device)
        step = torch.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-10:  # backtracking: the full Newton step, halved until the loss decreases
            candidate = theta - size * step
            candidate_value = loss(candidate)
            if bool(candidate_value <= value):
                break
            size /= 2
        else:
            break
        if bool(candidate_value == value) and torch.equal(candidate, theta):
            break
        theta, value = candidate, candidate_value
    return float(theta[0]), float(theta[1])
