"""Every method under DDP (two CPU processes, gloo) against one process on the same global batches.

Each test launches tests/distributed/sequence_worker.py as a real Lightning DDP job.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import (
    EWC,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    MAS,
    RWalk,
    SynapticIntelligence,
    TaskBoundaryDetector,
)
from neurenix.continual.replay import redistributed_memory
from neurenix.metrics import ForgettingCurves

WORKER = Path(__file__).with_name("sequence_worker.py")
TIMEOUT = 240  # seconds: a DDP job that has not ended by then has hung


def _run(out: Path, devices: int, *flags: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), *flags], capture_output=True, text=True, timeout=TIMEOUT
    )


def _load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def _assert_close(a, b, atol: float = 1e-6) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key], atol)
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a, b, atol=atol, rtol=0, equal_nan=True), (a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same sequence (EWC, SI, L2, distillation, forgetting curves) in one and in two processes."""
    root = tmp_path_factory.mktemp("ddp")
    for devices in (1, 2):
        done = _run(root / f"devices{devices}", devices, "--without-replay")
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    single, ddp = _load(runs / "devices1", 0), _load(runs / "devices2", 0)
    _assert_close(ddp["params"], single["params"])
    _assert_close(ddp["ewc_fisher"], single["ewc_fisher"])  # shards summed, then divided
    assert ddp["ewc_samples"] == single["ewc_samples"] == 40  # the global sample size, not 2 x 40
    _assert_close(ddp["si_big_omega"], single["si_big_omega"])  # ω from the all-reduced gradient
    _assert_close(ddp["mas_omega"], single["mas_omega"])  # each rank's share of one subset, summed
    _assert_close(ddp["rwalk_fisher"], single["rwalk_fisher"])  # from the all-reduced gradient
    _assert_close(ddp["rwalk_scores"], single["rwalk_scores"], atol=1e-4)
    _assert_close(ddp["teacher"], single["teacher"])
    _assert_close(ddp["matrix"], single["matrix"], atol=0)  # whole test sets, counts reduced
    assert torch.equal(ddp["matrix_counts"], single["matrix_counts"])  # each test sample counted once


