"""The ``neurenix`` command end to end: its table against what it logged to TensorBoard."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neurenix.cli import build_parser, check_settings, main
from neurenix.cli_compare import METHOD_SETTINGS, METHODS
from neurenix.metrics import functional as MF

EXAMPLE = Path(__file__).parents[1] / "examples" / "compare.yaml"
# Three tasks of three digits, one epoch each: a real sequence in a few seconds.
RUN = ["--methods", "none", "ewc", "replay", "--epochs", "1", "--num_tasks", "3", "--seed", "3", "--accelerator", "cpu"]
METRICS = ("average_accuracy", "backward_transfer", "forgetting")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the command in this process: (exit status, stdout, results.json, output folder)."""
    output = tmp_path_factory.mktemp("run")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main([*RUN, "--output", str(output)])
    results = json.loads((output / "results.json").read_text()) if status == 0 else None
    return status, stdout.getvalue(), results, output


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed table's rows by method; progress bars share lines through carriage returns."""
    lines = [part for line in stdout.splitlines() for part in line.split("\r")]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "avg"])
    rows = {}
    for line in lines[header + 1 :]:
        cells = line.split()
        if len(cells) != 5 or cells[0] not in METHODS:
            break
        rows[cells[0]] = cells[1:]
    return rows


def _last_scalars(log_dir: str) -> dict[str, tuple[int, float]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: (events.Scalars(tag)[-1].step, events.Scalars(tag)[-1].value) for tag in events.Tags()["scalars"]}


def test_the_run_prints_a_row_per_method_and_the_paths_of_what_it_wrote(run):
    status, stdout, results, output = run
    assert status == 0
    assert list(_table(stdout)) == ["none", "ewc", "replay"] == list(results["methods"])
    for name in ("tensorboard", "results.json", "config.yaml", "forgetting_curves.png"):
        assert str(output / name) in stdout
    benchmark = results["benchmark"]
    assert benchmark["num_tasks"] == 3 and benchmark["scenario"] == "domain" and benchmark["num_classes"] == 3
    classes = [c for group in benchmark["task_classes"] for c in group]
    assert [len(group) for group in benchmark["task_classes"]] == [3, 3, 3] and len(set(classes)) == 9


def test_table_equals_results_json_which_equals_the_logged_scalars_and_the_matrix_metrics(run):
    _, stdout, results, _ = run
    table = _table(stdout)
    for name, method in results["methods"].items():
        matrix = torch.tensor(method["accuracy_matrix"], dtype=torch.float64)
        assert not matrix.isnan().any()  # every task measured after every task
        # the table rounds results.json
        printed = dict(zip(METRICS, map(float, table[name][:3])))
        for metric in METRICS:
            assert printed[metric] == pytest.approx(round(method[metric], 3), abs=5e-4), (name, metric)
        assert float(table[name][3].rstrip("s")) == pytest.approx(method["wall_time_s"], abs=0.051)
        # results.json holds the metrics of its own matrix (neurenix.metrics.functional)...
        assert method["average_accuracy"] == pytest.approx(float(MF.average_accuracy(matrix)), abs=1e-12)
        assert method["backward_transfer"] == pytest.approx(float(MF.backward_transfer(matrix)), abs=1e-12)
        assert method["forgetting"] == pytest.approx(float(MF.forgetting(matrix)), abs=1e-12)
        # ...and the values TensorBoard got at the end of the last task (float32 there), from one
        # event file: a file per task would be read back in name order, "...10" before "...9"
        assert len(list(Path(method["tensorboard"]).glob("events.out.tfevents.*"))) == 1
        logged = _last_scalars(method["tensorboard"])
        last_step = logged["continual/average_accuracy"][0]
        for metric in METRICS:
            step, value = logged[f"continual/{metric}"]
            assert step == last_step and value == pytest.approx(method[metric], abs=1e-6), (name, metric)
        for task in range(3):
            step, value = logged[f"accuracy/task_{task}"]
            assert step == last_step and value == pytest.approx(float(matrix[-1, task]), abs=1e-6)
            assert method["curves"][f"accuracy/task_{task}"][-1] == [last_step, pytest.approx(value, abs=1e-6)]


