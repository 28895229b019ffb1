"""A-GEM and GEM under DDP (two CPU processes, gloo): one memory per rank, of that rank's shard of
the stream, and reference gradients averaged over both ranks' samples before any decision, so both
ranks take the same step; checked against one process computing from both shards. A checkpoint
in the middle of task 1 resumes exactly on two processes.

One launch of tests/distributed/gradient_episodic_worker.py runs every part (see its docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from neurenix.continual import functional as CF
from tests.distributed import gradient_episodic_worker as worker
from tests.distributed.workers import launch, network, rank_results
from tests.reliability.test_resume import assert_close

@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_gradient_episodic")
    launch(Path(worker.__file__), out)
    return rank_results(out)


def mean_gradient(model: nn.Module, params: dict, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean cross-entropy of ``model`` at ``params`` on these samples, flattened."""
    leaves = {key: value.detach().clone().requires_grad_(True) for key, value in params.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (inputs,)), targets)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(leaves.values()))])


def samples(memory: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return memory["inputs"][slots], memory["targets"][slots]


def pooled(shards: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])


def agem_projection(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    dot = g @ g_ref
    return g - dot / (g_ref @ g_ref) * g_ref if dot < 0 else g


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_both_ranks_take_the_same_steps_from_their_own_memories(ranks, name):
    first, second = (rank[name] for rank in ranks)
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
    # Each rank remembers its own shard: 6 samples of each finished task, not the same ones.
    memories = [rank[name]["probe"]["memory"] for rank in ranks]
    assert all(memory["task_ids"].tolist() == [0] * 6 + [1] * 6 for memory in memories)
    assert not torch.equal(memories[0]["inputs"], memories[1]["inputs"])


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_the_reference_is_the_mean_over_both_ranks_samples(ranks, name):
    """At the first step of task 2 each rank drew its reference samples from its own memory; the
    gradient both ranks step with is the projection of the (all-reduced) step gradient against
    the reference gradients of *both* ranks' samples together, computed here in one process."""
    probes = [rank[name]["probe"] for rank in ranks]
    g = probes[0]["before"]
    assert torch.equal(g, probes[1]["before"]) and torch.equal(probes[0]["after"], probes[1]["after"])
    params = dict(zip(ranks[0][name]["params"], probes[0]["params"]))
    model = network(seed=0)
    rows = []
    for k in range(len(probes[0]["groups"])):  # one group (A-GEM) or one per finished task (GEM)
        shards = [samples(probe["memory"], probe["groups"][k]) for probe in probes]
        union = mean_gradient(model, params, *pooled(shards))
        per_rank = [mean_gradient(model, params, *shard) for shard in shards]
        assert torch.allclose(union, (per_rank[0] + per_rank[1]) / 2, atol=1e-6)  # equal shares: the plain mean
        assert not torch.allclose(per_rank[0], per_rank[1], atol=1e-3)  # the shards differ
        rows.append(union)
    expected = agem_projection(g, rows[0]) if name == "AGEM" else CF.gem_project(g, torch.stack(rows), 0.5)
    assert not torch.allclose(expected, g, atol=1e-3)  # the gradients conflict: the projection acted
    assert torch.allclose(probes[0]["after"], expected, atol=1e-6, rtol=0)
    if name == "AGEM":
        assert [len(group) for group in probes[0]["groups"]] == [worker.REFERENCE]


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_memories_of_unequal_sizes_weigh_each_sample_alike(ranks, name):
    """Rank 0 holds 3 samples of task 0 and 4 of task 1, rank 1 holds 9 of task 0 and none of task 1:
    each reference is the gradient over all the samples it covers (A-GEM: 16; GEM: 12 of task 0
    and 4 of task 1), not a plain mean of the ranks' means (which a rank without samples of a
    task would drag towards zero)."""
    parts = [rank["unequal"][name] for rank in ranks]
    assert torch.equal(parts[0]["after"], parts[1]["after"])
    memories = [part["memory"] for part in parts]
    model, params, g = nn.Linear(6, 3), parts[0]["params"], parts[0]["before"]
    tasks = [(0,), (1,)] if name == "GEM" else [(0, 1)]
    rows, rank_mean = [], None
    for task_ids in tasks:
        shards = [samples(memory, torch.isin(memory["task_ids"], torch.tensor(task_ids))) for memory in memories]
        rows.append(mean_gradient(model, params, *pooled([s for s in shards if len(s[1])])))
        if task_ids == (0,):
            rank_mean = sum(mean_gradient(model, params, *shard) for shard in shards) / 2
    assert [len(memory["targets"]) for memory in memories] == [7, 9]
    if name == "AGEM":
        expected = agem_projection(g, rows[0])
        every = [samples(m, torch.arange(len(m["targets"]))) for m in memories]
        wrong = agem_projection(g, sum(mean_gradient(model, params, *shard) for shard in every) / 2)
    else:
        expected = CF.gem_project(g, torch.stack(rows), 0.5)
        wrong = CF.gem_project(g, torch.stack([rank_mean, rows[1] / 2]), 0.5)  # rank 1's zeros in the mean
    assert not torch.allclose(expected, g, atol=1e-3)
    assert torch.allclose(parts[0]["after"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(parts[0]["after"], wrong, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_checkpoint_in_task_1_resumes_exactly_on_two_processes(ranks, rank):
    uninterrupted, resumed = ranks[rank]["AGEM"], ranks[rank]["AGEM_resumed"]
    assert_close(resumed["params"], uninterrupted["params"])
    assert_close(resumed["method"], uninterrupted["method"])  # memory, generator, tasks
    assert resumed["method"]["finished_tasks"] == [0, 1, 2]
    assert_close(resumed["probe"], uninterrupted["probe"])  # the same reference draws at step 8
