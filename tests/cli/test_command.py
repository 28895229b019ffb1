"""The ``neurenix`` command end to end: its output, against what it logged to TensorBoard and wrote."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neurenix.cli import main
from neurenix.cli.settings import METHOD_SETTINGS, METHODS
from neurenix.metrics import functional as MF

# Three tasks of three digits, one epoch each: a real sequence in a few seconds.
RUN = ["--methods", "none", "ewc", "replay", "derpp", "--epochs", "1", "--num_tasks", "3", "--seed", "3", "--accelerator", "cpu"]
# The smallest run: plain fine-tuning, two tasks.
TINY = ["--methods", "none", "--epochs", "1", "--num_tasks", "2", "--accelerator", "cpu"]
METRICS = ("average_accuracy", "backward_transfer", "forgetting")


def run_captured(argv: list[str], stdout: io.StringIO | None = None) -> tuple[int, str]:
    """``main(argv)`` with stdout captured (a StringIO: not a terminal); (exit status, stdout)."""
    stdout = io.StringIO() if stdout is None else stdout
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    return status, stdout.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the command in this process: (exit status, stdout, results.json, output folder)."""
    output = tmp_path_factory.mktemp("run")
    status, stdout = run_captured([*RUN, "--output", str(output)])
    results = json.loads((output / "results.json").read_text()) if status == 0 else None
    return status, stdout, results, output


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed table's rows by method."""
    lines = stdout.splitlines()
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


def test_a_redirected_run_prints_the_description_the_table_and_the_paths_written_and_nothing_else(run):
    status, stdout, results, output = run
    assert status == 0
    assert "\r" not in stdout and "it/s" not in stdout  # no progress bar: stdout is not a terminal
    lines = stdout.splitlines()
    classes = " | ".join(",".join(map(str, group)) for group in results["benchmark"]["task_classes"])
    assert lines[0] == f"split digits, domain-incremental, tasks 0-2 (classes {classes}), 1 epoch per task, seed 3"
    assert lines[1] == "" and lines[2].split() == ["method", "avg", "acc", "BWT", "forgetting", "time"]
    assert list(_table(stdout)) == ["none", "ewc", "replay", "derpp"] == list(results["methods"])
    assert lines[7].startswith("avg acc: mean test accuracy") and lines[8].startswith("accuracy since") and lines[9] == ""
    assert lines[10:] == [
        f"TensorBoard  {output / 'tensorboard'}",
        f"results      {output / 'results.json'}",
        f"config       {output / 'config.yaml'}",
        f"plot         {output / 'forgetting_curves.png'}",
    ]
    assert all(path.exists() for path in (output / "results.json", output / "config.yaml", output / "forgetting_curves.png"))
    benchmark = results["benchmark"]
    assert benchmark["num_tasks"] == 3 and benchmark["scenario"] == "domain" and benchmark["num_classes"] == 3
    assert benchmark["data"] == "digits" and benchmark["data_folder"] is None
    flat = [c for group in benchmark["task_classes"] for c in group]
    assert [len(group) for group in benchmark["task_classes"]] == [3, 3, 3] and len(set(flat)) == 9


def test_table_equals_results_json_which_equals_the_logged_scalars_and_the_matrix_metrics(run):
    _, stdout, results, output = run
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
        # event file in the method's own folder (one run per output folder: no version_N)
        assert Path(method["tensorboard"]) == output / "tensorboard" / name
        assert len(list(Path(method["tensorboard"]).glob("events.out.tfevents.*"))) == 1
        logged = _last_scalars(method["tensorboard"])
        last_step = logged["continual/average_accuracy"][0]
        for metric in METRICS:
            step, value = logged[f"continual/{metric}"]
            assert step == last_step and value == pytest.approx(method[metric], abs=1e-6), (name, metric)
        # task ids from 0 in TensorBoard's tags and results.json's curves alike
        assert sorted(key for key in method["curves"]) == [f"accuracy/task_{task}" for task in range(3)]
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
    assert methods["derpp"]["forgetting"] < methods["none"]["forgetting"]
    assert methods["ewc"]["hyperparameters"]["importance"] == dataclasses.asdict(METHOD_SETTINGS["ewc"]())["importance"]


