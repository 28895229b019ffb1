"""The reports of ``neurenix compare``: the table, ``results.json``, ``config.yaml`` and the plot.

The plot is drawn with Pillow (which TensorBoard already brings), so the command needs no
plotting library: one panel per method, each task's test accuracy against the training step,
task boundaries dashed; with several seeds, each task's mean curve with error bars of ± one
standard deviation. Tasks are named by their ids, from 0 (:func:`~neurenix.cli.runs.task_label`),
as TensorBoard's ``accuracy/task_0`` and the Neurenix continual-learning API name them.

Over several seeds every metric is given as mean ± the sample standard deviation (ddof=1:
the seeds are a sample of the seeds one could run), and the time as the mean of one run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image, ImageDraw

import neurenix
from neurenix.cli.output import RUN_FILES, TENSORBOARD
from neurenix.cli.runs import DataSource, MethodRun, run_seed, task_label
from neurenix.data.benchmarks import TaskSequence
from neurenix.metrics.drawing import font

__all__ = [
    "METRICS", "STD_NOTE", "Summary", "describe", "draw_forgetting_curves", "mean_std", "method_line", "results_document",
    "results_table", "summarize", "write_reports",
]

_SCENARIO_NAMES = {"task": "task-incremental", "domain": "domain-incremental", "class": "class-incremental"}
#: Matplotlib's "tab10" colours: one per task, distinct for up to ten tasks.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
#: The metrics of a run, as results.json names them.
METRICS = ("average_accuracy", "backward_transfer", "forgetting", "forward_transfer")
#: Which standard deviation the reports give.
STD_NOTE = "sample standard deviation over the seeds (ddof=1)"
#: What the table prints for a metric a run does not define (joint's BWT and forgetting).
UNDEFINED = "\u2014"
#: One benchmark, or the benchmark of each seed (each seed draws its own class order or permutations).
Benchmarks = Union[TaskSequence, Mapping[int, TaskSequence]]


def _by_seed(settings: Any, benchmarks: Benchmarks) -> dict[int, TaskSequence]:
    if isinstance(benchmarks, Mapping):
        return dict(benchmarks)
    return {run_seed(settings): benchmarks}


# ---------------------------------------------------------------------------- over seeds
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof=1) of ``values``; nan where a value is nan (std: also for one value)."""
    if any(math.isnan(value) for value in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class Summary:
    """One method's runs (one per seed) and their aggregates.

    Attributes:
        name: the method.
        runs: its runs, in the order of the seeds.
        mean: metric (:data:`METRICS`) -> mean over the seeds (nan where a run does not define it).
        std: metric -> sample standard deviation (ddof=1) over the seeds; nan with one seed.
        wall_time: the mean time of one run, in seconds.
    """

    name: str
    runs: list[MethodRun]
    mean: dict[str, float]
    std: dict[str, float]
    wall_time: float

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


def summarize(runs: Sequence[MethodRun]) -> list[Summary]:
    """The runs grouped by method (in the order methods first appear), with their means and standard deviations."""
    grouped: dict[str, list[MethodRun]] = {}
    for run in runs:
        grouped.setdefault(run.name, []).append(run)
    summaries = []
    for name, group in grouped.items():
        stats = {metric: mean_std([getattr(run, metric) for run in group]) for metric in METRICS}
        summaries.append(Summary(
            name, group, {metric: mean for metric, (mean, _) in stats.items()},
            {metric: std for metric, (_, std) in stats.items()}, statistics.fmean(run.wall_time for run in group),
        ))
    return summaries


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


# ---------------------------------------------------------------------------- the text
def describe(settings: Any, benchmarks: Benchmarks, data: DataSource) -> str:
    """One line: benchmark, the data read (and from where), scenario, task ids and their classes, epochs, seeds.

    ``benchmarks``: the benchmark, or each seed's; with several seeds the classes of each task
    differ by seed (results.json lists them).
    """
    by_seed = _by_seed(settings, benchmarks)
    benchmark = next(iter(by_seed.values()))
    title = f"{settings.benchmark} {_data(data)}, {_SCENARIO_NAMES[settings.scenario]}"
    tasks = f"tasks 0-{benchmark.num_tasks - 1}"
    if settings.benchmark == "split" and len(by_seed) == 1:
        tasks += " (classes " + " | ".join(",".join(map(str, group)) for group in benchmark.task_classes) + ")"
    elif settings.benchmark == "split":
        size = len(benchmark.task_classes[0])
        tasks += f" ({size} class{'' if size == 1 else 'es'} each, drawn per seed: results.json lists them)"
    epochs = f"{settings.epochs} epoch{'' if settings.epochs == 1 else 's'} per task"
    seeds = f"seed {next(iter(by_seed))}" if len(by_seed) == 1 else f"seeds {_seed_list(list(by_seed))}"
    return f"{title}, {tasks}, {epochs}, {seeds}"


def _data(data: DataSource) -> str:
    """``digits``, ``MNIST from data/MNIST/raw``, ``Fashion-MNIST (--dataset mnist) from ...``."""
    text = data.name
    if data.requested is not None:
        text += f" (--dataset {data.requested})"
    if data.folder is not None:
        text += f" from {data.folder}"
    return text


def method_line(run: MethodRun, with_seed: bool = False) -> str:
    """The line a finished run prints on a terminal (``with_seed``: its seed after its name)."""
    label = f"{run.name} seed {run.seed}" if with_seed else run.name
    return f"{label:<13} done in {run.wall_time:5.1f}s  average accuracy {_cell(run.average_accuracy, 0)}"


def _cell(value: float, width: int, signed: bool = False) -> str:
    if math.isnan(value):
        return UNDEFINED.rjust(width)
    return f"{value:+{width}.3f}" if signed else f"{value:{width}.3f}"


def _spread(mean: float, std: float, width: int, signed: bool = False) -> str:
    """``0.812 ± 0.010`` (``—`` where the mean is undefined)."""
    if math.isnan(mean):
        return UNDEFINED.rjust(width)
    return f"{_cell(mean, 0, signed)} \u00b1 {std:.3f}".rjust(width)


def results_table(runs: Sequence[MethodRun]) -> str:
    """The table: average accuracy, backward transfer, forgetting and wall time per method.

    With several seeds per method, each metric is mean ± the sample standard deviation
    (ddof=1) over them, and the time the mean of one run.
    """
    summaries = summarize(runs)
    several = any(len(summary.runs) > 1 for summary in summaries)
    lines = _rows(summaries, several)
    lines.append("avg acc: mean test accuracy over all tasks after the last; BWT: mean change of earlier tasks'")
    lines.append("accuracy since they were learned; forgetting: mean drop from each earlier task's best accuracy.")
    if any(math.isnan(summary.mean[metric]) for summary in summaries for metric in METRICS[:3]):
        lines.append(f"{UNDEFINED}: not defined (joint trains once, on every task: no sequence, nothing to forget).")
    if several:
        seeds = sorted({seed for summary in summaries for seed in summary.seeds})
        lines.append(f"mean \u00b1 sample standard deviation (ddof=1) over seeds {_seed_list(seeds)}; time: mean of one run.")
    return "\n".join(lines)


def _rows(summaries: Sequence[Summary], several: bool) -> list[str]:
    if not several:
        lines = [f"{'method':<13} {'avg acc':>8} {'BWT':>8} {'forgetting':>11} {'time':>8}"]
        for summary in summaries:
            mean = summary.mean
            lines.append(
                f"{summary.name:<13} {_cell(mean['average_accuracy'], 8)} {_cell(mean['backward_transfer'], 8, signed=True)} "
                f"{_cell(mean['forgetting'], 11)} {summary.wall_time:7.1f}s"
            )
        return lines
    lines = [f"{'method':<13} {'avg acc':>14} {'BWT':>15} {'forgetting':>14} {'time':>8}"]
    for summary in summaries:
        mean, std = summary.mean, summary.std
        lines.append(
            f"{summary.name:<13} {_spread(mean['average_accuracy'], std['average_accuracy'], 14)} "
            f"{_spread(mean['backward_transfer'], std['backward_transfer'], 15, signed=True)} "
            f"{_spread(mean['forgetting'], std['forgetting'], 14)} {summary.wall_time:7.1f}s"
        )
    return lines


# ---------------------------------------------------------------------------- results.json
def _number(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def _matrix(values: Any) -> Any:
    return [_matrix(v) for v in values] if isinstance(values, list) else _number(values)


def _tasks(benchmark: TaskSequence) -> dict[str, Any]:
    return {
        "task_classes": benchmark.task_classes,
        "train_sizes": [len(task) for task in benchmark.train], "test_sizes": [len(task) for task in benchmark.test],
    }


def _run_document(run: MethodRun) -> dict[str, Any]:
    """One run's metrics, time, matrix, logs and curves."""
    return {
        **{metric: _number(getattr(run, metric)) for metric in METRICS},
        "wall_time_s": run.wall_time,
        "accuracy_matrix": _matrix(run.matrix.tolist()),  # [after task i][on task j]
        "initial_accuracy": _matrix(run.initial.tolist()),
        "tensorboard": run.log_dir,
        "curves": {key: [list(point) for point in points] for key, points in run.curves.items() if key.startswith("accuracy/")},
    }


def _settings(settings: Any, seeds: list[int]) -> dict[str, Any]:
    """The settings as given, with the seeds resolved: ``seed`` for one, ``seeds`` for several."""
    values = {}
    for key, value in settings.as_dict().items():
        if key == "seed":  # in the place of --seed
            values.update({"seed": seeds[0]} if len(seeds) == 1 else {"seeds": seeds})
        elif key not in ("config", "seeds"):
            values[key] = value
    return values


def results_document(settings: Any, benchmarks: Benchmarks, data: DataSource, runs: Sequence[MethodRun]) -> dict[str, Any]:
    """``results.json``: settings, the benchmark, and per method its metrics, matrix and curves (``null`` for nan).

    Lists per task are indexed by task id (from 0); the matrix is ``[after task i][on task j]``.
    With several seeds, the benchmark's classes and sizes are given per seed (``per_seed``), and
    each method holds ``mean`` and ``std`` (:data:`STD_NOTE`) of each metric, the mean
    ``wall_time_s`` of one run, and under ``seeds`` each seed's run as one seed's run is given.
    """
    by_seed = _by_seed(settings, benchmarks)
    seeds = list(by_seed)
    benchmark = next(iter(by_seed.values()))
    described = {
        "name": settings.benchmark, "dataset": settings.dataset, "scenario": benchmark.scenario,
        "data": data.name, "data_folder": None if data.folder is None else str(data.folder),
        "num_tasks": benchmark.num_tasks, "num_classes": benchmark.num_classes,
    }
    document = {"neurenix": neurenix.__version__, "settings": _settings(settings, seeds)}
    if len(seeds) == 1:
        methods = {run.name: {"hyperparameters": run.hyperparameters, **_run_document(run)} for run in runs}
        return {**document, "benchmark": {**described, **_tasks(benchmark)}, "methods": methods}
    methods = {
        summary.name: {
            "hyperparameters": summary.runs[0].hyperparameters,
            "mean": {metric: _number(value) for metric, value in summary.mean.items()},
            "std": {metric: _number(value) for metric, value in summary.std.items()},
            "wall_time_s": summary.wall_time,
            "seeds": {str(run.seed): _run_document(run) for run in summary.runs},
        }
        for summary in summarize(runs)
    }
    per_seed = {str(seed): _tasks(benchmark) for seed, benchmark in by_seed.items()}
    return {**document, "seeds": seeds, "std": STD_NOTE, "benchmark": {**described, "per_seed": per_seed}, "methods": methods}


def write_reports(
    settings: Any, benchmarks: Benchmarks, data: DataSource, runs: Sequence[MethodRun], output: Path, config_yaml: str
) -> dict[str, Path]:
    """Write ``results.json``, ``config.yaml`` and ``forgetting_curves.png``; returns label -> path of all the run wrote."""
    output.mkdir(parents=True, exist_ok=True)
    results, config, plot = (output / name for name in RUN_FILES)
    paths = {"TensorBoard": output / TENSORBOARD, "results": results, "config": config, "plot": plot}
    results.write_text(json.dumps(results_document(settings, benchmarks, data, runs), indent=1) + "\n")
    config.write_text(config_yaml)
    num_tasks = next(iter(_by_seed(settings, benchmarks).values())).num_tasks
    draw_forgetting_curves(runs, num_tasks, describe(settings, benchmarks, data)).save(plot)
    return paths


# ---------------------------------------------------------------------------- the plot
_PANEL_W, _PANEL_H, _MARGIN_L, _MARGIN_B, _MARGIN_T = 420, 260, 46, 34, 30
_HEADER = 58


def draw_forgetting_curves(runs: Sequence[MethodRun], num_tasks: int, title: str) -> Image.Image:
    """One panel per method: each task's accuracy (y, 0..1) against the global step (x).

    A method run with several seeds is drawn as each task's mean curve over them (point by
    point: the same epoch ends, at their mean step), with error bars of ± one standard
    deviation (ddof=1).
    """
    summaries = summarize(runs)
    columns = min(len(summaries), 3)
    rows = math.ceil(len(summaries) / columns)
    heading = "Forgetting curves: " + title
    caption = "test accuracy of every task (thin before the task is trained) against the training step"
    if any(len(summary.runs) > 1 for summary in summaries):
        caption = "mean test accuracy over the seeds (bars: \u00b1 1 sample std) of every task (thin before it is trained)"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    # wide enough for the panels, the title, and the legend beside the caption
    legend = 12 + 80 * num_tasks
    width = max(columns * _PANEL_W + 20, measure(heading, font=font(15)) + 24, legend + measure(caption, font=font(12)) + 24)
    image = Image.new("RGB", (math.ceil(width), rows * _PANEL_H + _HEADER + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), heading, fill="black", font=font(15))
    draw.text((image.width - 12 - draw.textlength(caption, font=font(12)), 36), caption, fill="#555555", font=font(12))
    x = 12
    for task in range(num_tasks):  # the legend: one colour per task
        draw.line((x, 40, x + 18, 40), fill=_PALETTE[task % len(_PALETTE)], width=3)
        draw.text((x + 22, 33), task_label(task), fill="black", font=font(12))
        x += 80
    for index, summary in enumerate(summaries):
        left = 10 + (index % columns) * _PANEL_W
        top = _HEADER + (index // columns) * _PANEL_H
        _panel(draw, summary, num_tasks, (left, top))
    return image


#: A curve: its points (step, accuracy), and each point's standard deviation over the seeds (empty for one seed).
_Curve = tuple[list[tuple[float, float]], list[float]]


def _mean_curves(runs: Sequence[MethodRun]) -> dict[str, _Curve]:
    """Each logged curve averaged over the runs point by point (the seeds' steps differ with their tasks' sizes)."""
    curves = {}
    for key in runs[0].curves:
        series = [run.curves.get(key, []) for run in runs]
        length = min(len(points) for points in series)
        if len(runs) == 1:
            curves[key] = ([(float(step), value) for step, value in series[0]], [])
            continue
        points, errors = [], []
        for index in range(length):
            mean, std = mean_std([points_[index][1] for points_ in series])
            points.append((statistics.fmean(points_[index][0] for points_ in series), mean))
            errors.append(std)
        curves[key] = (points, errors)
    return curves


def _subtitle(summary: Summary) -> str:
    several = len(summary.runs) > 1
    mean, std = summary.mean, summary.std
    text = f"{summary.name}: avg acc {mean['average_accuracy']:.3f}"
    text += f" \u00b1 {std['average_accuracy']:.3f}" if several else ""
    if not math.isnan(mean["backward_transfer"]):
        text += f", BWT {mean['backward_transfer']:+.3f}"
        text += f" \u00b1 {std['backward_transfer']:.3f}" if several else ""
    return text + (f" ({len(summary.runs)} seeds)" if several else "")


def _panel(draw: ImageDraw.ImageDraw, summary: Summary, num_tasks: int, origin: tuple[int, int]) -> None:
    left, top = origin
    x0, x1 = left + _MARGIN_L, left + _PANEL_W - 14
    y0, y1 = top + _PANEL_H - _MARGIN_B, top + _MARGIN_T  # y0: accuracy 0, y1: accuracy 1
    small = font(11)
    draw.text((x0, top + 8), _subtitle(summary), fill="black", font=font(13))
    curves = _mean_curves(summary.runs)
    ends = [step for step, _ in curves.get("continual/average_accuracy", ([], []))[0]]
    last = max([1, *ends, *(step for points, _ in curves.values() for step, _ in points)])

    def px(step: float, accuracy: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * step / last, y0 - (y0 - y1) * accuracy

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = px(0, tick)[1]
        draw.line((x0, y, x1, y), fill="#e6e6e6")
        draw.text((left + 8, y - 7), f"{tick:.2f}", fill="#555555", font=small)
    joint = summary.runs[0].training == "joint"  # one fit on every task: no boundaries, every task trained from 0
    starts = [0.0] * num_tasks if joint else [0, *ends[:-1]]
    labels = [(f"one fit on tasks 0-{num_tasks - 1}", 0.0, last)] if joint else [
        (task_label(task), start, end) for task, (start, end) in enumerate(zip(starts, ends))
    ]
    for label, start, end in labels:
        if end < last:  # a boundary between tasks, dashed
            x = px(end, 0)[0]
            for y in range(int(y1), int(y0), 8):
                draw.line((x, y, x, min(y + 4, y0)), fill="#999999")
        middle = (px(start, 0)[0] + px(end, 0)[0]) / 2
        draw.text((middle - draw.textlength(label, font=small) / 2, y0 + 6), label, fill="#555555", font=small)
    draw.rectangle((x0, y1, x1, y0), outline="#888888")
    for task in range(num_tasks):
        curve, errors = curves.get(f"accuracy/task_{task}", ([], []))
        begins = starts[task] if task < len(starts) else last  # the step at which task `task` starts training
        _curve(draw, curve, errors, begins, _PALETTE[task % len(_PALETTE)], px)


def _curve(draw: ImageDraw.ImageDraw, curve: list, errors: list, begins: float, colour: str, px: Any) -> None:
    """One task's curve: thin before ``begins`` (not trained on yet: forward transfer), its points, their error bars."""
    before = [px(step, accuracy) for step, accuracy in curve if step <= begins]
    after = before[-1:] + [px(step, accuracy) for step, accuracy in curve if step > begins]
    for points, width in ((before, 1), (after, 2)):
        if len(points) > 1:
            draw.line(points, fill=colour, width=width, joint="curve")
    for (step, accuracy), error in zip(curve, errors):
        if math.isnan(error):
            continue
        (x, low), (_, high) = px(step, max(accuracy - error, 0.0)), px(step, min(accuracy + error, 1.0))
        draw.line((x, low, x, high), fill=colour, width=1)
        draw.line((x - 3, low, x + 3, low), fill=colour, width=1)
        draw.line((x - 3, high, x + 3, high), fill=colour, width=1)
    for x, y in before + after:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
