"""Statistics of per-sample gradients over a task's data, at the task's end: EWC's Fisher, MAS's importance.

Both are the mean over up to ``count`` samples of the task of ``|∂ objective_n/∂θ|^p`` (EWC: the
squared gradient of the log-likelihood, ``p = 2``; MAS: the absolute gradient of the squared
output norm, ``p = 1``). What they share lives here, once: which samples (a random subset of a
map-style dataset, split between DDP ranks), the model in eval mode with PyTorch's global
generator untouched, the per-sample gradients (closed form for ``nn.Linear`` networks, else
``vmap`` in memory-bounded chunks), float32 sums for 16-bit models, sums and counts all-reduced
across ranks before dividing, and refusing NaN inputs and non-finite results on every rank alike.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from neurenix.continual import functional as CF
from neurenix.continual.base import eagerly, evaluation_mode, global_generator_kept, model_arguments, requires_task_ids, uncompiled
from neurenix.continual.callback import split_batch
from neurenix.continual.distributed import broadcast_, rank_and_world_size, sum_across_ranks_
from neurenix.continual.quadratic import accumulation_dtype

__all__ = ["CHUNK_ELEMENTS", "PerSampleGradients", "readable_task_batch", "task_gradient_mean", "task_samples"]

#: Per-sample gradients of one chunk take ``chunk × parameters`` floats; this many elements
#: (128 MiB in float32) bounds that memory whatever the model's size.
CHUNK_ELEMENTS = 2**25

#: ``objective(outputs, targets)``: a batch's objective, summed over its samples.
Objective = Callable[[Tensor, Tensor], Tensor]
#: ``batch_sums(others, inputs, targets)``: a batch's per-parameter sums and its number of samples.
BatchSums = Callable[[dict[str, Tensor], tuple[Tensor, ...], Tensor], tuple[dict[str, Tensor], int]]


class PerSampleGradients:
    """``Σ_n |∂ objective_n/∂θ|^power`` over batches, at parameters ``at``.

    In closed form while the network turns out to be all ``nn.Linear``
    (:func:`~neurenix.continual.functional.linear_squared_gradient_sum`'s identity), else with
    ``vmap`` over per-sample gradients in chunks of at most :data:`CHUNK_ELEMENTS` floats.
    A compiled model is evaluated eagerly, through the module it wraps (see :func:`task_gradient_mean`).
    """

    def __init__(self, model: torch.nn.Module, at: dict[str, Tensor], power: int) -> None:
        self.model, self.at, self.power = uncompiled(model), at, power
        self.closed_form = True  # until the network turns out not to be all nn.Linear

    def sums(self, others: dict[str, Tensor], inputs: tuple[Tensor, ...], targets: Tensor, objective: Objective) -> dict[str, Tensor]:
        args = (self.model, self.at, others, inputs, targets, objective, self.power)
        result = CF.linear_gradient_power_sum(*args) if self.closed_form else None
        if result is None:
            self.closed_form = False
            result = self._vmapped(*args)
        return result

    @staticmethod
    def _vmapped(model, at, others, inputs, targets, objective, power) -> dict[str, Tensor]:
        numel = sum(a.numel() for a in at.values())
        chunk = max(1, CHUNK_ELEMENTS // max(numel, 1))
        total: Optional[dict[str, Tensor]] = None
        for start in range(0, targets.shape[0], chunk):
            part_inputs = tuple(a[start : start + chunk] for a in inputs)
            part = CF.per_sample_gradient_power_sum(model, at, others, part_inputs, targets[start : start + chunk], objective, power)
            total = part if total is None else {name: total[name] + g for name, g in part.items()}
        assert total is not None  # inputs is never empty here
        return total


def task_gradient_mean(
    method: Any,
    at: dict[str, Tensor],
    data: Any,
    count: int,
    generator: torch.Generator,
    batch_sums: BatchSums,
    *,
    buffers: Optional[dict[str, Tensor]] = None,
    task_id: Optional[int] = None,
    statistic: str = "Fisher",
    in_parameter_dtype: bool = True,
) -> tuple[dict[str, Tensor], int]:
    """The mean of ``batch_sums`` over up to ``count`` samples of ``data``, and the number of samples.

    The sums are kept in at least float32; the mean is returned in each parameter's dtype, or
    with ``in_parameter_dtype=False`` in the sums' (float32 for a 16-bit model).

    ``method`` (a :class:`~neurenix.continual.base.ContinualMethod`) gives the model, the device
    and the input conversion of the fit's precision; ``at`` the parameters the statistic is taken
    at (and ``buffers`` the model's buffers, default its own). ``generator``, the same on every rank
    after a broadcast, draws the subset. Samples whose inputs hold NaN or infinity are counted on
    the device and summed across ranks with the sums, so that every rank refuses them together (a
    rank raising alone would leave the others waiting in the all-reduce).

    Raises:
        ValueError: no samples, or inputs that are not finite (``statistic`` names what for).
        FloatingPointError: a statistic that is not finite.
    """
    # Eager by design, through the module itself (never a torch.compile wrapper, whose parameter
    # names differ from trainable_parameters'): the statistic runs once per task, through torch.func
    # (functional_call, vmap of grad) or the closed form for nn.Linear networks; compiled, each
    # task's chunk sizes and transforms would cost compilations (tens of seconds with inductor)
    # for a pass that takes milliseconds eagerly.
    owner, model, device = type(method).__name__, uncompiled(method.model), method.device
    others = {n: p.detach() for n, p in model.named_parameters() if n not in at}
    others.update(dict(model.named_buffers()) if buffers is None else buffers)
    sums = {name: torch.zeros_like(a, dtype=accumulation_dtype(a.dtype)) for name, a in at.items()}
    samples = 0
    not_finite = torch.zeros(1, dtype=torch.float64, device=device)
    generator.set_state(broadcast_(generator.get_state()))  # every rank draws one subset...
    with evaluation_mode(model), global_generator_kept(), eagerly():
        for inputs, targets in task_samples(data, count, generator, model):  # ...its share of it
            inputs, targets = method._convert_inputs(tuple(a.to(device) for a in inputs)), targets.to(device)
            not_finite += _samples_not_finite(inputs)
            batch, taken = batch_sums(others, inputs, targets)
            torch._foreach_add_(list(sums.values()), [batch[name] for name in sums])
            samples += taken
    counts = torch.tensor([float(samples)], dtype=torch.float64, device=device)
    sum_across_ranks_([*sums.values(), counts, not_finite])  # sums and counts first, then divide
    samples = int(counts.item())
    if samples == 0:
        raise ValueError(f"{owner} cannot estimate the {statistic}: the task's data yielded no samples")
    if bool(not_finite > 0):
        whose = "the" if task_id is None else f"task {task_id}'s"
        raise ValueError(
            f"dataloader must yield finite inputs, got NaN or infinity in {int(not_finite.item())} of the "
            f"{samples} samples drawn for {whose} {statistic}: {owner} would consolidate a NaN {statistic}"
        )
    mean = {name: (s / samples).to(at[name].dtype if in_parameter_dtype else s.dtype) for name, s in sums.items()}
    _check_finite(mean, owner, statistic)
    return mean, samples


def readable_task_batch(method: Any, batch: Any, statistic: str) -> Tensor:
    """At a fit's first batch, whether the task's end can read the fit's batches for its ``statistic``; their targets.

    Raises:
        TypeError: batches that are not ``(inputs, targets[, task_ids])`` tuples of tensors.
        ValueError: a multi-head model with batches that carry no task ids.
    """
    owner, task = type(method).__name__, method.active_task
    try:
        inputs, targets, task_ids = split_batch(batch)
    except TypeError as error:
        raise TypeError(
            f"{owner} computes task {task}'s {statistic} from the fit's training batches when the task "
            f"ends, and cannot read them: {error}. Give batches as such tuples, or the {statistic}'s data with "
            f"{owner.lower()}.register_task({task}, dataloader) before the fit"
        ) from None
    if task_ids is None and requires_task_ids(method.model):
        raise ValueError(
            f"{owner}'s model ({type(method.model).__name__}) needs task ids (forward(inputs, task_ids): a multi-head "
            f"model), but the training batches are (inputs, targets) pairs: the {statistic} at the task's end could "
            "not call it. Give batches of (inputs, targets, task_ids) (split_benchmark(..., scenario='task') "
            "builds them)"
        )
    return targets


def _check_finite(values: dict[str, Tensor], owner: str, statistic: str) -> None:
    finite = torch.stack([torch.isfinite(v).all() for v in values.values()])
    if not bool(finite.all()):
        bad = [name for name, ok in zip(values, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"{owner}'s {statistic} holds NaN or infinite values for parameters {bad}: the model's outputs "
            "or gradients on the task's data are not finite"
        )


def _samples_not_finite(inputs: tuple[Tensor, ...]) -> Tensor:
    """How many samples hold NaN or infinity in any floating-point input (a device tensor: no sync)."""
    bad = torch.zeros(inputs[0].shape[0], dtype=torch.bool, device=inputs[0].device)
    for tensor in inputs:
        if tensor.is_floating_point() or tensor.is_complex():
            bad |= ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    return bad.sum()


def task_samples(
    data: Any, count: int, generator: torch.Generator, model: torch.nn.Module
) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """This rank's share of up to ``count`` samples of a task, in batches of
    ``((inputs[, task_ids]), targets)``: the model's arguments (task ids too where batches carry
    them and ``model`` takes them) and the labels.

    ``data`` may be a DataLoader over a map-style dataset (a uniform random subset, drawn with
    ``generator`` and batched with the loader's ``collate_fn``), an ``(inputs, targets)`` pair of
    tensors (a random subset likewise), or any iterable of batches (the first samples it yields).
    Under DDP the random subset is split between the ranks (``generator`` is the same on all);
    an iterable, already sharded by its sampler, gives each rank its quota of ``count``.
    """
    rank, world_size = rank_and_world_size()
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        inputs, targets = data
        chosen = torch.randperm(inputs.shape[0], generator=generator)[:count][rank::world_size]
        yield (inputs[chosen.to(inputs.device)],), targets[chosen.to(targets.device)]
        return
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and hasattr(data.dataset, "__len__"):
        chosen = torch.randperm(len(data.dataset), generator=generator)[:count][rank::world_size].tolist()
        data = DataLoader(data.dataset, batch_size=data.batch_size or 256, sampler=chosen, collate_fn=data.collate_fn)
    else:
        count = count // world_size + (rank < count % world_size)
    taken = 0
    for batch in data:
        if taken >= count:
            return
        inputs, targets, task_ids = split_batch(batch)
        arguments = model_arguments(model, inputs, task_ids)
        wanted = count - taken
        taken += min(wanted, targets.shape[0])
        yield tuple(a[:wanted] for a in arguments), targets[:wanted]
