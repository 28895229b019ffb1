"""DarkExperienceReplay under DDP (two CPU processes, gloo): one memory per rank, of that rank's
shard of the stream, with the logits; the same parameters on both ranks; checkpoints that hold
both ranks' memories and resume on two processes and on one.

One launch of tests/distributed/dark_replay_worker.py runs the two-task job uninterrupted, then
resumed from its checkpoint at step 6 (task 1, two batches into its epoch).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from neurenix.continual.dark_replay import DarkExperienceReplay
from tests.distributed import dark_replay_worker as worker
from tests.distributed.workers import launch, rank_results

FIELDS = ("inputs", "targets", "task_ids", "logits")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_dark_replay")
    launch(Path(worker.__file__), out)
    return out


def _checkpoint_state(job: Path) -> dict:
    checkpoint = torch.load(job / "checkpoints" / "step=6.ckpt", weights_only=True)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("DarkExperienceReplay")]
    return state


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Whether each row of ``rows`` is a row of ``table``."""
    return (rows[:, None, :] == table[None, :, :]).all(-1).any(1)


def _sample_rows(memory: dict) -> torch.Tensor:
    """One row per stored sample: its inputs, target, task id and logits side by side."""
    return torch.cat([memory[name].reshape(len(memory["inputs"]), -1).double() for name in FIELDS], dim=1)


def test_both_ranks_end_with_the_same_parameters(job):
    first, second = (run["uninterrupted"]["params"] for run in rank_results(job))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_each_rank_remembers_only_samples_of_its_own_shard(job):
    runs = [run["uninterrupted"] for run in rank_results(job)]
    assert not bool(_rows_in(runs[0]["seen"], runs[1]["seen"]).any())  # the shards are disjoint
    for rank, run in enumerate(runs):
        memory = run["method"]["memory"]
        assert memory["num_seen"] == 2 * worker.SAMPLES // 2  # two tasks, half of each
        assert memory["logits"].shape == (worker.MEMORY, 3) and memory["logits"].dtype == torch.float32
        assert bool(_rows_in(memory["inputs"], run["seen"]).all())
        assert not bool(_rows_in(memory["inputs"], runs[1 - rank]["seen"]).any())


def test_the_checkpoint_holds_both_ranks_memories_with_their_logits(job):
    state = _checkpoint_state(job)
    seen = [run["uninterrupted"]["seen"] for run in rank_results(job)]
    per_rank = state["memory_per_rank"]
    assert len(per_rank) == 2
    for rank, memory in enumerate(per_rank):
        assert memory["extra_fields"] == ["logits"] and memory["num_seen"] == 6 * worker.BATCH_PER_RANK
        assert memory["logits"].shape == (worker.MEMORY, 3)
        assert bool(_rows_in(memory["inputs"], seen[rank]).all())
    assert torch.equal(per_rank[0]["logits"], state["memory"]["logits"])  # rank 0's own, as written by rank 0


@pytest.mark.parametrize("rank", [0, 1])
def test_two_processes_resume_to_the_uninterrupted_run(job, rank):
    run = rank_results(job)[rank]
    uninterrupted, resumed = run["uninterrupted"], run["resumed"]
    for name, value in uninterrupted["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-6, msg=name)
    ours, theirs = resumed["method"]["memory"], uninterrupted["method"]["memory"]
    assert ours["num_seen"] == theirs["num_seen"]
    for name in (*FIELDS, "generator"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["method"]["finished_tasks"] == [0, 1]


def test_one_process_resumes_with_both_ranks_samples_and_their_logits(job):
    state = _checkpoint_state(job)
    saved = torch.cat([_sample_rows(memory) for memory in state["memory_per_rank"]])
    model = worker.Classifier(seed=5)
    der = worker.make_method(model.net, seed=5)
    loaded: dict = {}

    class Grab(L.Callback):  # the memory right after Lightning restored it
        def on_train_start(self, trainer, pl_module):
            loaded.update(der.memory.state_dict())

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, callbacks=[der, Grab()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    datamodule = worker.TaskSequenceDataModule(
        [worker.task(0), worker.task(1)], [worker.task(10), worker.task(11)], batch_size=2 * worker.BATCH_PER_RANK
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=str(job / "checkpoints" / "step=6.ckpt"))

    # Both ranks' 2 x 8 samples pooled, a uniform 8 kept, each with its own target, task id and logits.
    assert len(loaded["inputs"]) == worker.MEMORY and loaded["num_seen"] == 2 * 6 * worker.BATCH_PER_RANK
    assert bool(_rows_in(_sample_rows(loaded), saved).all())
    # Task 1's last two global batches of 8 (its loader resumes after the two it had served).
    assert der.finished_tasks == [0, 1] and der.memory.num_seen == loaded["num_seen"] + 2 * 8


def test_a_memory_saved_by_two_processes_loads_pooled_outside_lightning(job):
    state = _checkpoint_state(job)
    der = DarkExperienceReplay(torch.nn.Linear(6, 3), memory_size=2 * worker.MEMORY, alpha=0.5, beta=0.5)
    der.load_state_dict(state)
    restored = _sample_rows(der.memory.state_dict())
    saved = torch.cat([_sample_rows(memory) for memory in state["memory_per_rank"]])
    assert restored.shape == saved.shape  # room for all 16: every sample, with its logits, kept
    assert bool(_rows_in(restored, saved).all()) and bool(_rows_in(saved, restored).all())