def test_a_second_run_into_the_same_folder_is_refused_and_leaves_the_first_run_as_it_was(run, capsys):
    output = run[3]
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert main([*TINY, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"neurenix: error: --output {str(output)!r} already holds a run (results.json, config.yaml, "
        "forgetting_curves.png, tensorboard/); choose another folder, or add --overwrite to replace that run's files\n"
    )
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


class _Terminal(io.StringIO):
    """A captured stdout that says it is a terminal, as a console does."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_method_shows_its_bars_labelled_by_task_id_then_a_line(tmp_path):
    status, stdout = run_captured([*TINY, "--output", str(tmp_path / "out")], stdout=_Terminal())
    assert status == 0
    assert "none: task 0 of 0-1, epoch 1/1" in stdout and "none: task 1 of 0-1, epoch 1/1" in stdout
    lines = stdout.split("\n")
    done = next(line for line in lines if "done in" in line)
    assert done.split("\r")[-1].startswith("none          done in")


def test_overwrite_replaces_the_earlier_run_and_keeps_the_files_it_did_not_write(tmp_path):
    output = tmp_path / "out"
    assert run_captured([*TINY, "--methods", "none", "l2", "--output", str(output)])[0] == 0
    first = json.loads((output / "results.json").read_text())
    (output / "notes.txt").write_text("mine")
    (output / "tensorboard" / "l2" / "notes.txt").write_text("mine too")
    status, stdout = run_captured([*TINY, "--seed", "5", "--overwrite", "--output", str(output)])
    assert status == 0
    assert stdout.splitlines()[0] == f"--overwrite: removed the earlier run's 7 files from {output}"
    second = json.loads((output / "results.json").read_text())
    assert list(first["methods"]) == ["none", "l2"] and list(second["methods"]) == ["none"]
    assert second["settings"]["seed"] == 5 and second["settings"]["overwrite"] is True
    # the logs are the new run's alone; what the command never writes stayed
    logs = output / "tensorboard"
    kept = sorted(path.relative_to(logs).as_posix() for path in logs.rglob("*"))
    events = [name for name in kept if name.startswith("none/events.out.tfevents.")]
    assert len(events) == 1 and kept == ["l2", "l2/notes.txt", "none", *events, "none/hparams.yaml"]
    assert (output / "notes.txt").read_text() == "mine"
    # the run's config.yaml replays its settings but gives no permission to delete the next run's folder
    assert "overwrite: false" in (output / "config.yaml").read_text()


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"])
def test_strategies_that_start_processes_from_this_one_are_refused_before_any_starts(strategy, tmp_path, capsys):
    # They died in the children (even with --methods none); ddp runs the command once per device.
    argv = ["--strategy", strategy, "--devices", "2", "--accelerator", "cpu", "--methods", "none", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"neurenix: error: --strategy {strategy}: ")
    assert captured.err.rstrip().endswith("use --strategy ddp") and captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--methods", "none", "sgd"], 2, "unknown method 'sgd'"),
        (["--epochs", "-2"], 2, "--epochs must be >= 1, got -2"),
        (["--scenario", "online"], 2, "invalid choice: 'online'"),
        (["--dataset", "mnist", "--data_root", "{tmp}"], 1, "no mnist data"),
        (["--ewc.importance", "-1"], 2, "--ewc.importance must be >= 0"),
        (["--der.alpha", "-1"], 2, "--der.alpha must be >= 0.0, got -1.0"),
        (["--derpp.beta", "-0.5"], 2, "--derpp.beta must be >= 0.0, got -0.5"),
        (["--agem.reference_size", "0"], 2, "--agem.reference_size must be >= 1, got 0"),
        (["--gem.margin", "-1"], 2, "--gem.margin must be >= 0.0, got -1.0"),
        (["--mas.sample_size", "0"], 2, "--mas.sample_size must be >= 1, got 0"),
        (["--rwalk.alpha", "2"], 2, "--rwalk.alpha must be <= 1.0, got 2.0"),
        (["--ewc.fisher", "sampled"], 2, "--ewc.fisher must be one of 'empirical', 'true', 'predicted'; got 'sampled'"),
        (["--er_ace.memory_size", "-3"], 2, "--er_ace.memory_size must be >= 0, got -3"),
        (["--num_tasks", "20"], 2, "--num_tasks must be at most 10"),
        (["--batch-size", "8"], 2, "nrecognized arguments: --batch-size"),  # "Unrecognized" before jsonargparse 4.40
        (["--ewc.fisher", "fake"], 2, "--ewc.fisher must be one of"),
        (["--config", "{tmp}/missing.yaml"], 2, "--config"),
        (["--strategy", "no_such_strategy"], 2, "--accelerator/--devices/--strategy"),
        (["--seed", "null"], 2, "--seed"),
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


def test_help_option_errors_and_a_used_output_folder_import_neither_torch_nor_lightning(tmp_path):
    # They answered after ~3 s of imports; only a run needs the libraries (neurenix.cli.compare).
    (tmp_path / "results.json").write_text("{}")
    script = (
        "import sys\n"
        "from neurenix.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['--epochs', '0']) == 2\n"
        "assert main(['--config', '{methods: ewc}']) == 2\n"
        f"assert main(['--output', {str(tmp_path)!r}]) == 2\n"
        "print('torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "--epochs must be >= 1, got 0" in done.stderr and "already holds a run (results.json)" in done.stderr


# ---------------------------------------------------------------------------- several seeds, --jobs (issue 18)
SEEDS = ["--methods", "none", "joint", "--seeds", "0", "1", "--epochs", "1", "--num_tasks", "2", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The command with two methods and two seeds: (stdout, results.json, output folder)."""
    output = tmp_path_factory.mktemp("seeds")
    status, stdout = run_captured([*SEEDS, "--output", str(output)])
    assert status == 0
    return stdout, json.loads((output / "results.json").read_text()), output


def _seeded_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "avg"])
    return {line.split()[0]: line.split()[1:] for line in lines[header + 1 : header + 3]}


