"""benchmarks/si_step_bound.py in its smoke mode, and the check that its fused SI step does SI's work.

No timing is judged here: the tests check that a run reports every variant with positive
numbers, and that the fused reference it times equals ``functional.si_step_`` plus the penalty
(and that the check would notice if it did not).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_benchmarks_smoke import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "si_step_bound.py"


@pytest.fixture(scope="module")
def bound():
    return load_script(SCRIPT)


def test_a_quick_run_reports_every_variant(bound, tmp_path):
    threads = torch.get_num_threads()
    path = tmp_path / "bound.json"
    report = bound.main(["--quick", "--no-compile", "--threads", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert torch.get_num_threads() == threads
    assert set(report["rows"]) == {"none", "ewc", "si"} and report["compile"] is None
    params = sum(p.numel() for p in bound.reference_mlp(quick=True).parameters())
    assert report["parameter_bytes"] == 4 * params
    for name, row in report["rows"].items():
        assert row["step_us"] > 0 and math.isfinite(row["step_us"]), name
        assert row["state_bytes_moved"] == row["state_arrays_moved"] * 4 * params, name
    assert report["rows"]["si"]["state_arrays_moved"] == 9 and report["rows"]["ewc"]["state_arrays_moved"] == 3
    assert report["rows"]["si"]["kernels_in_step_us"] > 0 and report["rows"]["none"]["implied_gb_per_s"] is None


def test_the_fused_reference_does_what_si_step_and_the_penalty_do(bound):
    params = list(bound.reference_mlp(quick=True).parameters())
    state = bound.make_state(params, with_path=True, seed=5)
    assert bound.check_same_work(bound.si_fused_reference, params, state) < 1e-6


def test_the_check_notices_a_fused_step_that_does_other_work(bound):
    params = list(bound.reference_mlp(quick=True).parameters())
    state = bound.make_state(params, with_path=True, seed=5)

    def records_the_inf(omega, pending_grads, pending_params, params, grads, anchors, weights):
        for om, pg, pp, p, g, a, w in zip(omega, pending_grads, pending_params, params, grads, anchors, weights):
            om.add_(pg * (pp - p))
            pg.copy_(g)  # the bug SI had: a skipped step's inf kept
            pp.copy_(p)
            g.add_(bound.SCALE * w * (p - a))

    with pytest.raises(AssertionError, match="differs from si_step_"):
        bound.check_same_work(records_the_inf, params, state)
