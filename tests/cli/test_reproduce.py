"""``neurenix reproduce hsu2018``: the protocol's settings per method and scenario, the tables, the files, bad input.

The runs read a tiny MNIST-format folder (30 training and 20 test images, every digit 3 and 2
times) written by the MNIST reader's tests, one epoch a task: the mechanics, not the accuracy.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurenix.cli.reproduce import (
    HSU2018,
    SCENARIOS,
    Reproduction,
    ScenarioResult,
    compare_flags,
    mapping_table,
    parse_reproduce,
    reproduce_command,
    result_tables,
)
from neurenix.cli.parser import build_parser, parse
from tests.data.test_mnist import write_dataset

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproducing.md"
TINY = ["--seeds", "0", "1", "--epochs", "1"]
OURS, PAPER = (31, 119, 180), (255, 127, 14)  # the figure's colours: ours, the paper's

# The authors' --reg_coef per scenario (task, domain, class), from scripts/split_MNIST_incremental_*.sh,
# and the factor to ours: EWC and L2 carry a ½ in ours and none in theirs; SI carries none in either;
# MAS's importance averages over the 2 units of a head in theirs.
REG_COEF = {
    "ewc": ((100, 100, 600), 2.0),
    "online_ewc": ((400, 700, 100), 2.0),
    "l2": ((0.01, 0.5, 100), 2.0),
    "si": ((300, 3000, 600), 1.0),
    "mas": ((1, 10000, 1), 0.5),
}


def run_command(argv: list[str]) -> tuple[int, str, str]:
    """``neurenix reproduce ARGV`` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = reproduce_command(argv)
    return status, stdout.getvalue(), stderr.getvalue()


