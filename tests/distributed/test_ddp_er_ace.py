"""ERACE under DDP (two CPU processes, gloo): one memory and one set of seen classes per rank, the
ranks' gradients averaged by DDP, every rank's memory in the checkpoint and back on resume.

One launch of tests/distributed/er_ace_worker.py runs the job uninterrupted, then resumes it from
its checkpoint at step 9 (task 1, one batch in).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurenix.continual.er_ace import ERACE
from tests.distributed import er_ace_worker as worker
from tests.distributed.workers import launch, network, rank_results
from tests.reliability.test_resume import assert_close

@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_er_ace")
    launch(Path(worker.__file__), out)
    return out


def test_both_ranks_end_with_the_same_parameters_and_their_own_memories(job):
    first, second = (runs["uninterrupted"] for runs in rank_results(job))
    assert first["global_step"] == second["global_step"] == 16
    assert_close(first["params"], second["params"])
    memories = [run["state"]["memory"] for run in (first, second)]
    assert [memory["num_seen"] for memory in memories] == [64, 64]  # each rank: half of 32 samples x 2 epochs x 2 tasks
    assert not torch.equal(memories[0]["inputs"], memories[1]["inputs"])  # each rank's own shard


def test_ddp_equals_one_process_averaging_the_two_ranks_losses_each_with_its_own_memory(job):
    """The reference: one model, two ERACE objects (one per rank, seeded as the ranks are), each
    given its rank's batches; each step back-propagates the mean of the two ranks' losses."""
    ranks = [runs["uninterrupted"] for runs in rank_results(job)]
    model = network(seed=0, outputs=worker.OUTPUTS)
    model.load_state_dict({name.removeprefix("net."): p for name, p in ranks[0]["initial"].items()})
    methods = [ERACE(model, memory_size=worker.MEMORY_SIZE, replay_ratio=worker.REPLAY_RATIO, seed=worker.SEED) for _ in ranks]
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
    for step in range(len(ranks[0]["batches"])):
        optimizer.zero_grad()
        for method, rank in zip(methods, ranks):
            task_id, x, y = rank["batches"][step]
            method.enter_task(task_id)
            outputs = method.transform_outputs((x,), model(x), y)
            loss = method.transform_loss(F.cross_entropy(outputs, y), (x,), outputs, y)
            (loss / len(ranks)).backward()
        optimizer.step()

    assert_close({f"net.{name}": p for name, p in model.named_parameters()}, ranks[0]["params"])
    for method, rank in zip(methods, ranks):
        assert_close(method.memory.state_dict(), rank["state"]["memory"])
        assert torch.equal(method.state_dict()["seen_classes"], rank["state"]["seen_classes"])


def test_the_checkpoint_holds_both_ranks_memories_and_every_rank_resumes_exactly(job):
    checkpoint = torch.load(job / "checkpoints" / f"step={worker.RESUME_STEP}.ckpt", weights_only=True)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("ERACE")]
    assert len(state["memory_per_rank"]) == len(state["seen_classes_per_rank"]) == 2
    assert not torch.equal(state["memory_per_rank"][0]["inputs"], state["memory_per_rank"][1]["inputs"])
    assert all(seen.tolist() == [True] * 4 for seen in state["seen_classes_per_rank"])  # task 1 has begun
    for runs in rank_results(job):
        assert runs["resumed"]["global_step"] == runs["uninterrupted"]["global_step"]
        assert_close(runs["resumed"]["params"], runs["uninterrupted"]["params"])
        assert_close(runs["resumed"]["state"], runs["uninterrupted"]["state"])
