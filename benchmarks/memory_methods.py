"""The memory-based methods side by side over seeds and memory sizes, through the ``neurenix`` command.

Each (seed, memory size) is one run of the command (``python -m neurenix``) with every method
given the same memory; fine-tuning ("none") needs no memory and runs once per seed. The runs
go ``--jobs`` at a time (one CPU thread each), then a table of mean ± standard deviation over
the seeds of average accuracy and forgetting after the last task is printed and written, with
every run's ``results.json`` summarized in one JSON file.

The docs' table (split Fashion-MNIST, class-incremental, 5 tasks, the overhead benchmark's
MLP 784-400-400-10, batch 128, Adam 1e-3, 1 epoch per task)::

    python benchmarks/memory_methods.py --data_root /usr/share/datasets/fashion-mnist \\
        --seeds 0 1 2 --memory 200 500 --output runs/memory-methods

Extra arguments after ``--`` go to every command unchanged (``-- --epochs 4``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Methods with a memory, as the command names them, and the flag that sets it.
MEMORY_METHODS = ("replay", "der", "derpp", "er_ace", "agem", "gem")


def command(
    dataset: str, data_root: str, seed: int, methods: list[str], memory: int | None, output: Path, extra: list[str]
) -> list[str]:
    """One ``neurenix`` run: the protocol of the module docstring."""
    argv = [
        sys.executable, "-m", "neurenix", "--dataset", dataset, "--data_root", data_root,
        "--scenario", "class", "--hidden", "400", "--batch_size", "128", "--epochs", "1",
        "--seed", str(seed), "--methods", *methods, "--output", str(output), "--overwrite", "--threads", "1",
    ]
    if memory is not None:
        for method in methods:
            argv += [f"--{method}.memory_size", str(memory)]
    return argv + extra


def run(argv: list[str]) -> Path:
    """Run one command in its own process; its results file."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return Path(argv[argv.index("--output") + 1]) / "results.json"


def run_here(argv: list[str]) -> Path:
    """Run one command in this process (``--jobs 1``: no interpreter start per run)."""
    from neurenix.cli import main as neurenix

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = neurenix(argv[3:])  # without "python -m neurenix"
    if status != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {status}:\n{printed.getvalue()[-2000:]}")
    return Path(argv[argv.index("--output") + 1]) / "results.json"


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(arguments: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "mnist", "digits"))
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--memory", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--methods", nargs="+", default=list(MEMORY_METHODS), choices=MEMORY_METHODS)
    parser.add_argument("--output", type=Path, default=Path("runs/memory-methods"))
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once, each in its own process (1: one after the other, in this one)")
    argv = sys.argv[1:] if arguments is None else arguments
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    options = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    plans = [("none", None, seed, command(options.dataset, options.data_root, seed, ["none"], None, options.output / f"none-seed{seed}", extra))
             for seed in options.seeds]
    plans += [("memory", memory, seed,
               command(options.dataset, options.data_root, seed, options.methods, memory, options.output / f"memory{memory}-seed{seed}", extra))
              for memory in options.memory for seed in options.seeds]
    if options.jobs == 1:
        files = [run_here(plan[3]) for plan in plans]
    else:
        with ThreadPoolExecutor(options.jobs) as pool:
            files = list(pool.map(run, [plan[3] for plan in plans]))

    per_run: dict[tuple[str, Any], dict[str, list[float]]] = {}
    for (_, memory, _, _), path in zip(plans, files):
        for method, result in json.loads(path.read_text())["methods"].items():
            row = per_run.setdefault((method, memory), {"average_accuracy": [], "forgetting": [], "wall_time_s": []})
            for key in row:
                row[key].append(result[key])
    rows = [{"method": method, "memory": memory, **{key: summary(values) for key, values in row.items()},
             "per_seed": row} for (method, memory), row in per_run.items()]
    report = {"seeds": options.seeds, "argv": [plan[3][2:] for plan in plans], "rows": rows}
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "summary.json").write_text(json.dumps(report, indent=1))
    print(markdown(rows, len(options.seeds)))
    return report


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    lines = [f"| method | memory | average accuracy (mean ± std, {seeds} seeds) | forgetting | time per run |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        acc, forgetting, time = row["average_accuracy"], row["forgetting"], row["wall_time_s"]
        lines.append(f"| {row['method']} | {row['memory'] or '-'} | {acc['mean']:.3f} ± {acc['std']:.3f} | "
                     f"{forgetting['mean']:.3f} ± {forgetting['std']:.3f} | {time['mean']:.1f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
