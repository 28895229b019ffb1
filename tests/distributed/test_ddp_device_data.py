"""``TaskSequenceDataModule(keep_on_device=True)`` under DDP (two CPU processes, gloo): each rank
moves the tasks to its own device, Lightning's DistributedSampler gives it its share, and every
batch, parameter and EWC state equals the same job's with ``keep_on_device=False``, bit for bit.

One launch of tests/distributed/device_data_worker.py runs both settings in both regimes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.test_datamodule_resume import assert_equal
from tests.distributed import device_data_worker as worker
from tests.distributed.workers import launch, rank_results, two_class_task


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_device_data")
    launch(Path(worker.__file__), out)
    return rank_results(out)


@pytest.mark.parametrize("training", worker.REGIMES)
def test_each_rank_trains_on_the_batches_and_ends_with_the_weights_of_the_host_loader(job, training):
    for rank in job:
        on_device, on_host = rank[f"{training}-True"], rank[f"{training}-False"]
        assert on_device["tasks_device"] == "cpu" and on_host["tasks_device"] == "None"
        # Lightning rebuilt the loader with its DistributedSampler and kept the device
        assert on_device["sampler"] == "TensorBatchSampler(DistributedSampler, device=cpu)"
        assert_equal(on_device["batches"], on_host["batches"])
        assert_equal(on_device["params"], on_host["params"])
        assert_equal(on_device["ewc"], on_host["ewc"])
    assert_equal(job[0][f"{training}-True"]["params"], job[1][f"{training}-True"]["params"])


@pytest.mark.parametrize("training", worker.REGIMES)
def test_each_rank_gets_its_own_share_of_every_epoch(job, training):
    """Per epoch the two ranks' samples are disjoint and together the data the regime trains on."""
    steps_per_epoch = worker.SAMPLES // 2 // worker.BATCH_PER_RANK
    tasks = [two_class_task(0, worker.SAMPLES), two_class_task(1, worker.SAMPLES)]
    shares = [rank[f"{training}-True"]["batches"] for rank in job]
    position = 0
    for task in range(2):
        trained = tasks[: task + 1] if training == "cumulative" else tasks[task : task + 1]
        expected = sorted(tuple(row) for t in trained for row in t.inputs.tolist())
        steps = steps_per_epoch * len(trained)
        for _ in range(worker.EPOCHS):
            seen = [[tuple(row) for (_, x, _) in share[position : position + steps] for row in x.tolist()] for share in shares]
            assert all(batch[0] == task for share in shares for batch in share[position : position + steps])
            assert not set(seen[0]) & set(seen[1])
            assert sorted(seen[0] + seen[1]) == expected
            position += steps
    assert position == len(shares[0]) == len(shares[1])