def test_rank_zero_logs_the_same_curves_and_heatmaps_as_one_process(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    single, ddp = (EventAccumulator(str(runs / f"devices{d}" / "tensorboard" / "version_0")) for d in (1, 2))
    for events in (single, ddp):
        events.Reload()
    assert len(ddp.Images("continual/accuracy_matrix")) == 2  # one heatmap per task
    for task in (0, 1):
        ours = [e.value for e in ddp.Scalars(f"accuracy/task_{task}")]
        assert ours == [e.value for e in single.Scalars(f"accuracy/task_{task}")] and len(ours) == 3


def test_each_rank_evaluates_its_share_of_the_test_sets(runs):
    single = _load(runs / "devices1", 0)["evaluated_samples"]
    shares = [_load(runs / "devices2", rank)["evaluated_samples"] for rank in (0, 1)]
    # 2 test sets of 64 samples, evaluated at the start and after each of the 2 tasks
    assert single == 3 * 2 * 64
    assert shares == [single // 2, single // 2]


def test_every_rank_holds_the_same_parameters_and_state(runs):
    first, second = _load(runs / "devices2", 0), _load(runs / "devices2", 1)
    _assert_close(first, second, atol=0)


def test_replay_checkpoint_holds_every_ranks_memory(tmp_path):
    done = _run(tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ExperienceReplay")]
    per_rank = state["memory_per_rank"]
    assert len(per_rank) == 2
    assert all(memory["inputs"].shape[0] == 20 for memory in per_rank)  # both reservoirs full
    assert not torch.equal(per_rank[0]["inputs"], per_rank[1]["inputs"])  # each rank's own shard

    # Resumed in one process: the memory is drawn from both ranks' samples.
    replay = ExperienceReplay(torch.nn.Linear(6, 3), memory_size=20, replay_ratio=0.5)
    replay.load_state_dict(state)
    pooled = torch.cat([memory["inputs"] for memory in per_rank])
    restored = replay.memory.state_dict()["inputs"]
    assert restored.shape[0] == 20
    assert all(any(torch.equal(row, other) for other in pooled) for row in restored)
    assert replay.memory.num_seen == per_rank[0]["num_seen"] + per_rank[1]["num_seen"]


def test_memories_are_dealt_out_to_more_processes_without_loss():
    per_rank = [
        {"inputs": torch.arange(k * 10, k * 10 + 10).float().unsqueeze(1), "targets": torch.zeros(10, dtype=torch.long),
         "task_ids": torch.zeros(10, dtype=torch.long), "num_seen": 30, "seed": 5}
        for k in range(2)
    ]
    shares = [redistributed_memory(per_rank, rank, 3, capacity=10) for rank in range(3)]
    dealt = torch.cat([share["inputs"] for share in shares]).flatten().sort().values
    assert torch.equal(dealt, torch.arange(20).float())  # every sample kept, each once
    assert [share["num_seen"] for share in shares] == [20, 20, 20]


def test_a_rank_that_fails_ends_the_job_instead_of_hanging(tmp_path):
    done = _run(tmp_path, 2, "--fail-on-rank", "1")  # subprocess.run's timeout bounds the wait
    assert done.returncode != 0
    assert "deliberate failure on rank 1" in done.stderr


class _Spawnable(L.LightningModule):
    """Defined at module level: ddp_spawn pickles the module into its child processes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


_EVERY_STATEFUL_CALLBACK = {
    "EWC": lambda net: EWC(net),
    "ExperienceReplay": lambda net: ExperienceReplay(net, memory_size=8),
    "L2Regularization": lambda net: L2Regularization(net),
    "SynapticIntelligence": lambda net: SynapticIntelligence(net),
    "MAS": lambda net: MAS(net),
    "RWalk": lambda net: RWalk(net),
    "KnowledgeDistillation": lambda net: KnowledgeDistillation(net),
    "TaskBoundaryDetector": lambda net: TaskBoundaryDetector(net),
    "ForgettingCurves": lambda net: ForgettingCurves(),
}


@pytest.mark.parametrize("name", list(_EVERY_STATEFUL_CALLBACK))
def test_spawn_based_strategies_are_refused_in_the_parent_before_any_process_starts(name):
    """Under ddp_spawn the method's state would stay in the child processes: refused, loudly, in the
    parent (the children died unpickling shared-memory tensors before setup() could speak)."""
    module = _Spawnable()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, callbacks=[_EVERY_STATEFUL_CALLBACK[name](module.net)], max_epochs=1,
    )
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    # RuntimeError itself: a child that had started and failed would surface as torch's ProcessRaisedException.
    with pytest.raises(RuntimeError, match=rf"^{name} does not support strategies that run each fit in new processes "
                       r"\(start method 'spawn'.*Use strategy='ddp'") as raised:
        trainer.fit(module, DataLoader(data, batch_size=8))
    assert type(raised.value) is RuntimeError
    assert multiprocessing.active_children() == []


def test_ranks_agree_on_every_detected_boundary_under_a_ddp_trainer(tmp_path):
    """TaskBoundaryDetector as a callback of a 2-process DDP Trainer: each rank sees its share of
    every batch, the signal is reduced across ranks, and both ranks switch tasks at the same steps."""
    from tests.continual.test_boundary import DETECTION_DELAY, rule_stream

    done = subprocess.run(
        [sys.executable, str(WORKER.with_name("boundary_worker.py")), str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = _load(tmp_path, 0), _load(tmp_path, 1)
    _, true_boundaries = rule_stream(batch=16)  # in global batches, which are each rank's steps
    assert first["boundaries"] == second["boundaries"] and len(first["boundaries"]) == len(true_boundaries) == 2
    assert all(0 <= found - true <= DETECTION_DELAY for found, true in zip(first["boundaries"], true_boundaries))
    assert first["signals"] == second["signals"]  # one global signal, bitwise equal on both ranks
    assert first["finished_tasks"] == second["finished_tasks"] == [0, 1, 2]
    _assert_close(first["fisher"], second["fisher"], atol=0)  # each task's Fisher from both ranks' data
    assert first["samples"] == second["samples"] and all(count > 0 for count in first["samples"].values())
    _assert_close(first["params"], second["params"], atol=0)
