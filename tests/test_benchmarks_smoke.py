"""benchmarks/continual_overhead.py end to end in its smoke mode (``--quick``, tiny sizes, digits).

Nothing here looks at how fast anything is (a test machine's speed proves nothing): the tests
check that one run measures everything it promises, as positive finite numbers, that EWC's
Fisher equals the per-sample reference loop's, and that the comparison would notice if it
did not.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "continual_overhead.py"
METHODS = ("ewc", "l2", "si", "replay", "distillation", "der", "derpp", "er_ace", "agem", "gem", "mas", "rwalk", "icarl", "bic")
#: Measured as whole sequences only (GDumb has no training step of its own).
SEQUENCE_ONLY = ("gdumb",)
#: The methods issue 7 set step targets for (issue 15 set none: its methods are reported only).
TARGETED = ("ewc", "l2", "si", "replay", "distillation")


def load_script(path: Path = SCRIPT) -> ModuleType:
    """The benchmark script at ``path`` as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def run(script, tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(returned report, report read back from --json, torch threads before the run)``."""
    path = tmp_path_factory.mktemp("benchmark") / "overhead.json"
    threads = torch.get_num_threads()
    returned = script.main(["--quick", "--data", "digits", "--threads", "1", "--json", str(path)])
    return returned, json.loads(path.read_text()), threads


def numbers(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON tree that is a number (bools are not), with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from numbers(value, f"{path}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_the_json_file_holds_the_report_main_returns(run):
    returned, written, _ = run
    assert written == json.loads(json.dumps(returned))
    assert written["setup"]["threads"] == 1 and written["setup"]["data"] == "digits"
    assert written["machine"]["torch"] == torch.__version__


def test_every_measurement_is_a_positive_finite_number(run):
    _, report, _ = run
    found = dict(numbers(report["measurements"]))
    assert len(found) > 100
    bad = {path: value for path, value in found.items() if not (math.isfinite(value) and value > 0)}
    assert not bad


def test_every_method_is_in_every_table_with_one_time_per_repetition(run):
    _, report, _ = run
    m, repeats = report["measurements"], report["setup"]["repeats"]
    tables = {
        "step_lightning": ("plain", *METHODS),
        "step_standalone": ("handwritten", *METHODS),
        "step_standalone_first_task": METHODS,
        "consolidation": ("epoch", "ewc_fisher", "fisher_per_sample_loop", *METHODS),
        "sequence": ("plain", *METHODS, *SEQUENCE_ONLY),
    }
    for table, rows in tables.items():
        rounds = report["sequence_repeats"] if table == "sequence" else repeats
        for row in rows:
            entry = m[table][row]
            assert len(entry["times_s"]) == len(entry["cpu_times_s"]) == rounds, (table, row)
            assert min(entry["times_s"]) <= entry["median_s"] <= max(entry["times_s"]), (table, row)
            if row != "epoch":
                assert "ratio" in entry and "cpu_ratio" in entry, (table, row)
    assert m["step_lightning"]["plain"]["ratio"] == 1.0 and m["sequence"]["plain"]["ratio"] == 1.0
    assert set(m["memory"]) == set(METHODS) | set(SEQUENCE_ONLY)
    assert m["sequence"]["steps_per_task"] == report["setup"]["sequence_steps"]


def test_ewc_fisher_equals_the_per_sample_reference_loop(run):
    _, report, _ = run
    check = report["fisher_check"]
    assert check["equal"] is True
    assert check["samples"] == report["setup"]["reference_samples"]
    assert check["max_diff_relative_to_largest"] < 1e-4


def test_every_target_is_evaluated(run):
    _, report, _ = run
    targets = {target["measure"]: target for target in report["targets"]}
    for door in ("step_lightning", "step_standalone", "step_standalone_first_task"):
        assert {f"{door}/{name}" for name in TARGETED} <= set(targets)
        assert not {f"{door}/{name}" for name in METHODS if name not in TARGETED} & set(targets)
    assert {"consolidation/ewc_fisher", "consolidation/fisher_speedup", "fisher_check/equal"} <= set(targets)
    assert targets["fisher_check/equal"]["met"] is True
    assert all(isinstance(target["met"], bool) for target in targets.values())


def test_memory_counts_the_state_each_method_keeps(run, script):
    _, report, _ = run
    memory, params = report["measurements"]["memory"], report["model_parameter_bytes"]
    # Anchors are one copy of the parameters (plus small bookkeeping); EWC keeps a Fisher and an
    # anchor per task; SI an anchor and its importance.
    assert memory["l2"]["state_dict_bytes"] >= params
    assert memory["si"]["state_dict_bytes"] >= 2 * params
    assert memory["ewc"]["state_dict_bytes"] >= 2 * 5 * params
    assert memory["distillation"]["state_dict_bytes"] >= params
    # The rehearsal methods hold every sample of the (short) stream; DER also each one's logits
    # (float32, one per class) beside what replay stores of it.
    setup = report["setup"]
    stored = min(script.MEMORY_SIZE, 5 * setup["sequence_steps"] * setup["batch_size"])
    sample_bytes = 64 * 4  # a digit: 64 float32 pixels
    for name in ("replay", "der", "derpp", "er_ace", "agem", "gem"):
        assert memory[name]["state_dict_bytes"] >= stored * sample_bytes, name
    logits = stored * 10 * 4
    assert memory["der"]["state_dict_bytes"] - memory["replay"]["state_dict_bytes"] >= logits
    assert memory["derpp"]["state_dict_bytes"] == memory["der"]["state_dict_bytes"]


def test_the_run_leaves_torch_threads_as_it_found_them(run):
    *_, threads = run
    assert torch.get_num_threads() == threads


def test_the_fisher_comparison_notices_different_values(script):
    reference = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    assert script.compare_fisher({k: v.clone() for k, v in reference.items()}, reference)["equal"]
    off = {"w": torch.tensor([1.0, 2.0, 3.01]), "b": torch.tensor([0.5])}
    result = script.compare_fisher(off, reference)
    assert result["equal"] is False and result["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def test_per_sample_fisher_is_the_mean_squared_per_sample_gradient(script):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    fisher = script.per_sample_fisher(net, [(x[:2], y[:2]), (x[2:], y[2:])], count=3)
    expected = torch.zeros_like(net[0].weight)
    for i in range(3):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        expected += net[0].weight.grad.square() / 3
    torch.testing.assert_close(fisher["0.weight"], expected)


# ---------------------------------------------------------------------------- benchmarks/versus_peers.py
# Our side of the peer comparison in its smoke mode, the hyper-parameter mapping and the worker's
# shared helpers; the Avalanche side needs its own virtual environment (VERSUS_PEERS_PYTHON names
# its Python to run that part too).
PEERS_SCRIPT = SCRIPT.parent / "versus_peers.py"
PEER_PYTHON = os.environ.get("VERSUS_PEERS_PYTHON")


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load_script(PEERS_SCRIPT)


@pytest.fixture(scope="module")
def peers_run(peers, tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    path = tmp_path_factory.mktemp("peers") / "versus.json"
    returned = peers.main(["--quick", "--threads", "1", "--rounds", "2", "--methods", "naive,ewc,lwf", "--json", str(path)])
    return returned, json.loads(path.read_text())


def test_versus_peers_measures_each_variant_once_per_round_against_the_loop(peers_run):
    returned, written = peers_run
    assert written == json.loads(json.dumps(returned))
    m = written["measurements"]
    assert list(m) == ["loop", "lightning", "ours/naive", "ours/ewc", "ours/lwf"]  # no peer: our side only
    assert m["loop"]["ratio"] == 1.0
    for name, entry in m.items():
        assert len(entry["times_s"]) == 2 and all(t > 0 for t in entry["times_s"]), name
        assert entry["ratio"] == pytest.approx(entry["median_s"] / m["loop"]["median_s"]), name
        # Round r is seed r: one accuracy per task per round, each a fraction of a test set.
        assert [len(round_) for round_ in entry["task_accuracies"]] == [5, 5], name
        assert all(0.0 <= a <= 1.0 for round_ in entry["task_accuracies"] for a in round_), name
        assert entry["average_accuracies"] == pytest.approx([sum(r) / 5 for r in entry["task_accuracies"]]), name
    assert written["steps_per_sequence"] == 15  # digits: 5 tasks of 2 or 3 batches of 128


def test_versus_peers_without_a_method_gives_the_same_model_on_every_path(peers_run):
    # The loop and our path with no callback start from the same weights and draw their batches
    # from the same seeded permutations, so they end with the same accuracies.
    _, report = peers_run
    m = report["measurements"]
    assert m["ours/naive"]["task_accuracies"] == m["loop"]["task_accuracies"]


def test_versus_peers_table_has_a_row_per_method_and_the_mapping(peers_run):
    _, report = peers_run
    rows = report["table"].splitlines()
    assert rows[0].startswith("| variant | ours s (x loop) | Avalanche s (x loop) | ours / Avalanche")
    assert [row.split("|")[1].strip() for row in rows[2:]] == [
        "plain PyTorch loop", "plain Lightning, stock DataLoader", "naive", "ewc", "lwf"]
    ewc = rows[5].split("|")
    assert ewc[2].strip() == f"{report['measurements']['ours/ewc']['median_s']:.2f} ({report['measurements']['ours/ewc']['ratio']:.2f}x)"
    assert ewc[3].strip() == "-"  # no Avalanche in this environment
    assert set(report["mapping"]) == {"naive", "ewc", "lwf", "ewc_batch"}
    assert report["mapping"]["ewc"]["settings"] == {"ewc_lambda": 500.0, "mode": "separate"}
    # One row per mapped method, each with its five cells (a stray "|" in a text would add one).
    mapping_rows = report["mapping_table"].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in mapping_rows] == ["naive", "ewc", "lwf", "ewc_batch"]
    assert all(row.count("|") == 6 for row in mapping_rows)


def test_versus_peers_mapping_texts_fit_in_a_markdown_table(peers):
    rows = peers.mapping_table(peers.METHODS + tuple(peers.PEER_CHECKS)).splitlines()[2:]
    assert len(rows) == len(peers.METHODS) + len(peers.PEER_CHECKS)
    assert all(row.count("|") == 6 for row in rows)


def test_versus_peers_runs_ours_and_avalanches_of_each_method_side_by_side(peers):
    setup = peers.replace(peers.DEFAULT, methods=("naive", "ewc"))
    assert peers.round_order(setup) == [
        "loop", "avalanche/loop", "lightning",
        "ours/naive", "avalanche/naive", "ours/ewc", "avalanche/ewc", "avalanche/ewc_batch",
    ]
    assert peers.peer_methods(setup) == ["loop", "naive", "ewc", "ewc_batch"]
    # The EWC check runs only where EWC itself does.
    assert peers.peer_methods(peers.replace(setup, methods=("si",))) == ["loop", "si"]


def test_versus_peers_maps_each_penalty_onto_avalanches_definition(peers):
    # EWC: their λ·ΣF(θ-θ*)² is our importance/2·ΣF(θ-θ*)²; SI: their λ/2·ΣΩ(θ-θ*)² is our
    # importance·ΣΩ(θ-θ*)², with ξ as their eps.
    assert peers.peer_settings("ewc")["ewc_lambda"] == peers.EWC_IMPORTANCE / 2
    assert peers.peer_settings("ewc_batch")["ewc_lambda"] == peers.EWC_IMPORTANCE / 2 * 128
    assert peers.peer_settings("si")["si_lambda"] / 2 == peers.SI_IMPORTANCE
    assert peers.peer_settings("si")["eps"] == peers.SI_XI
    # MAS and RWalk: no ½ on either side; RWalk's moving average and interval are ours.
    assert peers.peer_settings("mas")["lambda_reg"] == peers.MAS_IMPORTANCE
    assert peers.peer_settings("rwalk") == {"ewc_lambda": peers.RWALK_IMPORTANCE, "ewc_alpha": peers.RWALK_ALPHA,
                                            "delta_t": peers.RWALK_INTERVAL}
    replay = peers.peer_settings("replay")
    assert replay["mem_size"] == peers.MEMORY_SIZE and replay["batch_size_mem"] == round(peers.REPLAY_RATIO * 128)
    with pytest.raises(ValueError, match="method must be one of .* got 'l2'"):
        peers.peer_settings("l2")


def test_versus_peers_lwf_mapping_gives_our_loss_up_to_the_factor_one_minus_alpha(peers):
    from neurenix.continual.functional import distillation_loss

    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(4, 6, (8,))
    seen = torch.zeros(10, dtype=torch.bool)
    seen[:4] = True  # the classes of the tasks before
    alpha, temperature = peers.DISTILLATION_ALPHA, peers.TEMPERATURE
    ce = torch.nn.functional.cross_entropy(student, y)
    ours = (1 - alpha) * ce + alpha * distillation_loss(student, teacher, temperature, units=seen)
    # Avalanche's LwF: CE + alpha' · KL(softmax(teacher/T) ‖ softmax(student/T)) over the seen units, batchmean.
    log_p = torch.log_softmax(student[:, :4] / temperature, dim=1)
    q = torch.softmax(teacher[:, :4] / temperature, dim=1)
    theirs = ce + peers.peer_settings("lwf")["alpha"] * torch.nn.functional.kl_div(log_p, q, reduction="batchmean")
    torch.testing.assert_close(ours, (1 - alpha) * theirs)


def test_versus_peers_worker_model_loads_the_benchmark_models_weights(peers, script):
    setup = script.replace(script.PRESETS["mlp"], hidden=(6, 5))
    reference = script.build_net(setup, 4, 3)
    net = peers.build_mlp(4, (6, 5), 3)
    net.load_state_dict(reference.state_dict())  # same names and shapes: the worker loads our weights
    x = torch.randn(7, 4)
    torch.testing.assert_close(net(x), reference(x))


def test_versus_peers_accuracy_is_per_task_over_the_whole_head(peers):
    net = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3, 2))  # predicts class 0 when x[0] is largest, 1 when x[1] is
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    tests = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([0, 2]))]
    net.train()
    assert peers.task_accuracies(net, tests, batch_size=1) == [1.0, 0.5]
    assert net.training  # the mode it had


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ewc,l2"], "--methods must list some of naive,ewc,si,lwf,replay,mas,rwalk,gem,agem,der,derpp,er_ace,icarl,bic,gdumb, got 'ewc,l2'"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--peer-python", "/nonexistent/python"], "--peer-python must be an executable Python, got '/nonexistent/python'"),
    ],
)
def test_versus_peers_refuses_bad_options_naming_them(peers, capsys, argv, message):
    with pytest.raises(SystemExit):
        peers.parse_setup(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("avalanche") is not None, reason="this Python has Avalanche")
def test_versus_peers_says_why_a_python_without_avalanche_cannot_be_the_peer(peers, tmp_path):
    setup = peers.replace(peers.DEFAULT, **peers.QUICK)
    data = peers.load_data(setup)
    path = tmp_path / "data.pt"
    peers.write_peer_data(path, setup, data)
    with pytest.raises(RuntimeError, match=r"did not start(.|\n)*No module named 'avalanche'"):
        peers.PeerWorker(sys.executable, path, 1, tmp_path / "worker.log")


@pytest.mark.skipif(PEER_PYTHON is None, reason="VERSUS_PEERS_PYTHON names no Python with avalanche-lib 0.6.0")
def test_versus_peers_runs_the_avalanche_side(peers):
    report = peers.main(["--quick", "--threads", "1", "--methods", "naive,ewc", "--peer-python", PEER_PYTHON])
    m = report["measurements"]
    assert {"avalanche/loop", "avalanche/naive", "avalanche/ewc", "avalanche/ewc_batch"} <= set(m)
    assert report["peer"]["avalanche"] == "0.6.0"
    assert all(len(m[name]["task_accuracies"][0]) == 5 for name in m)
