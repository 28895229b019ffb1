"""The few collectives the methods need across processes (DDP), and nothing when there is one.

They talk to ``torch.distributed``'s default process group directly rather than through a
Lightning strategy, because the standalone door (``train_step`` in a user's own DDP loop) needs
them as much as the callbacks do; under Lightning's DDP strategies the group is the same one.
Every function is a no-op in a single process, and every rank must call it (a collective).
"""

from __future__ import annotations

from multiprocessing.context import get_spawning_popen
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "StaysInItsProcess",
    "all_gather_objects",
    "broadcast_",
    "mean_across_ranks_",
    "rank_and_world_size",
    "spawn_refusal",
    "sum_across_ranks_",
]


def spawn_refusal(owner: str, start_method: str) -> str:
    """Why ``owner`` cannot run under a strategy that starts its processes with ``start_method``."""
    return (
        f"{owner} does not support strategies that run each fit in new processes (start method "
        f"{start_method!r}: ddp_spawn, ddp_fork, ddp_notebook and the like): the state it learns there "
        "(Fisher, anchors, memory, teacher, curves, task bookkeeping) would be lost when the fit returns, "
        "and Lightning cannot fit such a Trainer twice. Use strategy='ddp', which runs the script once per "
        "device (see the multi-GPU page of the docs)"
    )


class StaysInItsProcess:
    """A callback whose state must stay in the process that trains: refused by spawn-based strategies.

    A spawn-based strategy (``ddp_spawn``, a forkserver) pickles the ``Trainer`` with its
    callbacks into each new process. Refusing the pickling refuses in the parent, before any
    process starts: ``setup`` only runs in the children, and some die unpickling PyTorch's
    shared-memory tensors before any check can speak. Other pickling (``copy.deepcopy``, a user's
    ``pickle.dumps``) is unaffected: ``multiprocessing`` marks the spawning the way its own locks
    detect it.
    """

    def __getstate__(self) -> dict[str, Any]:
        spawning = get_spawning_popen()
        if spawning is not None:
            raise RuntimeError(spawn_refusal(type(self).__name__, getattr(spawning, "method", "spawn")))
        return self.__dict__.copy()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_across_ranks_(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its sum over all ranks, in one flat all-reduce."""
    if rank_and_world_size()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])  # float64: exact counts
    flat = flat.to(_backend_device(flat))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


def mean_across_ranks_(tensor: Tensor) -> Tensor:
    """Replace ``tensor`` by its mean over all ranks, in place, in its own dtype (returned for chaining).

    For gradients (A-GEM's and GEM's reference gradients): the same mean DDP takes of the
    training gradient, so every rank decides on the same numbers.
    """
    _, world_size = rank_and_world_size()
    if world_size > 1:
        carrier = tensor.to(_backend_device(tensor))
        dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
        carrier.div_(world_size)
        if carrier is not tensor:
            tensor.copy_(carrier)
    return tensor


def broadcast_(tensor: Tensor, source: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``source``'s (in place; returned for chaining)."""
    if rank_and_world_size()[1] > 1:
        carrier = tensor.to(_backend_device(tensor))
        dist.broadcast(carrier, src=source)
        if carrier is not tensor:
            tensor.copy_(carrier)
    return tensor


def _backend_device(tensor: Tensor) -> torch.device:
    """NCCL moves only CUDA tensors: CPU ones (generator states, counts) travel through the GPU."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (pickled: for checkpoints, not for training steps)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered
