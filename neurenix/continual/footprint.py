"""What a continual-learning method costs in memory: the bytes of its state and of all it holds."""

from __future__ import annotations

import itertools
from typing import Any

from torch import Tensor, nn

__all__ = ["held_bytes", "state_bytes"]


def state_bytes(state: Any) -> int:
    """``Σ numel · element_size`` over every tensor in a nested container (a ``state_dict``)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def held_bytes(method: Any) -> int:
    """Bytes of the distinct tensor storages a method object holds, its model's own left out.

    Counts what ``state_dict`` leaves out (EWC's folded penalty, the quadratic penalties'
    workspace, SI's references, a teacher's buffers) and counts shared storage once.
    """
    model = method.model
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    storages: dict[int, int] = {}
    visited: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            pointer = obj.untyped_storage().data_ptr()
            if pointer not in own:
                storages[pointer] = obj.untyped_storage().nbytes()
            return
        if id(obj) in visited or obj is model:
            return
        visited.add(id(obj))
        if isinstance(obj, nn.Module):
            for tensor in itertools.chain(obj.parameters(), obj.buffers()):
                visit(tensor)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                visit(value)
        elif type(obj).__module__.startswith("neurenix"):
            visit(vars(obj))

    visit(vars(method))
    return sum(storages.values())
