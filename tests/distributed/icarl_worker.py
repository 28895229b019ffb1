"""ICaRL on a two-process DDP job (CPU, gloo): two class-incremental tasks uninterrupted,
checkpointed every few steps, then resumed in the same processes from one of those checkpoints.

    python tests/distributed/icarl_worker.py OUT [--resume-step 6]

Each rank writes ``OUT/rank{r}.pt``: the inputs of every training batch it saw (its shard of the
stream), and, at the end of both runs, its parameters, the method's ``state_dict`` and NCM's
scores on fixed probe inputs. ``tests/distributed/test_ddp_icarl.py`` runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.icarl import ICaRL  # noqa: E402
from tests.distributed.workers import class_incremental_main  # noqa: E402

MEMORY = 8  # 2 exemplars a class after the second task


def make_method(net: torch.nn.Module, seed: int) -> ICaRL:
    return ICaRL(net, memory_size=MEMORY, replay_ratio=0.5, seed=seed)


if __name__ == "__main__":
    class_incremental_main(__doc__, make_method)
