"""What EWC, L2 and SI share: a quadratic pull of the parameters towards an anchor.

Every such penalty is written ``scale/2 · Σ W · (θ − θ̄)² + scale · c`` with one anchor ``θ̄`` and
one weight ``W`` per parameter (``W = 1`` for L2): EWC's sum of per-task penalties folds into this
form exactly (see :meth:`EWC._rebuild_penalty`), so a training step costs the same two
element-wise kernels per parameter whatever the number of tasks
(:func:`~neurenix.continual.functional.add_quadratic_penalty_grad_`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual.base import uncompiled
from neurenix.continual.callback import ContinualCallback

__all__ = ["QuadraticPenaltyMethod"]


def _to(tensors: Optional[dict[str, Tensor]], device: torch.device) -> Optional[dict[str, Tensor]]:
    if tensors is None:
        return None
    return {name: t.to(device) for name, t in tensors.items()}


def _pick(items: list, indices: list[int]) -> list:
    return [items[i] for i in indices]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which sums of many terms of ``dtype`` are kept: at least float32 (in a 16-bit
    float, a sum stops taking up terms much smaller than itself)."""
    return torch.promote_types(dtype, torch.float32)


def snapshot(params: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Detached copies of ``params`` on ``device``."""
    return {name: p.detach().to(device, copy=True) for name, p in params.items()}


class QuadraticPenaltyMethod(ContinualCallback):
    """A method whose penalty is ``scale/2 · Σ W · (θ − θ̄)² + scale · c`` (see module doc)."""

    #: Used in messages ("EWC penalty ...").
    penalty_name = "penalty"

    def __init__(self, model: Any, device: Any = None) -> None:
        super().__init__(model, device)
        self._anchor: dict[str, Tensor] = {}
        self._weight: Optional[dict[str, Tensor]] = None
        self._constant = 0.0
        # The same state as lists in the order of the model's parameters, made once per
        # _set_penalty so that a training step builds none.
        self._penalized: list[torch.nn.Parameter] = []
        self._anchors: list[Tensor] = []
        self._weights: Optional[list[Tensor]] = None
        self._workspace: list[Tensor] = []

    def _penalty_scale(self) -> float:
        raise NotImplementedError

    # ---------------------------------------------------------------------------- penalty state
    def _set_penalty(self, anchor: dict[str, Tensor], weight: Optional[dict[str, Tensor]], constant: float) -> None:
        """Install ``θ̄``, ``W`` and ``c`` and bind them to the model's parameters."""
        self._anchor = anchor
        self._weight = weight
        self._constant = float(constant)
        self._bind_parameters()

    def _bind_parameters(self) -> None:
        params = dict(uncompiled(self.model).named_parameters())
        missing = [name for name in self._anchor if name not in params]
        if missing:
            raise ValueError(
                f"{type(self).__name__} holds state for parameters the model no longer has: {missing}"
            )
        self._penalized = [params[name] for name in self._anchor]
        self._anchors = list(self._anchor.values())
        self._weights = None if self._weight is None else [self._weight[name] for name in self._anchor]
        self._workspace = [torch.empty_like(a) for a in self._anchors]

    @property
    def has_penalty(self) -> bool:
        return bool(self._anchor)

    def penalty(self) -> Tensor:
        """The penalty's value, differentiable in the model's parameters (0 before any task)."""
        if not self._anchor:
            return torch.zeros((), device=self.device)
        scale = self._penalty_scale()
        value = CF.quadratic_penalty(self._penalized, self._anchors, self._weights, scale)
        value = value + scale * self._constant
        if not torch.isfinite(value):
            raise FloatingPointError(f"{type(self).__name__} {self.penalty_name} is {value.item()}: {self._first_non_finite()}")
        return value

    def _first_non_finite(self) -> str:
        weights = self._weight or {}
        for (name, anchor), p in zip(self._anchor.items(), self._penalized):
            for what, tensor in (("parameter", p), ("anchor", anchor), ("weight", weights.get(name))):
                if tensor is not None and not bool(torch.isfinite(tensor).all()):
                    return f"the {what} of {name!r} holds NaN or infinite values"
        return "the terms overflow in float32 (importance or weights too large)"

    @override
    def add_penalty_gradients(self) -> None:
        if not self._anchor:
            return
        params, anchors, weights, workspace = self._penalized, self._anchors, self._weights, self._workspace
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            if all(g is None for g in grads):  # no backward this step: nothing to add to
                return
            # Parameters this step's loss did not reach still feel the penalty, as they would if
            # it were part of the loss; frozen ones (requires_grad=False) are left alone.
            keep = [i for i, p in enumerate(params) if p.requires_grad]
            params, anchors, workspace = _pick(params, keep), _pick(anchors, keep), _pick(workspace, keep)
            weights = None if weights is None else _pick(weights, keep)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
        CF.add_quadratic_penalty_grad_(grads, params, anchors, weights, self._penalty_scale(), workspace)

    # ---------------------------------------------------------------------------- device & state
    @override
    def prepare_for_device(self) -> None:
        device = self.device
        if self._anchor and next(iter(self._anchor.values())).device != device:
            self._move_state(device)

    def _move_state(self, device: torch.device) -> None:
        """Move every state tensor to ``device`` (subclasses extend)."""
        self._set_penalty(_to(self._anchor, device) or {}, _to(self._weight, device), self._constant)