def run_settings(method: str, scenario: str, seed: int = 0):
    """The compare settings of one of the protocol's runs, as the command builds them."""
    settings = parse_reproduce(["hsu2018", "--root", "some/folder"])
    flags = compare_flags(settings, HSU2018, method, scenario, seed, HSU2018.epochs)
    argv = ["compare"]
    for flag, value in flags.items():
        argv += [f"--{flag}" if value is True else f"--no_{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return parse(build_parser(), argv)


# ---------------------------------------------------------------------------- the settings of each run
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("method", list(HSU2018.rows))
def test_every_run_has_the_protocol(method: str, scenario: str) -> None:
    settings = run_settings(method, scenario, seed=7)
    assert (settings.benchmark, settings.dataset, settings.data_root) == ("split", "mnist", "some/folder")
    assert (settings.scenario, settings.num_tasks, settings.methods, settings.seed) == (scenario, 5, [method], 7)
    assert (settings.epochs, settings.lr, settings.hidden) == (4, 0.001, 400)
    assert settings.batch_size == (64 if method == "replay" else 128)
    assert settings.keep_optimizer_state is True  # the authors' agents never reset their optimizer
    assert settings.mask_unseen_classes is (scenario == "class")  # their valid_out_dim


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("method", list(REG_COEF))
def test_importances_are_the_authors_coefficients_in_our_convention(method: str, scenario: str) -> None:
    coefficients, factor = REG_COEF[method]
    importance = getattr(run_settings(method, scenario), method).importance
    assert importance == pytest.approx(factor * coefficients[SCENARIOS.index(scenario)])


def test_the_hand_checked_values() -> None:
    """The values as read in the authors' code, written out once (task, domain, class)."""
    assert [run_settings("ewc", s).ewc.importance for s in SCENARIOS] == [200, 200, 1200]
    assert [run_settings("online_ewc", s).online_ewc.importance for s in SCENARIOS] == [800, 1400, 200]
    assert [run_settings("l2", s).l2.importance for s in SCENARIOS] == [0.02, 1.0, 200]
    assert [run_settings("si", s).si.importance for s in SCENARIOS] == [300, 3000, 600]
    assert [run_settings("mas", s).mas.importance for s in SCENARIOS] == [0.5, 5000, 0.5]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_other_settings_of_each_method(scenario: str) -> None:
    ewc, online = run_settings("ewc", scenario).ewc, run_settings("online_ewc", scenario).online_ewc
    assert (ewc.fisher, ewc.fisher_sample_size) == ("predicted", 60000)  # argmax labels, every sample of a task
    assert (online.fisher, online.fisher_sample_size, online.gamma) == ("predicted", 60000, 1.0)  # no decay
    assert run_settings("si", scenario).si.xi == 0.1
    assert run_settings("mas", scenario).mas.sample_size == 60000
    replay = run_settings("replay", scenario).replay
    assert (replay.memory_size, replay.replay_ratio, replay.offer) == (1100, 1.0, "once")
    gem = run_settings("gem", scenario).gem
    assert (gem.memory_size, gem.margin) == (1100, 0.5)
    distillation = run_settings("distillation", scenario).distillation
    assert (distillation.alpha, distillation.temperature) == ("1-1/t", 2.0)


def test_a_method_gets_only_its_own_options_changed() -> None:
    """The flags of one method's run leave the other methods' settings at the parser's defaults."""
    defaults = parse(build_parser(), ["compare"])
    settings = run_settings("ewc", "class")
    assert settings.l2 == defaults.l2 and settings.replay == defaults.replay and settings.si == defaults.si
    assert settings.ewc != defaults.ewc


# ---------------------------------------------------------------------------- the mapping table
def test_the_mapping_table_has_a_row_per_setting_with_its_reason() -> None:
    table = mapping_table(HSU2018).splitlines()
    assert len(table) == 2 + len(HSU2018.settings)
    ewc = next(line for line in table if "`--ewc.importance`" in line)
    assert "| 100 / 100 / 600 | 200 / 200 / 1200 |" in ewc and "importance = 2·reg_coef" in ewc
    si = next(line for line in table if "`--si.importance`" in line)
    assert "| 300 / 3000 / 600 | 300 / 3000 / 600 |" in si and "no ½ in both" in si
    assert "| every run | `--keep_optimizer_state` | NormalNN.reset_optimizer = False | yes | yes |" in "\n".join(table)
    assert "`--lr (not set)`" in next(line for line in table if line.startswith("| gem | `--lr"))


def test_the_docs_page_holds_the_generated_mapping_table() -> None:
    assert mapping_table(HSU2018) in DOCS.read_text()


# ---------------------------------------------------------------------------- runs on MNIST
@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def reproduction(mnist: Path, tmp_path_factory):
    """One reproduction: (exit status, stdout, results.json, output folder)."""
    output = tmp_path_factory.mktemp("reproduction") / "out"
    argv = ["hsu2018", "--root", str(mnist), *TINY, "--scenarios", "task", "class",
            "--methods", "none", "joint", "ewc", "replay", "--output", str(output)]
    status, stdout, stderr = run_command(argv)
    assert status == 0, stderr
    return stdout, json.loads((output / "results.json").read_text()), output


def printed_rows(stdout: str, scenario_title: str) -> dict[str, list[str]]:
    """The printed table of one scenario: method -> its cells (split on two spaces or more)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("split MNIST, " + scenario_title))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_results_hold_every_seed_and_their_mean_and_population_std(reproduction) -> None:
    _, results, _ = reproduction
    assert (results["protocol"], results["dataset"], results["data"]) == ("hsu2018", "mnist", "MNIST")
    assert results["seeds"] == [0, 1] and results["epochs_per_task"] == 1 and results["compared_with_paper"]
    assert list(results["scenarios"]) == ["task", "class"]
    for scenario in ("task", "class"):
        assert list(results["scenarios"][scenario]) == ["none", "joint", "ewc", "replay"]
        for entry in results["scenarios"][scenario].values():
            per_seed = entry["average_accuracy"]
            assert list(per_seed) == ["0", "1"]
            for seed, value in per_seed.items():  # the final average accuracy: the last row's mean, in %
                last_row = entry["accuracy_matrix"][seed][-1]
                assert value == pytest.approx(100 * np.mean(last_row))
            assert entry["mean"] == pytest.approx(np.mean(list(per_seed.values())))
            assert entry["std"] == pytest.approx(np.std(list(per_seed.values())))  # ddof=0, as the authors'


def test_a_joint_run_has_only_its_last_row(reproduction) -> None:
    matrix = reproduction[1]["scenarios"]["class"]["joint"]["accuracy_matrix"]["0"]
    assert all(value is None for row in matrix[:-1] for value in row) and None not in matrix[-1]


def test_the_runs_got_the_mapped_hyperparameters(reproduction) -> None:
    scenarios = reproduction[1]["scenarios"]
    assert scenarios["class"]["ewc"]["hyperparameters"]["importance"] == 1200
    assert scenarios["task"]["ewc"]["hyperparameters"]["importance"] == 200
    assert scenarios["class"]["ewc"]["hyperparameters"]["fisher"] == "predicted"
    assert scenarios["class"]["replay"]["flags"]["batch_size"] == 64
    assert scenarios["class"]["replay"]["hyperparameters"]["memory_size"] == 1100
    assert scenarios["task"]["none"]["flags"]["mask_unseen_classes"] is False
    assert scenarios["class"]["none"]["flags"]["mask_unseen_classes"] is True


def test_the_paper_numbers_beside_ours(reproduction) -> None:
    stdout, results, _ = reproduction
    task, klass = printed_rows(stdout, "incremental task"), printed_rows(stdout, "incremental class")
    assert task["replay"][0] == "Naive rehearsal" and task["replay"][2] == "99.40 ± 0.08"
    assert klass["replay"][2] == "90.78 ± 0.85"
    assert klass["ewc"][2] == "19.80"  # found without its std
    assert klass["joint"][:1] + klass["joint"][2:] == ["Offline", "97.53"]
    assert task["ewc"][2] == "—" and klass["none"][2] == "—"  # not found: left out
    for scenario, rows in (("task", task), ("class", klass)):
        for method, cells in rows.items():
            entry = results["scenarios"][scenario][method]
            assert cells[1] == f"{entry['mean']:.2f} ± {entry['std']:.2f}"
    assert results["scenarios"]["class"]["replay"]["paper"] == {"mean": 90.78, "std": 0.85, "source": "rows"}
    assert results["scenarios"]["task"]["none"]["paper"] is None
    assert "std as the authors' iBatchLearn.py prints it (numpy's, ddof=0)" in stdout
    assert "GEM with SGD" not in stdout  # GEM's note is said when GEM ran


def test_gems_note_when_gem_ran() -> None:
    gem = ScenarioResult("gem", "GEM", {}, {}, {0: 90.0, 1: 94.0}, {}, HSU2018.reported["gem"]["domain"])
    table = result_tables(Reproduction(HSU2018, "mnist", "MNIST", [0, 1], 4, {"domain": [gem]}))
    assert table.splitlines()[2].split() == ["gem", "GEM", "92.00", "±", "2.00", "96.16", "±", "0.35"]
    assert table.endswith("gem: the authors train GEM with SGD at lr 0.01; the command trains every method with Adam at 1e-3.")


def test_the_files(reproduction) -> None:
    stdout, _, output = reproduction
    table = (output / "table.md").read_text()
    assert "| replay | Naive rehearsal | " in table and "| 90.78 ± 0.85 |" in table
    with Image.open(output / "reproduce.png") as figure:
        colours = {colour for _, colour in figure.convert("RGB").getcolors(figure.width * figure.height)}
    assert OURS in colours and PAPER in colours  # our bars, and the paper's beside them
    assert (output / "runs" / "class" / "seed_1" / "tensorboard" / "ewc").is_dir()
    for label in ("results", "table", "figure"):
        assert re.search(rf"^{label}\s+{re.escape(str(output))}", stdout, re.MULTILINE)


def test_a_dataset_that_is_not_mnist_has_no_paper_column(tmp_path: Path) -> None:
    write_dataset(tmp_path / "FashionMNIST" / "raw")
    status, stdout, stderr = run_command(["hsu2018", "--root", str(tmp_path), "--dataset", "fashion_mnist",
                                          "--seeds", "0", "--epochs", "1", "--scenarios", "class",
                                          "--methods", "none", "replay", "--output", str(tmp_path / "out")])
    assert status == 0, stderr
    note = "The paper reports MNIST only: there is nothing to compare this Fashion-MNIST run with."
    assert note in stdout and "paper (%)" not in stdout
    assert printed_rows(stdout.replace("Fashion-MNIST", "MNIST"), "incremental class")["replay"][0] == "Naive rehearsal"
    assert "99.40" not in stdout and "90.78" not in stdout
    with Image.open(tmp_path / "out" / "reproduce.png") as figure:
        colours = {colour for _, colour in figure.convert("RGB").getcolors(figure.width * figure.height)}
    assert OURS in colours and PAPER not in colours  # our bars alone
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["compared_with_paper"] is False and results["note"] == note
    assert results["scenarios"]["class"]["replay"]["paper"] is None


def test_a_second_run_is_refused_then_replaced_with_overwrite(mnist: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    argv = ["hsu2018", "--root", str(mnist), "--seeds", "0", "--epochs", "1", "--scenarios", "domain",
            "--methods", "none", "--output", str(output)]
    assert run_command(argv)[0] == 0
    (output / "mine.txt").write_text("not the command's")
    status, _, stderr = run_command(argv)
    assert status == 2 and "already holds a reproduction (results.json, table.md, reproduce.png, runs)" in stderr
    status, _, stderr = run_command([*argv, "--overwrite"])
    assert status == 0, stderr
    assert (output / "mine.txt").read_text() == "not the command's"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "argv, message",
    [
        (["hsu2019"], "unknown protocol 'hsu2019'; choose from hsu2018"),
        (["hsu2018", "--scenarios", "class", "tasks"], "unknown name 'tasks' in --scenarios; choose from task, domain, class"),
        (["hsu2018", "--methods", "icarl"], "unknown name 'icarl' in --methods; choose from none, joint, ewc"),
        (["hsu2018", "--dataset", "cifar10"], "--dataset must be one of mnist, fashion_mnist, got 'cifar10'"),
        (["hsu2018", "--seeds", "1", "1"], "--seeds lists a seed more than once: 1 1"),
        (["hsu2018", "--seeds", "0", "-1"], "--seeds must be in [0, 2**32), got -1"),
        (["hsu2018", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["hsu2018", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, argv: list[str], message: str) -> None:
    output = tmp_path / "out"
    status, stdout, stderr = run_command([*argv, "--output", str(output)])
    assert status == 2 and stdout == ""
    assert stderr.startswith("neurenix: error: ") and message in stderr
    assert not output.exists()


def test_missing_data_is_a_run_failure_naming_the_folder(tmp_path: Path) -> None:
    output = tmp_path / "out"
    status, _, stderr = run_command(["hsu2018", "--root", str(tmp_path / "nowhere"), "--output", str(output)])
    assert status == 1 and "no mnist data: --root" in stderr and "nowhere" in stderr and "--data_root" not in stderr
    assert not output.exists()
