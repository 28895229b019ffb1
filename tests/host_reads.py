"""Count the places where a step would read a tensor's values on the host.

On a GPU each of them is a host-device synchronization (the host waits for every queued kernel);
CUDA's own detector (``torch.cuda.set_sync_debug_mode``) needs a GPU. This one runs anywhere:
while :func:`host_reads` is active, the calls that need a tensor's values on the host are
recorded with the line that made them (``.item()``, ``.tolist()``, ``bool()``/``int()``/
``float()``/``__index__`` of a tensor, ``.cpu()``/``.numpy()``, ``torch.nonzero``/``argwhere``,
``torch.unique``, ``masked_select``, one-argument ``torch.where``, and indexing with a boolean
tensor, whose result's size depends on the values).

Each read keeps the files of its call stack, so that a test can keep the reads that a package's
code made, directly or through the functions it called (:meth:`HostReads.made_in`): under a
Lightning Trainer, Lightning's own reads are not the library's.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                   "unique", "masked_select", "argwhere")
_TORCH_FUNCTIONS = ("nonzero", "argwhere", "unique", "masked_select", "unique_consecutive")


class HostRead(str):
    """One read, ``"what at dir/file:line"`` (the innermost line outside torch's tensor wrappers),
    with the files of every frame of its call stack (:attr:`stack_files`)."""

    stack_files: tuple[str, ...]


class HostReads(list):
    """The recorded reads (:class:`HostRead`), in order."""

    def __str__(self) -> str:
        return "\n".join(self)

    def made_in(self, root: str) -> "HostReads":
        """The reads whose call stack passes through a file under the folder ``root`` (a package's
        code made them, directly or through what it called)."""
        root = str(Path(root).resolve())
        return HostReads(read for read in self if any(file.startswith(root) for file in read.stack_files))


def _read(what: str) -> HostRead:
    stack = traceback.extract_stack()[:-2]  # without this function and the recording wrapper
    where = "?"
    for frame in reversed(stack):
        if not frame.filename.endswith(("host_reads.py", "torch/_tensor.py", "torch/functional.py")):
            where = f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}"
            break
    read = HostRead(f"{what} at {where}")
    read.stack_files = tuple(str(Path(frame.filename).resolve()) for frame in stack)
    return read


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def host_reads() -> Iterator[HostReads]:
    reads = HostReads()
    depth = [0]  # reads made inside a recorded call (unique calls sort, ...) are not counted again
    saved: list[tuple[Any, str, Any]] = []

    def recording(owner: Any, name: str, condition: Callable[..., bool] = lambda *a, **k: True) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0 and condition(*args, **kwargs):
                reads.append(_read(name))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in _TENSOR_METHODS:
        recording(torch.Tensor, name)
    for name in _TORCH_FUNCTIONS:
        recording(torch, name)
    recording(torch, "where", lambda *args, **kwargs: len(args) + len(kwargs) == 1)
    recording(torch.Tensor, "__getitem__", lambda self, index: _is_bool_index(index))
    recording(torch.Tensor, "__setitem__", lambda self, index, value: _is_bool_index(index))
    try:
        yield reads
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
