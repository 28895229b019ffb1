"""Under DDP (two CPU processes), a checkpoint written in the middle of an epoch resumes exactly.

Lightning replaces the data module's shuffling with a ``DistributedSampler`` on each rank; the
loader's state (saved from rank 0) holds how many batches of the epoch were served and the
sampler's epoch, and both ranks resume there. One launch of tests/reliability/ddp_resume_worker.py
runs the uninterrupted job, then resumes it from its checkpoint at step 12 (task 1, two batches
into its first epoch, with task 0's Fisher, importance and replay memories to carry).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.workers import launch, rank_results
from tests.reliability.test_resume import assert_close

@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_resume")
    launch(Path(__file__).with_name("ddp_resume_worker.py"), out)
    return out


def test_the_checkpoint_holds_the_distributed_loaders_place(job):
    checkpoint = torch.load(job / "checkpoints" / "step=12.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": 2, "sampler": {"epoch": 2}}]
    assert (checkpoint["TaskSequenceDataModule"]["current_task"], checkpoint["epoch"]) == (1, 2)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_resumes_to_the_uninterrupted_parameters_and_method_state(job, rank):
    runs = rank_results(job)[rank]
    assert runs["resumed"]["global_step"] == runs["uninterrupted"]["global_step"] == 20
    assert_close(runs["resumed"], runs["uninterrupted"])
