"""The command's reports: the description line, the plot (its task labels), results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from neurenix.cli.parser import build_parser
from neurenix.cli.report import describe, draw_forgetting_curves, mean_std, results_document, results_table, summarize, write_reports
from neurenix.cli.runs import DataSource, MethodRun, task_label
from neurenix.data import split_benchmark


def method_run(name: str, num_tasks: int, steps_per_task: int = 10) -> MethodRun:
    """A run as run_method returns it: each task measured after each task (accuracy falls after its own)."""
    ends = [steps_per_task * (task + 1) for task in range(num_tasks)]
    matrix = torch.tensor([[0.9 - 0.1 * (i - j) if j <= i else 0.1 for j in range(num_tasks)] for i in range(num_tasks)])
    curves = {f"accuracy/task_{j}": [(end, float(matrix[i, j])) for i, end in enumerate(ends)] for j in range(num_tasks)}
    curves["continual/average_accuracy"] = [(end, float(matrix[i, : i + 1].mean())) for i, end in enumerate(ends)]
    return MethodRun(name, {}, matrix, torch.full((num_tasks,), 0.1), 0.8, -0.1, 0.1, 0.0, 1.5, f"tb/{name}", curves)


@pytest.fixture
def drawn_texts(monkeypatch) -> list[str]:
    """Every string drawn on an image while the test runs."""
    texts: list[str] = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, content, *args, **kwargs):
        texts.append(content)
        return original(self, xy, content, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def test_a_task_is_labelled_by_its_id_from_zero():
    assert [task_label(task) for task in range(3)] == ["task 0", "task 1", "task 2"]


def test_the_plot_names_the_tasks_by_their_ids_in_the_legend_and_under_each_panel(drawn_texts):
    # It said tasks 1-3 while TensorBoard, results.json and the API said task_0..task_2.
    draw_forgetting_curves([method_run("none", 3), method_run("ewc", 3)], 3, "a title")
    labels = [text for text in drawn_texts if text.startswith("task ")]
    assert labels == ["task 0", "task 1", "task 2"] * 3  # the legend, then under each of the two panels


def test_the_plot_is_an_image_with_a_panel_per_method():
    image = draw_forgetting_curves([method_run(name, 3) for name in ("none", "ewc", "replay", "si")], 3, "title")
    width, height = image.size
    assert 800 <= width <= 4000 and 250 <= height <= 4000
    assert height > 2 * 260  # four panels, three a row: two rows
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20  # curves, not a blank page


def settings(**changes):
    values = build_parser().parse_args(["compare"]).compare
    for key, value in changes.items():
        values[key] = value
    return values


@pytest.fixture(scope="module")
def digits():
    return split_benchmark("digits", num_tasks=5, classes_per_task=2, seed=0, scenario="domain")


@pytest.mark.parametrize(
    ("data", "dataset_text"),
    [
        (DataSource("digits"), "digits"),
        (DataSource("MNIST", Path("data/MNIST/raw")), "MNIST from data/MNIST/raw"),
        (DataSource("Fashion-MNIST", Path("/fm"), requested="mnist"), "Fashion-MNIST (--dataset mnist) from /fm"),
    ],
)
def test_the_description_names_the_data_read_its_folder_and_the_task_ids(digits, data, dataset_text):
    line = describe(settings(), digits, data)
    assert line == (
        f"split {dataset_text}, domain-incremental, tasks 0-4 (classes 4,1 | 7,5 | 3,9 | 0,8 | 6,2), 4 epochs per task, seed 0"
    )


def test_a_permuted_description_has_no_classes(digits):
    line = describe(settings(benchmark="permuted", epochs=1), digits, DataSource("digits"))
    assert line == "permuted digits, domain-incremental, tasks 0-4, 1 epoch per task, seed 0"


def test_results_json_names_the_data_and_indexes_tasks_by_id(digits, tmp_path):
    runs = [method_run("none", 5)]
    data = DataSource("MNIST", tmp_path / "MNIST" / "raw")
    document = results_document(settings(), digits, data, runs)
    assert document["benchmark"]["data"] == "MNIST" and document["benchmark"]["data_folder"] == str(data.folder)
    assert list(document["methods"]["none"]["curves"]) == [f"accuracy/task_{task}" for task in range(5)]
    paths = write_reports(settings(), digits, data, runs, tmp_path, "epochs: 4\n")
    assert paths == {
        "TensorBoard": tmp_path / "tensorboard", "results": tmp_path / "results.json",
        "config": tmp_path / "config.yaml", "plot": tmp_path / "forgetting_curves.png",
    }
    assert json.loads(paths["results"].read_text()) == json.loads(json.dumps(document))
    assert paths["config"].read_text() == "epochs: 4\n"
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG"


# ---------------------------------------------------------------------------- several seeds (issue 18)
def seeded_run(name: str, seed: int, shift: float, num_tasks: int = 3, training: str = "sequential") -> MethodRun:
    """``method_run`` with its seed, its metrics moved by ``shift`` and its time ``1 + shift``."""
    run = method_run(name, num_tasks)
    run.seed, run.training = seed, training
    run.average_accuracy, run.backward_transfer, run.forgetting = 0.8 + shift, -0.1 - shift, 0.1 + shift
    run.wall_time = 1.0 + shift
    run.curves = {key: [(step + seed, value + shift) for step, value in points] for key, points in run.curves.items()}
    return run


def joint_run(seed: int) -> MethodRun:
    run = seeded_run("joint", seed, 0.0, training="joint")
    run.backward_transfer = run.forgetting = float("nan")
    return run


SEEDED = [seeded_run("none", 0, 0.0), seeded_run("none", 1, 0.1), seeded_run("none", 2, 0.2), joint_run(0), joint_run(1), joint_run(2)]


def test_with_several_seeds_the_table_gives_mean_and_sample_std_and_the_mean_time():
    lines = results_table(SEEDED).splitlines()
    assert lines[0].split() == ["method", "avg", "acc", "BWT", "forgetting", "time"]
    # none: 0.8, 0.9, 1.0 -> mean 0.9, sample std 0.1 (population std would be 0.082); times 1.0, 1.1, 1.2
    assert lines[1].split() == ["none", "0.900", "±", "0.100", "-0.200", "±", "0.100", "0.200", "±", "0.100", "1.1s"]
    assert lines[2].split() == ["joint", "0.800", "±", "0.000", "—", "—", "1.0s"]  # undefined: a dash, not nan
    assert lines[-2] == "—: not defined (joint trains once, on every task: no sequence, nothing to forget)."
    assert lines[-1] == "mean ± sample standard deviation (ddof=1) over seeds 0, 1, 2; time: mean of one run."


def test_one_seed_keeps_the_one_run_table():
    lines = results_table([method_run("none", 3)]).splitlines()
    assert lines[1].split() == ["none", "0.800", "-0.100", "0.100", "1.5s"] and len(lines) == 4


def test_summaries_hold_the_mean_and_the_sample_std_of_each_metric():
    none, joint = summarize(SEEDED)
    assert none.seeds == [0, 1, 2] and none.wall_time == pytest.approx(1.1)
    assert none.mean["average_accuracy"] == pytest.approx(0.9) and none.std["average_accuracy"] == pytest.approx(0.1)
    assert mean_std([1.0, 2.0]) == (1.5, pytest.approx(2 ** -0.5))  # ddof=1
    assert np.isnan(joint.mean["forgetting"]) and np.isnan(mean_std([1.0])[1])


def test_results_json_with_several_seeds_holds_every_run_and_the_aggregates(tmp_path):
    benchmarks = {seed: split_benchmark("digits", num_tasks=3, classes_per_task=3, seed=seed, scenario="domain") for seed in (0, 1, 2)}
    document = results_document(settings(seeds=[0, 1, 2], num_tasks=3), benchmarks, DataSource("digits"), SEEDED)
    assert document["seeds"] == [0, 1, 2] and document["std"] == "sample standard deviation over the seeds (ddof=1)"
    assert document["settings"]["seeds"] == [0, 1, 2] and "seed" not in document["settings"]
    per_seed = document["benchmark"]["per_seed"]
    assert list(per_seed) == ["0", "1", "2"] and per_seed["1"]["task_classes"] == benchmarks[1].task_classes
    none = document["methods"]["none"]
    assert none["mean"]["average_accuracy"] == pytest.approx(0.9) and none["std"]["backward_transfer"] == pytest.approx(0.1)
    assert none["wall_time_s"] == pytest.approx(1.1) and list(none["seeds"]) == ["0", "1", "2"]
    assert none["seeds"]["1"]["average_accuracy"] == pytest.approx(0.9)
    assert none["seeds"]["2"]["accuracy_matrix"] == SEEDED[2].matrix.tolist()
    joint = document["methods"]["joint"]
    assert joint["mean"]["backward_transfer"] is None and joint["std"]["forgetting"] is None  # null, not NaN
    json.dumps(document, allow_nan=False)


def test_the_description_names_the_seeds(digits):
    benchmarks = {seed: split_benchmark("digits", num_tasks=5, classes_per_task=2, seed=seed, scenario="domain") for seed in (0, 1)}
    line = describe(settings(seeds=[0, 1], epochs=1), benchmarks, DataSource("digits"))
    assert line == (
        "split digits, domain-incremental, tasks 0-4 (2 classes each, drawn per seed: results.json lists them), "
        "1 epoch per task, seeds 0, 1"
    )
    assert describe(settings(seed=3), {3: digits}, DataSource("digits")).endswith("4 epochs per task, seed 3")


def test_the_plot_of_several_seeds_draws_mean_curves_with_error_bars(drawn_texts, monkeypatch):
    lines = []
    original = ImageDraw.ImageDraw.line

    def line(self, xy, *args, **kwargs):
        lines.append(tuple(xy))
        return original(self, xy, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "line", line)
    def bars() -> list:  # vertical lines 2 std long (a panel's accuracy axis is 196 pixels)
        return [xy for xy in lines if len(xy) == 4 and xy[0] == xy[2] and abs(abs(xy[1] - xy[3]) - 2 * 0.02 * 196) < 0.5]

    draw_forgetting_curves([seeded_run("none", seed, 0.02 * seed) for seed in range(3)], 3, "title")
    assert "none: avg acc 0.820 ± 0.020, BWT -0.120 ± 0.020 (3 seeds)" in drawn_texts
    assert any("± 1 sample std" in text for text in drawn_texts)
    assert len(bars()) == 3 * 3  # an error bar at each of the 3 points of each task's curve
    lines.clear()
    draw_forgetting_curves(SEEDED[:1], 3, "title")  # one seed: no bars
    assert not bars()


def test_a_joint_panel_is_labelled_as_one_fit_on_every_task(drawn_texts):
    draw_forgetting_curves([joint_run(0)], 3, "title")
    assert "one fit on tasks 0-2" in drawn_texts and "task 1" not in drawn_texts[4:]