def test_the_methods_learn_each_task_and_the_baseline_forgets(run):
    methods = run[2]["methods"]
    for name, method in methods.items():
        diagonal = torch.tensor(method["accuracy_matrix"]).diagonal()
        assert (diagonal > 0.5).all(), (name, diagonal)  # three classes per task: chance is 1/3
    assert methods["none"]["forgetting"] > 0.1  # one shared head: fine-tuning overwrites earlier tasks
    assert methods["replay"]["forgetting"] < methods["none"]["forgetting"]
    assert methods["ewc"]["hyperparameters"]["importance"] == dataclasses.asdict(METHOD_SETTINGS["ewc"]())["importance"]


def test_forgetting_curves_plot_is_an_image_with_a_panel_per_method(run):
    with Image.open(run[3] / "forgetting_curves.png") as image:
        image.verify()
    with Image.open(run[3] / "forgetting_curves.png") as image:
        width, height = image.size
        assert image.format == "PNG" and 800 <= width <= 4000 and 250 <= height <= 4000
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20  # curves, not a blank page


def test_a_yaml_config_gives_the_settings_the_flags_give(tmp_path):
    flags = ["--scenario", "task", "--methods", "si", "l2", "--epochs", "2", "--si.importance", "7.5", "--devices", "1"]
    config = tmp_path / "run.yaml"
    config.write_text("scenario: task\nmethods: [si, l2]\nepochs: 2\nsi:\n  importance: 7.5\ndevices: 1\n")
    parser = build_parser()
    from_flags = parser.parse_args(["compare", *flags]).compare
    from_file = parser.parse_args(["compare", "--config", str(config)]).compare
    assert from_file.pop("config") and from_flags.pop("config") is None
    assert from_file == from_flags
    assert from_file.si.importance == 7.5 and from_file.si.xi == METHOD_SETTINGS["si"]().xi  # unset keys keep defaults
    # flags after --config win
    assert parser.parse_args(["compare", "--config", str(config), "--epochs", "3"]).compare.epochs == 3


def test_the_example_config_and_a_printed_config_are_valid_settings(tmp_path, capsys):
    parser = build_parser()
    check_settings(parser.parse_args(["compare", "--config", str(EXAMPLE)]).compare)
    assert main(["--print_config", "--epochs", "2"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert parser.parse_args(["compare", "--config", str(printed)]).compare.epochs == 2


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    options = ["--config", "--print_config", "--benchmark", "--dataset", "--data_root", "--download", "--scenario",
               "--num_tasks", "--methods", "--epochs", "--batch_size", "--lr", "--hidden", "--seed", "--accelerator",
               "--devices", "--strategy", "--threads", "--output"]
    for name, settings in METHOD_SETTINGS.items():
        options += [f"--{name}.{field.name}" for field in dataclasses.fields(settings)]
    missing = [option for option in options if not re.search(rf"{re.escape(option)}\b", text)]
    assert not missing
    assert all(method in text for method in METHODS) and "results.json" in text and "Exit status" in text


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--methods", "none", "sgd"], 2, "unknown method 'sgd'"),
        (["--epochs", "-2"], 2, "--epochs must be >= 1, got -2"),
        (["--scenario", "online"], 2, "invalid choice: 'online'"),
        (["--dataset", "mnist", "--data_root", "{tmp}"], 1, "no mnist data"),
        (["--ewc.importance", "-1"], 2, "--ewc.importance must be >= 0"),
        (["--num_tasks", "20"], 2, "--num_tasks must be at most 10"),
        (["--batch-size", "8"], 2, "nrecognized arguments: --batch-size"),  # "Unrecognized" before jsonargparse 4.40
        (["--ewc.fisher", "fake"], 2, "--ewc.fisher must be one of"),
        (["--config", "{tmp}/missing.yaml"], 2, "--config"),
        (["--strategy", "no_such_strategy"], 2, "--accelerator/--devices/--strategy"),
    ],
)
def test_bad_options_end_with_one_line_and_a_nonzero_status(argv, status, says, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main([*argv, "--output", str(tmp_path / "out")]) == status
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("neurenix: error: ") and says in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # nothing ran


def test_the_installed_console_script_shows_its_help():
    script = shutil.which("neurenix")
    if script is None:
        pytest.skip("the package is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: neurenix") and "--methods" in result.stdout and "--replay.memory_size" in result.stdout


def test_help_and_option_errors_import_neither_torch_nor_lightning():
    # They answered after ~3 s of imports; only a run needs the libraries (cli_compare).
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from neurenix.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['--epochs', '0']) == 2\n"
        "print('torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "--epochs must be >= 1, got 0" in done.stderr
