"""GDumb under DDP (two CPU processes, gloo): one memory (rank 0's) on both ranks, each task's fit
a DDP run over it from rank 0's initial weights, and an exact resume from a checkpoint in task 1.

One launch of tests/distributed/gdumb_worker.py runs the job uninterrupted, then resumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurenix.continual.gdumb import GDumb
from tests.distributed import gdumb_worker as worker
from tests.distributed.workers import launch, network, rank_results
from tests.reliability.test_resume import assert_close


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_gdumb")
    launch(Path(worker.__file__), out)
    return out


def rank_zero_reference() -> tuple[torch.nn.Module, GDumb]:
    """Rank 0's network and GDumb in one process (seed 0, memory seed SEED)."""
    model = network(seed=0, outputs=worker.OUTPUTS)
    return model, GDumb(model, memory_size=worker.MEMORY_SIZE, seed=worker.SEED)


def test_both_ranks_hold_rank_zeros_memory_and_end_with_the_same_parameters(job):
    first, second = (runs["uninterrupted"] for runs in rank_results(job))
    assert first["global_step"] == second["global_step"] == 2 * 2 * 2  # tasks x epochs x ceil(3 / 2) per rank
    assert_close(first["params"], second["params"])
    _, reference = rank_zero_reference()
    for task_id in (0, 1):
        data = worker.task(task_id)
        for start in range(0, worker.SAMPLES, worker.EVAL_BATCH):  # the whole task, in order, on rank 0
            reference.add_to_memory(*data[start : start + worker.EVAL_BATCH], task_id)
    for run in (first, second):
        assert_close(run["state"]["memory"], reference.memory.state_dict())
        assert run["state"]["filled_task"] == 1


def test_each_task_is_a_ddp_run_on_the_memory_from_rank_zeros_initial_weights(job):
    """The reference: rank 0's initial network, reset at each task, one SGD step per global batch
    on the mean of the two ranks' losses (DDP's gradient average); the batches are memory samples."""
    ranks = [runs["uninterrupted"] for runs in rank_results(job)]
    model, gdumb = rank_zero_reference()
    memory = ranks[0]["state"]["memory"]
    stored = {tuple(row) for row in memory["inputs"].tolist()}
    optimizer, task = None, None
    for step in range(len(ranks[0]["batches"])):
        batches = [rank["batches"][step] for rank in ranks]
        if batches[0][0] != task:  # a task's fit: the initial weights and a new optimizer
            task = batches[0][0]
            gdumb.reset_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
        optimizer.zero_grad()
        for _, x, y in batches:
            if task == 1:  # the final memory is task 1's: every batch of it comes from there
                assert {tuple(row) for row in x.tolist()} <= stored
            (F.cross_entropy(model(x), y) / len(ranks)).backward()
        optimizer.step()
    assert_close({f"net.{name}": p for name, p in model.named_parameters()}, ranks[0]["params"])


def test_the_checkpoint_holds_one_memory_and_every_rank_resumes_exactly(job):
    checkpoint = torch.load(job / "checkpoints" / f"step={worker.RESUME_STEP}.ckpt", weights_only=True)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("GDumb")]
    assert "memory_per_rank" not in state and state["filled_task"] == 1
    for runs in rank_results(job):
        assert runs["resumed"]["global_step"] == runs["uninterrupted"]["global_step"]
        assert_close(runs["resumed"]["params"], runs["uninterrupted"]["params"])
        assert_close(runs["resumed"]["state"]["memory"], runs["uninterrupted"]["state"]["memory"])
