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
