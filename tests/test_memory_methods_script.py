"""benchmarks/memory_methods.py: the per-seed results it reads back are the runs' own, and its
table's means and standard deviations are theirs (a tiny run on the digits)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.test_benchmarks_smoke import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_methods.py"


def test_the_summary_holds_every_runs_results_and_their_mean_and_spread(tmp_path, capsys):
    script = load_script(SCRIPT)
    report = script.main(["--dataset", "digits", "--seeds", "0", "1", "--memory", "20", "--methods", "replay",
                          "--output", str(tmp_path), "--jobs", "1", "--", "--hidden", "16", "--batch_size", "32", "--num_tasks", "2"])
    rows = {(row["method"], row["memory"]): row for row in report["rows"]}
    assert set(rows) == {("none", None), ("replay", 20)}
    for (method, memory), row in rows.items():
        folder = "none" if memory is None else f"memory{memory}"
        runs = [json.loads((tmp_path / f"{folder}-seed{seed}" / "results.json").read_text()) for seed in (0, 1)]
        accuracies = [run["methods"][method]["average_accuracy"] for run in runs]
        assert row["per_seed"]["average_accuracy"] == accuracies
        assert row["average_accuracy"] == {"mean": statistics.fmean(accuracies), "std": statistics.stdev(accuracies)}
    assert runs[0]["methods"]["replay"]["hyperparameters"]["memory_size"] == 20
    assert runs[0]["settings"]["batch_size"] == 32 and runs[0]["settings"]["hidden"] == 16  # extra arguments reach the runs
    table = capsys.readouterr().out
    assert f"| replay | 20 | {rows[('replay', 20)]['average_accuracy']['mean']:.3f} ± " in table
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
