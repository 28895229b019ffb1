"""A task-free stream is one long epoch: a checkpoint in its middle resumes at its next batch."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from neurenix.continual import ExperienceReplay
from neurenix.data import split_benchmark
from neurenix.data.stream import task_free_stream
from tests.helpers import lit_classifier, quiet_trainer


def test_a_checkpoint_in_the_middle_of_the_stream_resumes_exactly(tmp_path):
    stream = task_free_stream(split_benchmark("digits", 5, scenario="domain", seed=0), batch_size=64)

    def run(ckpt_path=None):
        torch.manual_seed(1 if ckpt_path else 0)  # a resumed run starts from other weights
        model = lit_classifier(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2)))
        replay = ExperienceReplay(model.net, memory_size=32, seed=1 if ckpt_path else 0)
        checkpoints = [] if ckpt_path else [ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)]
        trainer = quiet_trainer(callbacks=[replay, *checkpoints], enable_checkpointing=not ckpt_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, stream.train_dataloader(), ckpt_path=ckpt_path)
        assert not [w for w in caught if "not resumable" in str(w.message)]
        return [p.detach().clone() for p in model.parameters()], replay.state_dict()["memory"], trainer.global_step

    params, memory, steps = run()
    assert steps == stream.num_steps > 14
    for step in (7, 14):  # inside tasks 1 and 3 (boundaries every 4 steps)
        resumed_params, resumed_memory, resumed_steps = run(str(tmp_path / f"step={step}.ckpt"))
        assert resumed_steps == steps and all(torch.equal(a, b) for a, b in zip(resumed_params, params))
        assert all(torch.equal(resumed_memory[key], memory[key]) for key in ("inputs", "targets"))
