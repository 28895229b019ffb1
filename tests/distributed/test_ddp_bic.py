"""BiC under DDP (two CPU processes, gloo): each rank chooses exemplars from its own share of a
task's data and keeps its own memory (its own held-out part); the bias correction is fitted on the
held-out logits of both ranks, so that both ranks get the same ``α, β``; the same parameters and
predictions on both ranks; checkpoints that hold both memories and resume.

One launch of tests/distributed/bic_worker.py runs the two-task job uninterrupted, then resumed
from its checkpoint at step 6 (task 1, two batches into its epoch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neurenix.continual import functional as CF
from neurenix.continual.bic import BIAS_L2, held_out_ranks
from tests.distributed import bic_worker as worker
from tests.distributed.workers import (
    assert_resumed_like_uninterrupted,
    assert_same_parameters,
    launch,
    network,
    rank_results,
)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_bic")
    launch(Path(worker.__file__), out)
    return out


def test_both_ranks_end_with_the_same_parameters_correction_and_predictions(job):
    first, second = (run["uninterrupted"] for run in rank_results(job))
    assert_same_parameters(first, second)
    assert first["method"]["corrections"].shape == (1, 3)  # task 1's correction, none for task 0
    assert torch.equal(first["method"]["corrections"], second["method"]["corrections"])
    assert torch.equal(first["scores"], second["scores"])


def test_the_correction_is_fitted_on_both_ranks_held_out_logits(job):
    runs = [run["uninterrupted"] for run in rank_results(job)]
    memories = [run["method"]["memory"] for run in runs]
    for memory in memories:  # 2 exemplars a class on each rank, rank 1 of each held out
        assert sorted(memory["targets"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    held = [held_out_ranks(m["ranks"], 0.5) for m in memories]
    inputs = torch.cat([m["inputs"][h] for m, h in zip(memories, held)])
    labels = torch.cat([m["targets"][h] for m, h in zip(memories, held)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    net = network(0, outputs=4)
    net.load_state_dict({name.removeprefix("net."): value for name, value in runs[0]["params"].items()})
    with torch.no_grad():
        logits = net(inputs).double()
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, False, True, True]), l2=BIAS_L2)
    _, fitted_alpha, fitted_beta = runs[0]["method"]["corrections"][0].tolist()
    assert fitted_alpha == pytest.approx(alpha, abs=1e-9) and fitted_beta == pytest.approx(beta, abs=1e-9)
    # One rank's held-out logits alone give another fit: the gathering matters.
    alone = CF.fit_bias_correction(logits[: held[0].sum()], labels[: held[0].sum()], torch.tensor([False, False, True, True]), l2=BIAS_L2)
    assert alone[0] != pytest.approx(alpha, abs=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
def test_two_processes_resume_to_the_uninterrupted_run(job, rank):
    run = rank_results(job)[rank]
    assert_resumed_like_uninterrupted(run)
    uninterrupted, resumed = run["uninterrupted"], run["resumed"]
    torch.testing.assert_close(resumed["method"]["corrections"], uninterrupted["method"]["corrections"], rtol=0, atol=1e-6)
