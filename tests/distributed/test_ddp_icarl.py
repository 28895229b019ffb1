"""ICaRL under DDP (two CPU processes, gloo): each rank chooses exemplars from its own share of a
task's data and keeps its own memory; the class means of NCM are summed over both ranks' exemplars; the same
parameters and the same NCM on both ranks; checkpoints that hold both memories and resume.

One launch of tests/distributed/icarl_worker.py runs the two-task job uninterrupted, then resumed
from its checkpoint at step 6 (task 1, two batches into its epoch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import icarl_worker as worker
from tests.distributed.workers import (
    assert_resumed_like_uninterrupted,
    assert_same_parameters,
    class_incremental_task,
    launch,
    network,
    probe as probe_inputs,
    rank_results,
)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_icarl")
    launch(Path(worker.__file__), out)
    return out


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return (rows[:, None, :] == table[None, :, :]).all(-1).any(1)


def test_both_ranks_end_with_the_same_parameters_and_the_same_ncm(job):
    first, second = (run["uninterrupted"] for run in rank_results(job))
    assert_same_parameters(first, second)
    assert torch.equal(first["scores"], second["scores"])


def test_each_rank_chooses_its_exemplars_from_its_own_share(job):
    runs = [run["uninterrupted"] for run in rank_results(job)]
    assert not bool(_rows_in(runs[0]["seen"], runs[1]["seen"]).any())  # the training shards are disjoint
    for rank, run in enumerate(runs):
        memory = run["method"]["memory"]
        assert sorted(memory["targets"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # 8 exemplars, 2 per class
        # select_exemplars' share of a task's dataset on this rank: every second sample from its rank.
        share = torch.cat([class_incremental_task(index).inputs[rank::2] for index in (0, 1)])
        others = torch.cat([class_incremental_task(index).inputs[1 - rank :: 2] for index in (0, 1)])
        assert bool(_rows_in(memory["inputs"], share).all())
        assert not bool(_rows_in(memory["inputs"], others).any())


def test_the_class_means_are_those_of_both_ranks_exemplars(job):
    runs = [run["uninterrupted"] for run in rank_results(job)]
    net = network(0, outputs=4)
    net.load_state_dict({name.removeprefix("net."): value for name, value in runs[0]["params"].items()})
    inputs = torch.cat([run["method"]["memory"]["inputs"] for run in runs])
    labels = torch.cat([run["method"]["memory"]["targets"] for run in runs])
    with torch.no_grad():
        features = F.normalize(net[1](net[0](inputs)), dim=1)
        means = F.normalize(torch.stack([features[labels == c].mean(0) for c in range(4)]), dim=1)
        probe = F.normalize(net[1](net[0](probe_inputs())), dim=1)
    torch.testing.assert_close(runs[0]["scores"], -torch.cdist(probe, means).square(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_two_processes_resume_to_the_uninterrupted_run(job, rank):
    run = rank_results(job)[rank]
    assert_resumed_like_uninterrupted(run)
