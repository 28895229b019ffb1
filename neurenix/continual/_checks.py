"""Argument checks shared by the methods: each error names the argument and the value received."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Union

import torch
from torch import nn


def check_model(model: object) -> nn.Module:
    if isinstance(model, torch.Tensor):  # its repr would print every value
        raise TypeError(
            f"model must be a torch.nn.Module, got a {type(model).__name__} of shape {tuple(model.shape)}: "
            "pass the module that holds it (the model, or a layer of it)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    return model


def check_real(
    name: str,
    value: object,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    strict_minimum: bool = False,
) -> float:
    """A finite real number in ``[minimum, maximum]`` (``(minimum, ...`` when ``strict_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value < minimum or (strict_minimum and value == minimum)):
        bound = f"> {minimum}" if strict_minimum else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer (a NumPy one too, not a bool) ``>= minimum``, returned as a Python ``int``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_task_id(task_id: object) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {type(task_id).__name__}: {task_id!r}")
    return task_id


def check_device(device: Union[None, str, torch.device]) -> Optional[torch.device]:
    if device is None:
        return None
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device must name a torch device, got {device!r}: {error}") from None
    if isinstance(device, torch.device):
        return device
    raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}: {device!r}")


def check_choice(name: str, value: object, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def check_batch(inputs: object, targets: object) -> None:
    """``inputs`` and ``targets`` are tensors with the same (non-zero) number of samples."""
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension, got a 0-dimensional tensor")
    if inputs.shape[0] != targets.shape[0]:  # type: ignore[union-attr]
        raise ValueError(
            f"inputs and targets must hold the same number of samples, got inputs with "
            f"{inputs.shape[0]} (shape {tuple(inputs.shape)}) and targets with "  # type: ignore[union-attr]
            f"{targets.shape[0]} (shape {tuple(targets.shape)})"  # type: ignore[union-attr]
        )
    if inputs.shape[0] == 0:  # type: ignore[union-attr]
        raise ValueError("inputs and targets must hold at least one sample, got an empty batch")


def check_finite_samples(name: str, batch: torch.Tensor) -> None:
    """Refuse a batch (samples along dim 0) holding NaN or infinite values; integer tensors pass.

    One sum and one host synchronisation in the common case: for data that is kept (a replay
    memory), not for every training step. A NaN or an infinity anywhere makes the sum non-finite;
    only then (or when finite values overflow it) is each sample checked.
    """
    if not (batch.is_floating_point() or batch.is_complex()):
        return
    if bool(torch.isfinite(batch.sum())):
        return
    finite = torch.isfinite(batch.reshape(batch.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite).squeeze(1)
    raise ValueError(
        f"{name} must hold finite values, got NaN or infinity in {bad.numel()} of {batch.shape[0]} "
        f"samples (the first: sample {int(bad[0])})"
    )


def reads_cost_nothing(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host is free: a CPU tensor. On an accelerator a
    read makes the host wait for every queued kernel (a synchronization), so checks that would
    read are kept on the device instead (:func:`any_non_finite`)."""
    return tensor.device.type == "cpu"


def any_non_finite(*batches: torch.Tensor) -> torch.Tensor:
    """Whether any of the floating-point ``batches`` holds NaN or an infinity: a 0-d bool tensor on
    the first batch's device, computed there without reading anything on the host."""
    flag = torch.zeros((), dtype=torch.bool, device=batches[0].device)
    for batch in batches:
        if batch.is_floating_point() or batch.is_complex():
            flag = flag | ~torch.isfinite(batch).all().to(flag.device)
    return flag