def test_each_seeds_run_is_the_run_of_that_seed_alone(seeded, tmp_path):
    _, results, _ = seeded
    for seed in (0, 1):
        status, _ = run_captured([*TINY, "--methods", "none", "joint", "--seed", str(seed), "--output", str(tmp_path / str(seed))])
        assert status == 0
        alone = json.loads((tmp_path / str(seed) / "results.json").read_text())
        for name in ("none", "joint"):
            assert results["methods"][name]["seeds"][str(seed)]["accuracy_matrix"] == alone["methods"][name]["accuracy_matrix"]
    none = results["methods"]["none"]["seeds"]
    assert none["0"]["accuracy_matrix"] != none["1"]["accuracy_matrix"]  # the seeds differ: the comparison can fail


def test_several_seeds_print_mean_and_sample_std_as_results_json_holds_them(seeded):
    stdout, results, output = seeded
    lines = stdout.splitlines()
    assert lines[0].endswith(", 1 epoch per task, seeds 0, 1")
    assert "mean ± sample standard deviation (ddof=1) over seeds 0, 1; time: mean of one run." in lines
    rows = _seeded_rows(stdout)
    for name, method in results["methods"].items():
        values = {metric: [run[metric] for run in method["seeds"].values()] for metric in METRICS}
        for metric, cells in zip(METRICS, (rows[name][0:3], rows[name][3:6], rows[name][6:9])):
            if name == "joint" and metric != "average_accuracy":
                assert method["mean"][metric] is None and method["std"][metric] is None
                assert values[metric] == [None, None]
                continue
            assert method["mean"][metric] == pytest.approx(statistics.fmean(values[metric]), abs=1e-12)
            assert method["std"][metric] == pytest.approx(statistics.stdev(values[metric]), abs=1e-12)
            assert cells[1] == "±" and float(cells[0]) == pytest.approx(method["mean"][metric], abs=5e-4)
            assert float(cells[2]) == pytest.approx(method["std"][metric], abs=5e-4)
        times = [run["wall_time_s"] for run in method["seeds"].values()]
        assert method["wall_time_s"] == pytest.approx(statistics.fmean(times))
        for seed, run in method["seeds"].items():  # one TensorBoard folder per method and seed
            assert Path(run["tensorboard"]) == output / "tensorboard" / name / f"seed_{seed}"
            assert len(list(Path(run["tensorboard"]).glob("events.out.tfevents.*"))) == 1
    assert rows["joint"][3:] == ["—", "—", rows["joint"][-1]]


