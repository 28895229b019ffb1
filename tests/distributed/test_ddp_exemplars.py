"""Exemplar selection under DDP (two CPU processes, gloo): each rank selects by herding from its own
share of each task's data into its own memory, the nearest-mean classifier's class means are
summed over the ranks, and every rank's exemplars are in the checkpoint and back on resume.

One launch of tests/distributed/exemplars_worker.py runs the job uninterrupted, then resumes it
from its checkpoint at step 9 (task 1, one batch in).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurenix.continual import functional as CF
from tests.distributed import exemplars_worker as worker
from tests.distributed.workers import launch, network, rank_results
from tests.reliability.test_resume import assert_close


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_exemplars")
    launch(Path(worker.__file__), out)
    return out


def features(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Normalized hidden features of the worker's network with ``params``."""
    net = network(seed=0, outputs=worker.OUTPUTS)
    net.load_state_dict({name.removeprefix("net."): p for name, p in params.items()})
    with torch.no_grad():
        return F.normalize(net[1](net[0](x)), dim=1)


def herding_by_class(params: dict, data, rank: int, quota: int) -> dict[int, list]:
    """Herding over rank ``rank``'s share of ``data`` (samples rank, rank + 2, ...), per class."""
    x, y = data.inputs[rank::2], data.targets[rank::2]
    phi = features(params, x)
    picked = {}
    for label in sorted(y.unique().tolist()):
        positions = (y == label).nonzero().squeeze(1)
        picked[label] = x[positions[CF.herding_order(phi[positions], quota)]].tolist()
    return picked


def memory_by_class(memory: dict) -> dict[int, list]:
    order = torch.argsort(memory["ranks"], stable=True)
    out: dict[int, list] = {}
    for i in order.tolist():
        out.setdefault(int(memory["targets"][i]), []).append(memory["inputs"][i].tolist())
    return {key: out[key] for key in sorted(out)}


def test_each_rank_selects_by_herding_from_its_own_share(job):
    for rank, runs in enumerate(rank_results(job)):
        run = runs["uninterrupted"]
        held = memory_by_class(run["state"]["memory"])
        first, second = run["task_end_params"]
        # Task 0's classes: quota 4 each at task 0's end, then 2 each (8 / 4 classes) after task 1:
        # the first two herding picks made with task 0's end features.
        old = herding_by_class(first, worker.task(0), rank, 2)
        new = herding_by_class(second, worker.task(1), rank, 2)
        assert held == {**old, **new}
    memories = [runs["uninterrupted"]["state"]["memory"] for runs in rank_results(job)]
    assert not torch.equal(memories[0]["inputs"], memories[1]["inputs"])  # each rank's own share


def test_class_means_are_summed_over_the_ranks_exemplars(job):
    ranks = [runs["uninterrupted"] for runs in rank_results(job)]
    assert torch.equal(ranks[0]["means"], ranks[1]["means"]) and ranks[0]["seen"].tolist() == [True] * 4
    # The reference: every rank's exemplars pooled, their features averaged per class, normalized.
    inputs = torch.cat([run["state"]["memory"]["inputs"] for run in ranks])
    labels = torch.cat([run["state"]["memory"]["targets"] for run in ranks])
    phi = features(ranks[0]["params"], inputs)
    expected = torch.stack([F.normalize(phi[labels == c].mean(0), dim=0) for c in range(4)])
    assert torch.allclose(ranks[0]["means"], expected, atol=1e-6)
    # Not the means of one rank's exemplars alone.
    own = features(ranks[0]["params"], ranks[0]["state"]["memory"]["inputs"])
    alone = F.normalize(own[ranks[0]["state"]["memory"]["targets"] == 0].mean(0), dim=0)
    assert not torch.allclose(alone, expected[0], atol=1e-4)


def test_the_checkpoint_holds_both_ranks_exemplars_and_every_rank_resumes_exactly(job):
    checkpoint = torch.load(job / "checkpoints" / f"step={worker.RESUME_STEP}.ckpt", weights_only=True)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("ExperienceReplay")]
    assert "'selection': 'herding'" in [key for key in checkpoint["callbacks"] if key.startswith("ExperienceReplay")][0]
    per_rank = state["memory_per_rank"]
    assert len(per_rank) == 2 and all(memory["extra_fields"] == ["ranks"] for memory in per_rank)
    assert [memory["inputs"].shape[0] for memory in per_rank] == [8, 8]  # task 0's exemplars, 4 per class
    assert not torch.equal(per_rank[0]["inputs"], per_rank[1]["inputs"])
    for runs in rank_results(job):
        assert runs["resumed"]["global_step"] == runs["uninterrupted"]["global_step"] == 16
        assert_close(runs["resumed"]["params"], runs["uninterrupted"]["params"])
        assert_close(runs["resumed"]["state"], runs["uninterrupted"]["state"])
        assert torch.equal(runs["resumed"]["means"], runs["uninterrupted"]["means"])
