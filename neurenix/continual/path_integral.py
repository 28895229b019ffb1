"""SI's path integral over a stretch of training, shared by Synaptic Intelligence and RWalk.

``ω = −Σ g·Δθ`` over the optimizer steps since ``θ_start``, ``g`` each step's gradient of the
unregularized loss and ``Δθ`` the step's actual parameter change. A step's change is known only
after the optimizer has taken it, so each observed step stays *pending* (its gradient and its
parameters before the step) until the next observation, or :meth:`PathIntegral.flush`, closes it.
SI runs one stretch per task; RWalk restarts a stretch every few steps (its score intervals).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from neurenix.continual import functional as CF
from neurenix.continual.base import uncompiled
from neurenix.continual.quadratic import accumulation_dtype, snapshot

__all__ = ["PathIntegral"]

#: The tensors of a stretch, by parameter name (a checkpoint stores them under these keys).
TRACKED = ("omega", "task_start", "pending_grad", "pending_params")


class PathIntegral:
    """The running ``ω`` of a stretch of training: which parameters, from where, the pending step.

    ``state`` holds, by key of :data:`TRACKED` and parameter name: ``omega`` and ``task_start``
    (``θ_start``) and ``pending_params`` in at least float32 (in a 16-bit model's precision ``ω``
    would stop taking up steps much smaller than itself), ``pending_grad`` in the gradients' dtype,
    as views of one buffer (``pending_grads_storage``) so that one kernel clears their non-finite
    entries on a GPU (see :func:`~neurenix.continual.functional.si_step_`). Empty between stretches.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.state: dict[str, dict[str, Tensor]] = {}
        self.pending_grads_storage: Optional[Tensor] = None
        self.has_pending = False
        # ``state``'s tensors as lists in the order of ``params``, made once per stretch so that
        # a training step builds nothing.
        self._omegas: list[Tensor] = []
        self._pending_grads: list[Tensor] = []
        self._pending_params: list[Tensor] = []
        self.clear()

    @property
    def active(self) -> bool:
        """Whether a stretch is running (between :meth:`begin` and :meth:`clear`)."""
        return bool(self.state["task_start"])

    def begin(self, params: dict[str, torch.nn.Parameter], device: torch.device) -> None:
        """Start a stretch at the current values of ``params``, with ``ω = 0`` and nothing pending."""
        self.names, self.params = list(params), list(params.values())
        start = snapshot(params, device)
        self.set_state({
            "omega": {name: torch.zeros_like(s) for name, s in start.items()},
            "task_start": start,
            "pending_grad": {name: torch.zeros_like(s) for name, s in start.items()},
            "pending_params": {name: torch.zeros_like(s) for name, s in start.items()},
        })
        self.has_pending = False

    @torch.no_grad()
    def restart(self) -> None:
        """Start a new stretch of the same parameters here, in place: ``θ_start = θ``, ``ω = 0``.

        A pending step is dropped: :meth:`flush` it first to count it in the stretch that ends.
        """
        torch._foreach_copy_(list(self.state["task_start"].values()), [p.detach() for p in self.params])
        torch._foreach_zero_(self._omegas)
        self.has_pending = False

    def clear(self) -> None:
        """End the stretch: no state until the next :meth:`begin`."""
        self.set_state({key: {} for key in TRACKED})
        self.has_pending = False

    def set_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Install ``state`` (keys of :data:`TRACKED`), casting and packing it as the class says."""
        for key in ("omega", "task_start", "pending_params"):
            state[key] = {name: t.to(accumulation_dtype(t.dtype)) for name, t in state[key].items()}
        self.pending_grads_storage, state["pending_grad"] = CF.packed(state["pending_grad"])
        self.state = state
        names = self.names if state["task_start"] else []  # empty between stretches
        self._omegas = [state["omega"][name] for name in names]
        self._pending_grads = [state["pending_grad"][name] for name in names]
        self._pending_params = [state["pending_params"][name] for name in names]

    def observe(self) -> None:
        """Close the pending step (if any), then make this step, with the gradients in ``.grad``, pending."""
        if not self.params:
            return
        grads = [p.grad for p in self.params]
        CF.si_step_(self._omegas, self._pending_grads, self._pending_params, grads, self.params, self.has_pending, self.pending_grads_storage)
        self.has_pending = True

    def flush(self) -> None:
        """Close the pending step at the current parameters (the stretch ends, or ``ω`` is read)."""
        if self.has_pending:
            CF.si_accumulate_(self._omegas, self._pending_grads, self._pending_params, self.params)
            self.has_pending = False

    def current(self) -> dict[str, Tensor]:
        """A copy of ``ω``, the pending step taken up to the current parameters."""
        omega = {name: t.clone() for name, t in self.state["omega"].items()}
        if self.has_pending:
            before = [t.clone() for t in self.state["pending_params"].values()]
            CF.si_accumulate_(omega.values(), self.state["pending_grad"].values(), before, self.params)
        return omega

    def change(self) -> dict[str, Tensor]:
        """``θ − θ_start`` at the current parameters (in ``θ_start``'s dtype), by name."""
        start = self.state["task_start"]
        return {name: p.detach().to(start[name].dtype) - start[name] for name, p in zip(self.names, self.params)}

    def to(self, device: torch.device) -> None:
        """Move the stretch's state to ``device`` (nothing to do between stretches or if it is there)."""
        start = self.state["task_start"]
        if start and next(iter(start.values())).device != device:
            self.set_state({key: {n: t.to(device) for n, t in values.items()} for key, values in self.state.items()})

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """The tensors by key of :data:`TRACKED` (``has_pending`` is the caller's to store)."""
        return {key: dict(values) for key, values in self.state.items()}

    def load_state_dict(self, saved: dict[str, Any], model: torch.nn.Module, device: torch.device, has_pending: bool) -> None:
        """Restore :meth:`state_dict`'s output for ``model``'s parameters (missing keys: empty)."""
        state = {key: {n: t.to(device) for n, t in saved.get(key, {}).items()} for key in TRACKED}
        params = dict(uncompiled(model).named_parameters())
        self.names = list(state["task_start"])
        self.params = [params[name] for name in self.names]
        self.set_state(state)
        self.has_pending = has_pending
