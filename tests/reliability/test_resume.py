"""A task sequence killed by SIGKILL resumes from its last checkpoint to the end an uninterrupted
run reaches: parameters, every method's state, the accuracy matrix, the logged curves, and the
sequence of epochs and task ends (no finished task trained again, no unfinished one skipped).
The last checkpoint is an epoch end's, or one written in the middle of an epoch (every N steps,
or on SIGTERM by ``OnExceptionCheckpoint``): every one resumes exactly.

Every kill and every resume is its own process running ``resume_worker.main``: children of a fork
server that imported torch and Lightning once, so that some fifty runs take seconds rather than
an interpreter start each. One configuration also runs the worker as a script (two interpreter
launches), the way the docs tell users to resume.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import shutil
import signal
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from tests.reliability import resume_worker as worker
from tests.reliability.resume_worker import read_timeline

WORKER = Path(worker.__file__)
TIMEOUT = 180  # seconds for one run; a run still going by then has hung
SIGKILLED = -signal.SIGKILL  # a child's exit code when SIGKILL ended it

CONFIGS = {
    "ewc": ("ewc",),
    "replay": ("replay",),
    "l2": ("l2",),
    "si": ("si",),
    "distillation": ("distillation",),
    "ewc+replay": ("ewc", "replay"),
    # issue 15's rehearsal methods (DER as DER++), and a penalty under GEM's projection
    "der": ("der",),
    "er_ace": ("er_ace",),
    "agem": ("agem",),
    "gem": ("gem",),
    "ewc+gem": ("ewc", "gem"),
    # issue 17's importance methods, together with SI (RWalk shares its path integral)
    "mas": ("mas",),
    "rwalk+si": ("rwalk", "si"),
    # issue 16's exemplar methods
    "replay_herding": ("replay_herding",),
    "icarl": ("icarl",),
    "bic": ("bic",),
    "gdumb": ("gdumb",),
}
#: Kill point -> where the last checkpoint on disk stands then: (task, global epoch it ended).
KILLS = {
    "epoch:0:0": (0, 0),  # inside the first task, between its two epochs
    "between:0": (0, 1),  # task 0 ended (consolidated, measured), task 1 not started
    "epoch:1:0": (1, 2),  # inside task 1, with task 0's state to carry
    "batch:2:1:1": (2, 4),  # in the middle of the last task's second epoch
}
#: Kills whose last checkpoint was written inside an epoch. Kill -> (the killed run's checkpoint
#: flags, the file resumed from, (task, global epoch, batches the checkpoint's loader state says
#: were served)). Three batches an epoch: step 4k is a different batch of an epoch each time.
MID_EPOCH_KILLS = {
    "steps4/batch:1:0:2": (["--every-n-steps", "4"], "last.ckpt", (1, 2, 2)),  # step 8: batch 1 of task 1's epoch 0
    # step 12: task 1's last batch, written before the task ended (a finished epoch: nothing to skip)
    "steps4/between:1": (["--every-n-steps", "4"], "last.ckpt", (1, 3, 0)),
    "sigterm:2:0:1": ([], "on_exception.ckpt", (2, 4, 2)),  # SIGTERM at step 14: batch 1 of task 2's epoch 0
}
ALL_KILLS = [*KILLS, *MID_EPOCH_KILLS]
#: The configurations of issue 15 run four of the kills, to keep the suite short: at a task's end,
#: in the middle of a task and of an epoch, at a task's last batch before it ended, on SIGTERM.
SHORT_KILLS = ["between:0", "steps4/batch:1:0:2", "steps4/between:1", "sigterm:2:0:1"]
SHORT = {"der", "er_ace", "agem", "gem", "ewc+gem"}


#: GDumb's epochs run over its 20-sample memory (two batches, not the task data's three), so the
#: mid-epoch kills above fall elsewhere or never; its kills at epoch and task ends run here, and
#: tests/continual/test_gdumb.py resumes from the middle of an epoch on the memory.
EPOCH_KILLS_ONLY = {"gdumb"}


def kills_of(config: str) -> list[str]:
    if config in EPOCH_KILLS_ONLY:
        return list(KILLS)
    return SHORT_KILLS if config in SHORT else ALL_KILLS

SCRIPT_CASE = ("ewc+replay", "epoch:1:0")

#: Where the library fails the requirement (see docs/reliability.md, "Known failures").
_SKIPPED_TASK_END = (
    "known failure 1 (docs/reliability.md): resumed from a task's last-epoch checkpoint, Lightning skips "
    "the fit's loop, so the task never ends (no on_train_start/on_train_end): consolidated late without "
    "data (EWC's Fisher zero), never measured by ForgettingCurves"
)
KNOWN_FAILURES: dict[tuple[str, str], Callable[[str], bool]] = {}  # none left: on_fit_end consolidates a skipped task


def cases(aspect: str) -> list:
    params = []
    for config in CONFIGS:
        for kill in kills_of(config):
            fails = KNOWN_FAILURES.get((aspect, kill), lambda _: False)(config)
            marks = [pytest.mark.xfail(strict=True, reason=_SKIPPED_TASK_END)] if fails else []
            params.append(pytest.param(config, kill, marks=marks, id=f"{config}-{kill}"))
    return params


# ---------------------------------------------------------------------------- the runs
#: What multiprocessing reports when the forkserver could not give a child's exit status (its
#: status pipe ended without one); a child's own exit code is 0 or 1 here, or minus a signal.
_STATUS_LOST = 255


def _in_child(argv: list[str], log: Path) -> int:
    """``resume_worker.main(argv)`` in a fresh process forked from the server; its exit code.

    Rarely, on a loaded machine (twice in this project's full test runs so far), the forkserver
    loses a child's exit status (reported as 255) although the child's work is done: then the
    child's own marker, written when ``main`` returned, says it ended normally (0). Without the
    marker 255 stays a failure.
    """
    returned = worker.returned_marker(log)
    returned.unlink(missing_ok=True)
    process = multiprocessing.get_context("forkserver").Process(target=worker.child_main, args=(argv, log))
    process.start()
    process.join(TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"resume_worker {' '.join(argv)} did not end within {TIMEOUT} s")
    if process.exitcode == _STATUS_LOST and returned.exists():
        return 0
    return process.exitcode


def _as_script(argv: list[str], log: Path) -> int:
    with open(log, "ab") as output:
        done = subprocess.run([sys.executable, str(WORKER), *argv], stdout=output, stderr=output, timeout=TIMEOUT)
    return done.returncode


class Runs:
    """Where each run wrote, and how each of its processes ended."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exit_codes: dict[Path, dict[str, Any]] = {}

    def reference(self, config: str) -> Path:
        return self.root / config / "reference"

    def resumed(self, config: str, kill: str, script: bool = False) -> Path:
        return self.root / config / (kill.replace(":", "_").replace("/", "_") + ("_script" if script else ""))

    def run_reference(self, config: str) -> None:
        out = self.reference(config)
        out.mkdir(parents=True)
        code = _in_child([str(out), "--methods", ",".join(CONFIGS[config])], out / "output.log")
        self.exit_codes[out] = {"run": code}

    def run_killed_then_resumed(self, config: str, kill: str, script: bool = False) -> None:
        out = self.resumed(config, kill, script)
        out.mkdir(parents=True)
        launch = _as_script if script else _in_child
        flags, resume_from, _ = MID_EPOCH_KILLS.get(kill, ([], "last.ckpt", None))
        methods = ["--methods", ",".join(CONFIGS[config]), *flags]
        point = kill.split("/")[-1]
        codes: dict[str, Any] = {"killed": launch([str(out), *methods, "--kill", point], out / "output.log")}
        codes["result_left_by_killed_run"] = (out / "result.pt").exists()
        last = out / "checkpoints" / resume_from
        if last.exists():  # the resumed run overwrites it: keep the one the kill left
            shutil.copy(last, out / "killed_last.ckpt")
        if codes["killed"] == _killed_exit_code(kill):
            codes["resumed"] = launch([str(out), *methods, "--resume", "--resume-from", resume_from], out / "output.log")
        self.exit_codes[out] = codes

    def result(self, out: Path, kill: str = "") -> dict[str, Any]:
        expected = {"run": 0} if not kill else {"killed": _killed_exit_code(kill), "result_left_by_killed_run": False, "resumed": 0}
        log = (out / "output.log").read_text(errors="replace") if (out / "output.log").exists() else ""
        assert self.exit_codes.get(out) == expected, f"{out}: {self.exit_codes.get(out)}\n{log[-3000:]}"
        return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Every configuration uninterrupted, and killed then resumed at every kill point; two at a time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([worker.__name__])  # torch, Lightning and neurenix, imported once
    runs = Runs(tmp_path_factory.mktemp("resume"))
    jobs: list[Callable[[], None]] = [lambda: runs.run_killed_then_resumed(*SCRIPT_CASE, script=True)]
    jobs += [lambda config=config: runs.run_reference(config) for config in CONFIGS]
    jobs += [lambda c=config, k=kill: runs.run_killed_then_resumed(c, k) for config in CONFIGS for kill in kills_of(config)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the development machine has two cores
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    return runs


def assert_close(got: Any, want: Any, path: str = "") -> None:
    """Equal structure, and equal values: tensors bit for bit (NaN where NaN), numbers exactly."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{path}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"
        for key in want:
            assert_close(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: {got} != {want}"
        for index, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, f"{path}: {got.shape} {got.dtype} != {want.shape} {want.dtype}"
        if want.is_floating_point():
            same = torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
            assert same, f"{path}: largest difference {(got - want).abs().nan_to_num().max()}"
        else:
            assert torch.equal(got, want), f"{path}: {got} != {want}"
    elif isinstance(want, float):
        assert got == want or (math.isnan(got) and math.isnan(want)), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _killed_exit_code(kill: str) -> int:
    """SIGKILL ends a process at once; on SIGTERM Lightning ends the fit once the batch is done, with
    its ``SIGTERMException``, a ``SystemExit`` without a code: status 0, and no ``result.pt``."""
    return 0 if kill.startswith("sigterm") else SIGKILLED


def _checkpoint_position(kill: str) -> tuple[int, int]:
    """(task, global epoch) of the checkpoint a killed run resumes from."""
    return MID_EPOCH_KILLS[kill][2][:2] if kill in MID_EPOCH_KILLS else KILLS[kill]


def _both(runs: Runs, config: str, kill: str, key: str) -> tuple[Any, Any]:
    return runs.result(runs.resumed(config, kill), kill)[key], runs.result(runs.reference(config))[key]


# ---------------------------------------------------------------------------- what must match
@pytest.mark.parametrize("config,kill", cases("parameters"))
def test_resumed_parameters_equal_the_uninterrupted_run(runs, config, kill):
    assert_close(*_both(runs, config, kill, "params"))


@pytest.mark.parametrize("config,kill", cases("methods"))
def test_resumed_method_state_equals_the_uninterrupted_run(runs, config, kill):
    """Fisher and anchors, ω/Ω, the teacher, the replay memory and every sampling generator."""
    resumed, reference = _both(runs, config, kill, "methods")
    assert_close(resumed, reference)
    assert all(state["finished_tasks"] == [0, 1, 2] for state in resumed.values())


def test_the_rehearsal_states_compared_hold_full_memories(runs):
    """What the resumed rehearsal methods are compared on: full memories (DER's with its logits)."""
    states = {config: runs.result(runs.reference(config))["methods"] for config in ("der", "er_ace", "agem", "gem")}
    for config, state in states.items():
        memory = state[config]["memory"]
        assert memory["inputs"].shape == (20, worker.FEATURES) and int(memory["num_seen"]) == 3 * 2 * worker.TRAIN_SAMPLES, config
    logits = states["der"]["der"]["memory"]["logits"]
    assert logits.shape == (20, worker.CLASSES) and logits.dtype == torch.float32 and logits.abs().sum() > 0


@pytest.mark.parametrize("config,kill", cases("matrix"))
def test_resumed_accuracy_matrix_equals_the_uninterrupted_run(runs, config, kill):
    assert_close(*_both(runs, config, kill, "matrix"))


@pytest.mark.parametrize("config,kill", cases("curves"))
def test_resumed_logged_curves_equal_the_uninterrupted_run(runs, config, kill):
    """The CSV logs of the killed and the resumed process, read as one curve per metric (a step
    logged twice shows its later value), against the uninterrupted run's log."""
    curves, reference = _both(runs, config, kill, "curves")
    assert {"train_loss", "accuracy/task_0", "continual/forgetting"} <= reference.keys()
    assert_close(curves, reference)


@pytest.mark.parametrize("config,kill", cases("timeline"))
def test_resume_neither_retrains_a_finished_task_nor_skips_an_unfinished_one(runs, config, kill):
    """The resumed process runs exactly the epochs the uninterrupted run had left after the
    checkpoint's position, and at the end of each fit its methods have finished the same tasks."""
    out = runs.resumed(config, kill)
    runs.result(out, kill)  # both processes ended as they should
    (reference,) = read_timeline(runs.reference(config))
    killed, resumed = read_timeline(out)
    assert killed == reference[: len(killed)]  # the killed run followed the same path, up to the kill
    # A checkpoint inside an epoch resumes that epoch (no epoch start again) where it stood.
    checkpoint_epoch = _checkpoint_position(kill)[1]
    after = 1 + next(i for i, r in enumerate(reference) if r["event"] == "epoch" and r["global_epoch"] == checkpoint_epoch)
    assert resumed == reference[after:]


@pytest.mark.parametrize("config,kill", cases("position"))
def test_the_checkpoint_holds_the_sequence_position(runs, config, kill):
    out = runs.resumed(config, kill)
    runs.result(out, kill)
    checkpoint = torch.load(out / "killed_last.ckpt", weights_only=True)
    task, epoch = _checkpoint_position(kill)
    sequence = checkpoint["TaskSequenceDataModule"]
    assert (sequence["current_task"], checkpoint["epoch"]) == (task, epoch)
    assert sequence["task_start"]["epoch"] == task * worker.EPOCHS_PER_TASK
    assert sequence["tasks_seen"] == list(range(task + 1))
    if kill in MID_EPOCH_KILLS:  # the training loader's place in the epoch, saved by Lightning's fit loop
        (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader["batches"] == MID_EPOCH_KILLS[kill][2][2] and set(loader["sampler"]) == {"generator"}


def test_the_worker_resumes_as_a_script(runs):
    """Two interpreter launches (python resume_worker.py ... --kill, then --resume) end where the
    uninterrupted run ends."""
    config, kill = SCRIPT_CASE
    resumed = runs.result(runs.resumed(config, kill, script=True), kill)
    reference = runs.result(runs.reference(config))
    for key in ("params", "methods", "matrix", "curves"):
        assert_close(resumed[key], reference[key], key)


# ---------------------------------------------------------------------------- older checkpoints
#: State a checkpoint of an older version lacks: what git history shows was added after the first
#: release, then every key that a loader reads with a default, one at a time (keys that only make
#: sense together go together: no version wrote SI's anchor without its importance).
ADDED_LATER = [("EWC", ("tasks/0/buffers",))]  # f162199: EWC keeps end-of-task buffers
BASE = [("active_task",), ("finished_tasks",), ("steps_in_active_task",), ("untouched_fingerprint",)]
OPTIONAL = {
    "EWC": [*BASE, ("generator",), ("tasks/0/samples",)],
    "ExperienceReplay": [*BASE, ("memory",), *((f"memory/{key}",) for key in ("num_seen", "generator", "generator_device", "seed",
                                                                              "extra_fields"))],
    "L2Regularization": [*BASE, ("anchor",)],
    "SynapticIntelligence": [*BASE, ("anchor", "big_omega"), ("task_state", "has_pending")],
    "KnowledgeDistillation": [*BASE, ("teacher",), ("seen_units",), ("teacher_units",)],
    "ForgettingCurves": [("matrix",)],
    "TaskSequenceDataModule": [("tasks_seen",), ("task_start",), ("shuffle_generator",)],
}
#: Keys whose absence loses nothing in this run: the resumed run must end exactly as with them.
LOSSLESS = {("EWC", ("tasks/0/buffers",)), *((owner, ("untouched_fingerprint",)) for owner in OPTIONAL)}
DROPS = ADDED_LATER + [(owner, keys) for owner, groups in OPTIONAL.items() for keys in groups]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy-waiting threads on two shared cores run ten times slower
    yield
    torch.set_num_threads(threads)


def _in_process(out: Path, ckpt_path: Optional[Path] = None) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return worker.run(out, worker.METHODS, resume=ckpt_path is not None, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def mid_task_1(tmp_path_factory, one_thread) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint of all five methods inside task 1, and the run resumed from it unchanged."""
    root = tmp_path_factory.mktemp("older")
    _in_process(root / "full")
    checkpoint = torch.load(root / "full" / "checkpoints" / "epoch=2-step=9.ckpt", weights_only=True)
    torch.save(checkpoint, root / "as_saved.ckpt")
    return checkpoint, _in_process(root / "resumed", root / "as_saved.ckpt")


def _state_of(checkpoint: dict[str, Any], owner: str) -> dict[str, Any]:
    if owner == "TaskSequenceDataModule":
        return checkpoint[owner]
    (key,) = [key for key in checkpoint["callbacks"] if key.split("{")[0] == owner]
    return checkpoint["callbacks"][key]


@pytest.mark.parametrize("owner,keys", DROPS, ids=[f"{owner}-{'+'.join(keys)}" for owner, keys in DROPS])
def test_a_checkpoint_without_keys_added_later_still_resumes(mid_task_1, tmp_path, one_thread, owner, keys):
    checkpoint, complete = mid_task_1
    older = copy.deepcopy(checkpoint)
    for key in keys:
        *parents, last = key.split("/")
        state = _state_of(older, owner)
        for part in parents:
            state = state[int(part) if part.isdigit() else part]
        del state[last]
    torch.save(older, tmp_path / "older.ckpt")
    resumed = _in_process(tmp_path / "run", tmp_path / "older.ckpt")
    for name, state in resumed["methods"].items():
        assert {1, 2} <= set(state["finished_tasks"]) and state["active_task"] is None, name
    if (owner, keys) in LOSSLESS:
        for part in ("params", "methods", "matrix"):
            assert_close(resumed[part], complete[part], part)
