"""The reports of ``neurenix compare``: the table, ``results.json``, ``config.yaml`` and the plot.

The plot is drawn with Pillow (which TensorBoard already brings), so the command needs no
plotting library: one panel per method, each task's test accuracy against the training step,
task boundaries dashed. Tasks are named by their ids, from 0 (:func:`~neurenix.cli.runs.task_label`),
as TensorBoard's ``accuracy/task_0`` and the Neurenix continual-learning API name them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw

import neurenix
from neurenix.cli.output import RUN_FILES, TENSORBOARD
from neurenix.cli.runs import DataSource, MethodRun, task_label
from neurenix.metrics.drawing import font

__all__ = ["describe", "draw_forgetting_curves", "method_line", "results_document", "results_table", "write_reports"]

_SCENARIO_NAMES = {"task": "task-incremental", "domain": "domain-incremental", "class": "class-incremental"}
#: Matplotlib's "tab10" colours: one per task, distinct for up to ten tasks.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def describe(settings: Any, benchmark: Any, data: DataSource) -> str:
    """One line: benchmark, the data read (and from where), scenario, task ids and their classes, epochs, seed."""
    title = f"{settings.benchmark} {_data(data)}, {_SCENARIO_NAMES[settings.scenario]}"
    tasks = f"tasks 0-{benchmark.num_tasks - 1}"
    if settings.benchmark == "split":
        tasks += " (classes " + " | ".join(",".join(map(str, group)) for group in benchmark.task_classes) + ")"
    epochs = f"{settings.epochs} epoch{'' if settings.epochs == 1 else 's'} per task"
    return f"{title}, {tasks}, {epochs}, seed {settings.seed}"


def _data(data: DataSource) -> str:
    """``digits``, ``MNIST from data/MNIST/raw``, ``Fashion-MNIST (--dataset mnist) from ...``."""
    text = data.name
    if data.requested is not None:
        text += f" (--dataset {data.requested})"
    if data.folder is not None:
        text += f" from {data.folder}"
    return text


def method_line(run: MethodRun) -> str:
    return f"{run.name:<13} done in {run.wall_time:5.1f}s  average accuracy {run.average_accuracy:.3f}"


def _cell(value: float, width: int, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a".rjust(width)
    return f"{value:+{width}.3f}" if signed else f"{value:{width}.3f}"


def results_table(runs: Sequence[MethodRun]) -> str:
    """The table: average accuracy, backward transfer, forgetting and wall time per method."""
    lines = [f"{'method':<13} {'avg acc':>8} {'BWT':>8} {'forgetting':>11} {'time':>8}"]
    for run in runs:
        lines.append(
            f"{run.name:<13} {_cell(run.average_accuracy, 8)} {_cell(run.backward_transfer, 8, signed=True)} "
            f"{_cell(run.forgetting, 11)} {run.wall_time:7.1f}s"
        )
    lines.append("avg acc: mean test accuracy over all tasks after the last; BWT: mean change of earlier tasks'")
    lines.append("accuracy since they were learned; forgetting: mean drop from each earlier task's best accuracy.")
    return "\n".join(lines)


def _number(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def _matrix(values: Any) -> Any:
    return [_matrix(v) for v in values] if isinstance(values, list) else _number(values)


def results_document(settings: Any, benchmark: Any, data: DataSource, runs: Sequence[MethodRun]) -> dict[str, Any]:
    """``results.json``: settings, the benchmark, and per method its metrics, matrix and curves (``null`` for nan).

    Lists per task are indexed by task id (from 0); the matrix is ``[after task i][on task j]``.
    """
    return {
        "neurenix": neurenix.__version__,
        "settings": {key: value for key, value in settings.as_dict().items() if key != "config"},
        "benchmark": {
            "name": settings.benchmark, "dataset": settings.dataset, "scenario": benchmark.scenario,
            "data": data.name, "data_folder": None if data.folder is None else str(data.folder),
            "num_tasks": benchmark.num_tasks, "num_classes": benchmark.num_classes, "task_classes": benchmark.task_classes,
            "train_sizes": [len(task) for task in benchmark.train], "test_sizes": [len(task) for task in benchmark.test],
        },
        "methods": {
            run.name: {
                "hyperparameters": run.hyperparameters,
                "average_accuracy": _number(run.average_accuracy),
                "backward_transfer": _number(run.backward_transfer),
                "forgetting": _number(run.forgetting),
                "forward_transfer": _number(run.forward_transfer),
                "wall_time_s": run.wall_time,
                "accuracy_matrix": _matrix(run.matrix.tolist()),  # [after task i][on task j]
                "initial_accuracy": _matrix(run.initial.tolist()),
                "tensorboard": run.log_dir,
                "curves": {key: [list(point) for point in points] for key, points in run.curves.items() if key.startswith("accuracy/")},
            }
            for run in runs
        },
    }


def write_reports(
    settings: Any, benchmark: Any, data: DataSource, runs: Sequence[MethodRun], output: Path, config_yaml: str
) -> dict[str, Path]:
    """Write ``results.json``, ``config.yaml`` and ``forgetting_curves.png``; returns label -> path of all the run wrote."""
    output.mkdir(parents=True, exist_ok=True)
    results, config, plot = (output / name for name in RUN_FILES)
    paths = {"TensorBoard": output / TENSORBOARD, "results": results, "config": config, "plot": plot}
    results.write_text(json.dumps(results_document(settings, benchmark, data, runs), indent=1) + "\n")
    config.write_text(config_yaml)
    draw_forgetting_curves(runs, benchmark.num_tasks, describe(settings, benchmark, data)).save(plot)
    return paths


# ---------------------------------------------------------------------------- the plot
_PANEL_W, _PANEL_H, _MARGIN_L, _MARGIN_B, _MARGIN_T = 420, 260, 46, 34, 30
_HEADER = 58


def draw_forgetting_curves(runs: Sequence[MethodRun], num_tasks: int, title: str) -> Image.Image:
    """One panel per method: each task's accuracy (y, 0..1) against the global step (x)."""
    columns = min(len(runs), 3)
    rows = math.ceil(len(runs) / columns)
    image = Image.new("RGB", (columns * _PANEL_W + 20, rows * _PANEL_H + _HEADER + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), "Forgetting curves: " + title, fill="black", font=font(15))
    caption = "test accuracy of every task (thin before the task is trained) against the training step"
    draw.text((image.width - 12 - draw.textlength(caption, font=font(12)), 36), caption, fill="#555555", font=font(12))
    x = 12
    for task in range(num_tasks):  # the legend: one colour per task
        draw.line((x, 40, x + 18, 40), fill=_PALETTE[task % len(_PALETTE)], width=3)
        draw.text((x + 22, 33), task_label(task), fill="black", font=font(12))
        x += 80
    for index, run in enumerate(runs):
        left = 10 + (index % columns) * _PANEL_W
        top = _HEADER + (index // columns) * _PANEL_H
        _panel(draw, run, num_tasks, (left, top))
    return image


def _panel(draw: ImageDraw.ImageDraw, run: MethodRun, num_tasks: int, origin: tuple[int, int]) -> None:
    left, top = origin
    x0, x1 = left + _MARGIN_L, left + _PANEL_W - 14
    y0, y1 = top + _PANEL_H - _MARGIN_B, top + _MARGIN_T  # y0: accuracy 0, y1: accuracy 1
    small = font(11)
    subtitle = f"{run.name}: avg acc {run.average_accuracy:.3f}"
    if not math.isnan(run.backward_transfer):
        subtitle += f", BWT {run.backward_transfer:+.3f}"
    draw.text((x0, top + 8), subtitle, fill="black", font=font(13))
    ends = [step for step, _ in run.curves.get("continual/average_accuracy", [])]
    last = max([1, *ends, *(step for points in run.curves.values() for step, _ in points)])

    def px(step: float, accuracy: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * step / last, y0 - (y0 - y1) * accuracy

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = px(0, tick)[1]
        draw.line((x0, y, x1, y), fill="#e6e6e6")
        draw.text((left + 8, y - 7), f"{tick:.2f}", fill="#555555", font=small)
    starts = [0, *ends[:-1]]
    for task, (start, end) in enumerate(zip(starts, ends)):
        if end < last:  # a boundary between tasks, dashed
            x = px(end, 0)[0]
            for y in range(int(y1), int(y0), 8):
                draw.line((x, y, x, min(y + 4, y0)), fill="#999999")
        label = task_label(task)
        middle = (px(start, 0)[0] + px(end, 0)[0]) / 2
        draw.text((middle - draw.textlength(label, font=small) / 2, y0 + 6), label, fill="#555555", font=small)
    draw.rectangle((x0, y1, x1, y0), outline="#888888")
    for task in range(num_tasks):
        curve = run.curves.get(f"accuracy/task_{task}", [])
        begins = starts[task] if task < len(starts) else last  # the step at which task `task` starts training
        colour = _PALETTE[task % len(_PALETTE)]
        before = [px(step, accuracy) for step, accuracy in curve if step <= begins]
        after = before[-1:] + [px(step, accuracy) for step, accuracy in curve if step > begins]
        for points, width in ((before, 1), (after, 2)):  # thin: not trained on yet (forward transfer)
            if len(points) > 1:
                draw.line(points, fill=colour, width=width, joint="curve")
        for x, y in before + after:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
