"""The command's reports: the description line, the plot (its task labels), results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from neurenix.cli.parser import build_parser
from neurenix.cli.report import describe, draw_forgetting_curves, results_document, write_reports
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