def test_a_seeded_runs_config_replays_its_seeds(seeded, tmp_path):
    config = seeded[2] / "config.yaml"
    text = config.read_text()
    assert "seeds:\n- 0\n- 1\n" in text and "\nseed:" not in text
    from neurenix.cli.parser import build_parser, check_settings

    settings = build_parser().parse_args(["compare", "--config", str(config)]).compare
    check_settings(settings)
    assert settings.seeds == [0, 1] and settings.seed is None


def test_jobs_runs_in_processes_with_the_results_of_one_process(seeded, tmp_path):
    # Two methods x two seeds in joblib's loky processes: every matrix equal bit for bit.
    try:
        status, _ = run_captured([*SEEDS, "--jobs", "2", "--output", str(tmp_path / "out")])
    finally:  # joblib keeps its worker processes for the next call: none may outlive this test
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    assert status == 0
    parallel = json.loads((tmp_path / "out" / "results.json").read_text())
    one = seeded[1]
    for name in ("none", "joint"):
        for seed in ("0", "1"):
            assert parallel["methods"][name]["seeds"][seed]["accuracy_matrix"] == one["methods"][name]["seeds"][seed]["accuracy_matrix"]
            assert parallel["methods"][name]["seeds"][seed]["curves"] == one["methods"][name]["seeds"][seed]["curves"]
        assert parallel["methods"][name]["mean"] == one["methods"][name]["mean"]
    assert parallel["settings"]["jobs"] == 2


def test_jobs_shows_no_progress_bars_on_a_terminal(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("neurenix.cli.compare.run_many", lambda calls, jobs, progress, done: shown.append(progress) or [])
    monkeypatch.setattr("neurenix.cli.compare.results_table", lambda runs: "")
    monkeypatch.setattr("neurenix.cli.compare.write_reports", lambda *args: {})
    for jobs in ("1", "2"):
        assert run_captured([*TINY, "--jobs", jobs, "--output", str(tmp_path / jobs)], stdout=_Terminal())[0] == 0
    assert shown == [True, False]


def test_jobs_with_a_run_on_several_devices_is_refused(tmp_path, capsys):
    argv = [*TINY, "--jobs", "2", "--devices", "2", "--output", str(tmp_path / "out")]  # strategy auto: DDP on 2 devices
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("neurenix: error: --jobs 2 runs the methods in processes of its own, which a run on 2 devices "
                   "(--strategy auto) cannot run in: use --jobs 1\n")
    assert not (tmp_path / "out").exists()


def test_neurenix_reproduce_reaches_the_reproduce_command(tmp_path, capsys):
    assert main(["reproduce", "--help"]) == 0
    assert "usage: neurenix reproduce PROTOCOL" in capsys.readouterr().out
    assert main(["reproduce", "smith2099", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurenix: error: ") and "smith2099" in err and "hsu2018" in err
    assert not (tmp_path / "out").exists()
    # compare's help says where reproduce is
    assert main(["--help"]) == 0
    assert '"neurenix reproduce hsu2018"' in capsys.readouterr().out
