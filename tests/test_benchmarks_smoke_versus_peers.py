"""Smoke tests of benchmarks/versus_peers.py's methods added in issue 19 (GEM, A-GEM, DER, DER++,
ER-ACE, iCaRL, BiC, GDumb): our side in its quick mode, the mapping onto Avalanche's definitions,
and, where VERSUS_PEERS_PYTHON names a Python with avalanche-lib 0.6.0 (and quadprog), theirs.

It loads the script as tests/test_benchmarks_smoke.py does (which holds the smoke tests of the first seven methods).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.test_benchmarks_smoke import SCRIPT, load_script

PEERS_SCRIPT = SCRIPT.parent / "versus_peers.py"
PEER_PYTHON = os.environ.get("VERSUS_PEERS_PYTHON")
ADDED = ("gem", "agem", "der", "derpp", "er_ace", "icarl", "bic", "gdumb")


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load_script(PEERS_SCRIPT)


@pytest.fixture(scope="module")
def added_run(peers) -> dict[str, Any]:
    return peers.main(["--quick", "--threads", "1", "--methods", ",".join(ADDED)])


def test_versus_peers_runs_every_added_method_on_our_side(peers, added_run):
    m = added_run["measurements"]
    assert list(m) == ["loop", "lightning", *(f"ours/{method}" for method in ADDED)]
    for method in ADDED:
        entry = m[f"ours/{method}"]
        assert len(entry["times_s"]) == 1 and entry["times_s"][0] > 0, method
        assert len(entry["task_accuracies"][0]) == 5 and all(0.0 <= a <= 1.0 for a in entry["task_accuracies"][0]), method
    # Each run's steps were checked against expected_steps (a RuntimeError otherwise); the mapping
    # table lists every method with its five cells.
    rows = added_run["mapping_table"].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == list(ADDED)
    assert all(row.count("|") == 6 for row in rows)


def test_versus_peers_default_methods_are_every_method_both_libraries_have(peers):
    setup, _, _ = peers.parse_setup([])
    assert setup.methods == peers.METHODS
    assert set(ADDED) <= set(peers.METHODS)
    assert set(peers.MAPPINGS) == set(peers.METHODS) | set(peers.PEER_CHECKS)


def test_versus_peers_gdumb_steps_are_its_memorys_batches(peers):
    # GDumb trains each task on its class-balanced memory, not the task's data.
    y = lambda *counts: torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    first = (None, y(3, 300))
    second = (None, torch.cat([torch.full((10,), 2), torch.full((100,), 3)]))
    # Capacity 100: 50 per class (class 0 has only 3), then 25 per class of 4.
    assert peers.class_balanced_sizes([first, second], 100) == [3 + 50, 3 + 25 + 10 + 25]
    # Capacity 101 over 4 classes: the first (in order of arrival) gets the extra sample.
    assert peers.class_balanced_sizes([(None, y(40, 40, 40, 40))], 101) == [26 + 25 * 3]
    setup = peers.replace(peers.DEFAULT, **peers.QUICK)
    data = peers.load_data(setup)
    sizes = peers.class_balanced_sizes(data.train, peers.MEMORY_SIZE)
    assert peers.expected_steps(setup, data, "gdumb") == sum(-(-s // 128) for s in sizes)


def test_versus_peers_gdumb_memory_sizes_are_those_of_our_gdumb(peers):
    from neurenix.continual import GDumb

    setup = peers.replace(peers.DEFAULT, **peers.QUICK)
    data = peers.load_data(setup)
    gdumb = GDumb(torch.nn.Linear(data.inputs, data.classes), memory_size=peers.MEMORY_SIZE, seed=0)
    held = []
    for task, (x, y) in enumerate(data.train):
        order = torch.argsort(y, stable=True)  # classes arrive in ascending order, as the function assumes
        gdumb.add_to_memory(x[order], y[order], task)
        held.append(len(gdumb.memory))
    assert peers.class_balanced_sizes(data.train, peers.MEMORY_SIZE) == held


def test_versus_peers_iCaRL_and_BiC_are_measured_by_their_own_prediction(peers):
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    icarl = peers.make_method("icarl", net, seed=0)
    bic = peers.make_method("bic", net, seed=0)
    assert peers.predictor_of(icarl) is icarl[0].classifier
    assert peers.predictor_of(bic) is bic[0].classifier
    assert peers.predictor_of(peers.make_method("gem", net, seed=0)) is None
    # task_accuracies scores with the predictor given, the network in eval mode meanwhile.
    seen_modes = []

    def predictor(inputs):
        seen_modes.append(net.training)
        return torch.nn.functional.one_hot(torch.full((inputs.shape[0],), 2), 3).float()

    tests = [(torch.randn(4, 4), torch.tensor([2, 2, 0, 1]))]
    net.train()
    assert peers.task_accuracies(net, tests, predictor=predictor) == [0.5]
    assert seen_modes == [False] and net.training


def test_versus_peers_maps_the_memory_methods_onto_avalanches_settings(peers):
    per_task = peers.MEMORY_SIZE // peers.NUM_TASKS
    # GEM, A-GEM: their memory is per task; in the last task ours holds that much of each earlier one.
    assert peers.peer_settings("gem") == {"patterns_per_experience": per_task, "memory_strength": peers.GEM_MARGIN}
    assert peers.peer_settings("agem") == {"patterns_per_experience": per_task, "sample_size": peers.AGEM_REFERENCE_SIZE}
    # DER (beta 0) and DER++: the same memory batch size as our replay_ratio gives.
    der, derpp = peers.peer_settings("der"), peers.peer_settings("derpp")
    assert der["batch_size_mem"] == derpp["batch_size_mem"] == round(peers.REPLAY_RATIO * 128) == 64
    assert (der["alpha"], der["beta"], derpp["beta"]) == (peers.DER_ALPHA, 0.0, peers.DERPP_BETA)
    assert peers.peer_settings("er_ace") == {"mem_size": peers.MEMORY_SIZE, "batch_size_mem": 64}
    # iCaRL: exemplars per new sample as when 1,000 exemplars are shuffled into a task of 12,000.
    assert peers.peer_settings("icarl") == {"memory_size": peers.MEMORY_SIZE}
    assert round(peers.icarl_replay_ratio(12_000) * 128) == 11
    # BiC: 1,000 replayed and 100 held out on both sides (theirs beside mem_size, ours inside).
    bic = peers.peer_settings("bic")
    held_out = round(bic["val_percentage"] * bic["mem_size"])
    ours = peers.make_method("bic", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)), 0)[0]
    assert (ours.memory_size - held_out, held_out) == (bic["mem_size"], 100)
    assert ours.held_out * ours.memory_size == pytest.approx(held_out)
    assert peers.peer_settings("gdumb") == {"mem_size": peers.MEMORY_SIZE}


def test_versus_peers_er_ace_loss_is_twice_avalanches_when_every_unit_is_seen(peers):
    # Avalanche's ACECriterion: (CE(buffer; all units) + CE(incoming; units of its classes)) / 2.
    # Ours: CE(incoming; its classes' units) + CE(buffer; the classes seen). With every unit seen
    # the two differ by the factor 2 the mapping states (which Adam does not see, up to its ε).
    from neurenix.continual import functional as CF
    from neurenix.continual.er_ace import mask_absent_classes

    torch.manual_seed(0)
    incoming, y_in = torch.randn(6, 5), torch.tensor([3, 4, 3, 4, 4, 3])
    buffer, y_buffer = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    present = torch.unique(y_in)
    one_hot = F.one_hot(y_in, 5)[:, present].float()
    current = -(one_hot * torch.log_softmax(incoming[:, present], dim=1)).sum(1).mean()
    theirs = (F.cross_entropy(buffer, y_buffer) + current) / 2
    seen = torch.ones(5, dtype=torch.bool)
    ours = F.cross_entropy(mask_absent_classes(incoming, y_in), y_in) + F.cross_entropy(CF.masked_logits(buffer, seen), y_buffer)
    torch.testing.assert_close(ours, 2 * theirs)


@pytest.mark.skipif(importlib.util.find_spec("quadprog") is not None, reason="this Python has quadprog")
def test_versus_peers_worker_says_gem_needs_quadprog_and_how_to_install_it(peers):
    worker = load_script(peers.WORKER)
    with pytest.raises(RuntimeError, match=r"GEMPlugin needs the quadprog package, missing under .*-m pip install quadprog"):
        worker._plugin("gem", peers.peer_settings("gem"))


@pytest.mark.skipif(PEER_PYTHON is None, reason="VERSUS_PEERS_PYTHON names no Python with avalanche-lib 0.6.0")
def test_versus_peers_runs_avalanches_side_of_every_added_method(peers):
    report = peers.main(["--quick", "--threads", "1", "--methods", ",".join(ADDED), "--peer-python", PEER_PYTHON])
    m = report["measurements"]
    assert {f"avalanche/{method}" for method in ADDED} <= set(m)
    assert all(len(m[f"avalanche/{method}"]["task_accuracies"][0]) == 5 for method in ADDED)
    assert report["mapping"]["bic"]["settings"]["mem_size"] == peers.MEMORY_SIZE
