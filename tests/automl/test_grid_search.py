"""GridSearch: every combination tried, the right one chosen, scores equal to runs done by hand."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neurenix as nx
from neurenix.automl import GridSearch, stratified_folds
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    L2Regularization,
    RWalk,
)
from neurenix.data import split_benchmark

# Adam at a rate that learns these tiny problems in a few epochs.
FAST = dict(epochs=20, batch_size=16, optimizer=lambda p: torch.optim.Adam(p, lr=0.05), seed=3)


def xor(n: int = 120, seed: int = 0):
    """Two classes by the sign of x0·x1: no linear model beats chance, a hidden layer solves it."""
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def blobs(classes, n_per: int = 30, seed: int = 1):
    """Gaussian blobs around the corners of a square, one per class (class c at angle c·90°)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.tensor([c * torch.pi / 2 for c in classes])
    centers = 3 * torch.stack([angles.cos(), angles.sin()], dim=1)
    x = torch.cat([c + 0.5 * torch.randn(n_per, 2, generator=g) for c in centers])
    return x, torch.tensor(classes).repeat_interleave(n_per)


def l2_net(hidden: int, importance: float = 1.0) -> L2Regularization:
    net = nn.Linear(2, 2) if hidden == 0 else nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    return L2Regularization(net, importance=importance)


def ewc_net(importance: float) -> EWC:
    return EWC(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4)), importance=importance, fisher_sample_size=20)


def folds_by_hand(y: torch.Tensor, cv: int, seed: int) -> list[torch.Tensor]:
    """The documented recipe: a seeded permutation, stably sorted by label, dealt round-robin."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(y[perm], stable=True)]
    return [order[k::cv] for k in range(cv)]


def run_by_hand(model_fn, params, tasks, seed, epochs, batch_size, lr):
    """One run as GridSearch documents it, in plain PyTorch: ``tasks`` is [(x_tr, y_tr, x_val, y_val)]."""
    torch.manual_seed(seed)
    method = model_fn(**params)
    optimizer = torch.optim.Adam(method.model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for t, (x, y, _, _) in enumerate(tasks):
        method.register_task(t, DataLoader(TensorDataset(x, y), batch_size=batch_size))
        for _ in range(epochs):
            for batch in torch.randperm(len(y), generator=order).split(batch_size):
                method.train_step(optimizer, nn.CrossEntropyLoss(), x[batch], y[batch], task_id=t)
    method.model.eval()
    with torch.no_grad():
        accuracies = [(method.model(xv).argmax(1) == yv).double().mean().item() for _, _, xv, yv in tasks]
    return sum(accuracies) / len(accuracies)


def split(x, y, held_out):
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held_out] = False
    return x[keep], y[keep], x[held_out], y[held_out]


# ---------------------------------------------------------------------------- the grid
def test_every_combination_is_built_once_per_fold_with_its_params():
    calls = []

    def model_fn(width, importance=1.0):
        calls.append({"width": width, "importance": importance})
        return l2_net(width, importance)

    space = {"width": [0, 3, 5], "importance": [0.5, 2.0]}
    search = GridSearch(model_fn, space, cv=4, epochs=1, seed=0).fit(*xor(40))
    grid = [{"width": w, "importance": i} for w in (0, 3, 5) for i in (0.5, 2.0)]
    assert calls == [p for p in grid for _ in range(4)]  # 6 combinations x 4 folds, in grid order
    assert search.cv_results_["params"] == grid
    assert search.cv_results_["param_width"] == [0, 0, 3, 3, 5, 5]
    assert sorted(k for k in search.cv_results_ if k.startswith("split")) == [f"split{k}_test_score" for k in range(4)]


def test_picks_the_capacity_that_solves_xor_and_scores_match_a_hand_run():
    x, y = xor()
    search = GridSearch(l2_net, {"hidden": [0, 16], "importance": [1.0, 100.0]}, cv=3, **FAST).fit(x, y)
    assert search.best_params() == {"hidden": 16, "importance": 1.0}  # first of the tied best
    means = search.cv_results_["mean_test_score"]
    assert means[0] < 0.65 < 0.85 < means[2]  # linear: chance; a hidden layer: solved
    assert search.cv_results_["rank_test_score"] == [3, 3, 1, 1]
    assert search.best_score_ == means[2] == pytest.approx(sum(search.cv_results_[f"split{k}_test_score"][2] for k in range(3)) / 3)
    # On one task nothing is consolidated, so L2's importance cannot act: scores agree exactly.
    assert means[0] == means[1] and means[2] == means[3]

    held_out = folds_by_hand(y, 3, seed=3)[1]
    by_hand = run_by_hand(l2_net, {"hidden": 16, "importance": 100.0}, [split(x, y, held_out)], 3, 20, 16, 0.05)
    assert search.cv_results_["split1_test_score"][3] == by_hand


def test_folds_are_stratified_and_partition_the_data():
    y = torch.tensor([0] * 9 + [1] * 6)
    folds = stratified_folds(y, 3, seed=5)
    assert sorted(torch.cat(folds).tolist()) == list(range(15))
    assert [int((y[f] == 0).sum()) for f in folds] == [3, 3, 3] and [int((y[f] == 1).sum()) for f in folds] == [2, 2, 2]


# ---------------------------------------------------------------------------- reproducibility
def test_same_seed_same_results_other_seed_other_folds_caller_rng_untouched():
    x, y = xor(60)
    space = {"hidden": [4, 8]}
    fast = {**FAST, "epochs": 3}
    state = torch.get_rng_state()
    first = GridSearch(l2_net, space, **fast).fit(x, y).cv_results_
    assert torch.equal(torch.get_rng_state(), state)  # the search runs in a forked RNG state
    assert GridSearch(l2_net, space, **fast).fit(x, y).cv_results_ == first
    other = GridSearch(l2_net, space, **{**fast, "seed": 4}).fit(x, y).cv_results_
    assert other["split0_test_score"] != first["split0_test_score"]

    nx.init(3)  # seed=None follows PyTorch's seed
    unseeded = GridSearch(l2_net, space, **{**fast, "seed": None}).fit(x, y)
    assert unseeded.seed_ == 3 and unseeded.cv_results_ == first


def test_numpy_inputs_give_the_same_scores_as_tensors():
    x, y = xor(45)
    space = {"hidden": [4]}
    tensors = GridSearch(l2_net, space, **FAST).fit(x, y).cv_results_
    arrays = GridSearch(l2_net, space, **FAST).fit(x.double().numpy(), y.numpy()).cv_results_
    assert arrays == tensors  # float64 arrays are cast to the model's float32


# ---------------------------------------------------------------------------- task sequences
def test_replay_memory_wins_a_class_incremental_sequence():
    def replay(memory_size):
        return ExperienceReplay(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4)), memory_size=memory_size, replay_ratio=1.0)

    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    search = GridSearch(replay, {"memory_size": [0, 100]}, epochs=20, batch_size=10,
                        optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=0).fit(tasks=tasks)
    without, with_memory = search.cv_results_["mean_test_score"]
    assert search.best_params() == {"memory_size": 100}
    assert with_memory > 0.95 and without < 0.8  # without replay task 0's classes are forgotten


def _blobs_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))


#: The rehearsal methods whose train_step stores its own batch, each built on the blobs' network.
SELF_REMEMBERING = {
    "der": lambda memory_size: DarkExperienceReplay(_blobs_net(), memory_size=memory_size, alpha=1.0),
    "derpp": lambda memory_size: DarkExperienceReplay(_blobs_net(), memory_size=memory_size, alpha=0.5, beta=1.0),
    "er_ace": lambda memory_size: ERACE(_blobs_net(), memory_size=memory_size),
    "agem": lambda memory_size: AGEM(_blobs_net(), memory_size=memory_size, reference_size=32),
    "gem": lambda memory_size: GEM(_blobs_net(), memory_size=memory_size),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy-waiting threads on two shared cores run ten times slower
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SELF_REMEMBERING)
def test_each_memory_method_wins_a_class_incremental_sequence_with_its_memory(name):
    # Their train_step stores the batch itself, and add_to_memory refuses the same batch again
    # (an error, or a warning that it is not stored twice): the search must not offer it.
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search = GridSearch(SELF_REMEMBERING[name], {"memory_size": [0, 100]}, epochs=20, batch_size=10,
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=0).fit(tasks=tasks)
    without, with_memory = search.cv_results_["mean_test_score"]
    assert search.best_params() == {"memory_size": 100}
    assert with_memory > 0.95 and without < 0.85, (without, with_memory)


def test_a_self_remembering_method_is_scored_as_a_hand_run_of_train_step_alone():
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    options = dict(cv=2, epochs=3, batch_size=10, optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=4)
    score = GridSearch(SELF_REMEMBERING["derpp"], {"memory_size": [50]}, **options).fit(tasks=tasks).cv_results_["split1_test_score"][0]

    parts = [split(x, y, folds_by_hand(y, 2, seed=4)[1]) for x, y in tasks]
    with torch.random.fork_rng():
        torch.manual_seed(4)
        method = SELF_REMEMBERING["derpp"](50)
        optimizer = torch.optim.Adam(method.model.parameters(), lr=0.02)
        order = torch.Generator().manual_seed(4)
        for task_id, (x_train, y_train, _, _) in enumerate(parts):
            method.register_task(task_id, DataLoader(TensorDataset(x_train, y_train), batch_size=10))
            for _ in range(3):
                for batch in torch.randperm(len(y_train), generator=order).split(10):
                    method.train_step(optimizer, nn.CrossEntropyLoss(), x_train[batch], y_train[batch], task_id=task_id)
        assert len(method.memory) == 50  # the stream's samples, each offered once
        with torch.no_grad():
            by_hand = sum((method.model(x).argmax(1) == y).float().mean().item() for _, _, x, y in parts) / 2
    assert score == pytest.approx(by_hand, abs=1e-12)


def test_sequence_score_is_the_average_score_of_a_hand_run():
    # SGD keeps task 0 uncertain enough for a non-zero empirical Fisher; the log loss shows any drift.
    options = dict(scoring="neg_log_loss", cv=3, epochs=5, batch_size=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=3)
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    search = GridSearch(ewc_net, {"importance": [0.0, 100.0]}, **options).fit(tasks=tasks)
    without, with_ewc = search.cv_results_["split2_test_score"]
    assert without != with_ewc  # the penalty acted on task 1

    parts = [split(x, y, folds_by_hand(y, 3, seed=3)[2]) for x, y in tasks]
    torch.manual_seed(3)
    method = ewc_net(importance=100.0)
    optimizer = torch.optim.SGD(method.model.parameters(), lr=0.1)
    order = torch.Generator().manual_seed(3)
    for t, (x, y, _, _) in enumerate(parts):
        method.register_task(t, DataLoader(TensorDataset(x, y), batch_size=16))  # task 0's Fisher when task 1 registers
        for _ in range(5):
            for batch in torch.randperm(len(y), generator=order).split(16):
                method.train_step(optimizer, nn.CrossEntropyLoss(), x[batch], y[batch], task_id=t)
    assert float(method.get_ewc_loss().detach()) > 0
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(method.model(xv).double(), yv).item() for _, _, xv, yv in parts]
    assert with_ewc == -sum(losses) / 2

    # Given validation sets instead of folds: one split, the same runs.
    given = GridSearch(ewc_net, {"importance": [0.0, 100.0]}, **options).fit(
        tasks=[p[:2] for p in parts], validation_tasks=[TensorDataset(*p[2:]) for p in parts])
    assert given.cv_results_["split0_test_score"] == [without, with_ewc]
    assert "split1_test_score" not in given.cv_results_


#: Issue 17's importance methods on the blobs' network (seeded as GridSearch seeds each run).
IMPORTANCE_METHODS = {
    "mas": lambda importance: MAS(_blobs_net(), importance=importance, sample_size=64, seed=0),
    "rwalk": lambda importance: RWalk(_blobs_net(), importance=importance, interval=2),
}


@pytest.mark.parametrize("name", IMPORTANCE_METHODS)
def test_an_importance_search_scores_each_value_as_a_hand_run(name):
    make = IMPORTANCE_METHODS[name]
    options = dict(scoring="neg_log_loss", cv=2, epochs=3, batch_size=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=3)
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    search = GridSearch(make, {"importance": [0.0, 100.0]}, **options).fit(tasks=tasks)
    without, with_penalty = search.cv_results_["split1_test_score"]
    assert without != with_penalty  # the penalty acted on task 1

    parts = [split(x, y, folds_by_hand(y, 2, seed=3)[1]) for x, y in tasks]
    torch.manual_seed(3)
    method = make(100.0)
    optimizer = torch.optim.SGD(method.model.parameters(), lr=0.1)
    order = torch.Generator().manual_seed(3)
    for t, (x, y, _, _) in enumerate(parts):
        method.register_task(t, DataLoader(TensorDataset(x, y), batch_size=16))
        for _ in range(3):
            for batch in torch.randperm(len(y), generator=order).split(16):
                method.train_step(optimizer, nn.CrossEntropyLoss(), x[batch], y[batch], task_id=t)
    assert float(method.get_regularization_loss().detach()) > 0
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(method.model(xv).double(), yv).item() for _, _, xv, yv in parts]
    assert with_penalty == pytest.approx(-sum(losses) / 2, abs=1e-12)


#: iCaRL (scored by its nearest-mean classifier) and GDumb (retrained on its memory), blobs' network.
OWN_TRAINING = {
    "icarl": lambda memory_size: ICaRL(_blobs_net(), memory_size=memory_size, replay_ratio=1.0),
    "gdumb": lambda memory_size: GDumb(_blobs_net(), memory_size=memory_size),
    "bic": lambda memory_size: BiC(_blobs_net(), memory_size=memory_size, replay_ratio=1.0),
}


def _by_hand(name: str, parts, memory_size: int, seed: int, epochs: int, lr: float) -> float:
    """The run GridSearch documents for ``name``, written out: the mean held-out accuracy."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        method = OWN_TRAINING[name](memory_size)
        optimizer = torch.optim.Adam(method.model.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed)
        for task_id, (x, y, _, _) in enumerate(parts):
            method.register_task(task_id, DataLoader(TensorDataset(x, y), batch_size=10))
            if name == "gdumb":
                for batch in torch.randperm(len(y), generator=order).split(10):
                    method.add_to_memory(x[batch], y[batch], task_id)
                method.train_on_memory(lambda p: torch.optim.Adam(p, lr=lr), nn.CrossEntropyLoss(), epochs, 10, generator=order)
                continue
            for _ in range(epochs):
                for batch in torch.randperm(len(y), generator=order).split(10):
                    method.train_step(optimizer, nn.CrossEntropyLoss(), x[batch], y[batch], task_id=task_id)
        predict = method.model
        if name in ("icarl", "bic"):
            method.finish_task()  # the last task's exemplars and means, or bias correction
            predict = method.classifier
        with torch.no_grad():
            return sum((predict(x).argmax(1) == y).double().mean().item() for _, _, x, y in parts) / len(parts)


@pytest.mark.parametrize("name", OWN_TRAINING)
def test_icarl_and_gdumb_are_scored_as_their_hand_runs(name):
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    options = dict(cv=2, epochs=10, batch_size=10, optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=4)
    search = GridSearch(OWN_TRAINING[name], {"memory_size": [4, 40]}, **options).fit(tasks=tasks)
    parts = [split(x, y, folds_by_hand(y, 2, seed=4)[1]) for x, y in tasks]
    by_hand = [_by_hand(name, parts, memory_size, seed=4, epochs=10, lr=0.02) for memory_size in (4, 40)]
    assert search.cv_results_["split1_test_score"] == pytest.approx(by_hand, abs=1e-12)


def test_a_benchmark_is_searched_on_its_training_tasks_only():
    bench = split_benchmark("digits", num_tasks=2, classes_per_task=2, scenario="domain", seed=0)

    def model_fn(importance):
        return L2Regularization(nn.Linear(64, 2), importance=importance)

    options = dict(epochs=1, seed=0)
    from_bench = GridSearch(model_fn, {"importance": [1.0, 1e4]}, **options).fit(tasks=bench).cv_results_
    from_pairs = GridSearch(model_fn, {"importance": [1.0, 1e4]}, **options).fit(tasks=[t[:] for t in bench.train]).cv_results_
    assert from_bench == from_pairs
    assert from_bench["mean_test_score"][0] != from_bench["mean_test_score"][1]  # L2 acts on task 1


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(param_space={}), ValueError, r"param_space must name at least one.*\{\}"),
        (dict(param_space={"hidden": []}), ValueError, r"param_space\['hidden'\] must list at least one value, got \[\]"),
        (dict(param_space={"hidden": 4}), TypeError, r"param_space\['hidden'\] must be a list.*got int: 4"),
        (dict(param_space={"hidden": [4], "lr": [0.1]}), ValueError, r"param_space names \['lr'\].*takes \['hidden', 'importance'\]"),
        (dict(param_space={"importance": [1.0]}), ValueError, r"requires \['hidden'\]"),
        (dict(param_space=[("hidden", [4])]), TypeError, r"param_space must be a dict.*got list"),
        (dict(param_space={"hidden": [4]}, cv=1), ValueError, r"cv must be >= 2, got 1"),
        (dict(param_space={"hidden": [4]}, cv=3.0), TypeError, r"cv must be an int, got float: 3.0"),
        (dict(param_space={"hidden": [4]}, scoring="f1"), ValueError, r"scoring must be one of 'accuracy'.*got 'f1'"),
        (dict(param_space={"hidden": [4]}, model_fn="l2"), TypeError, r"model_fn must be callable, got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        GridSearch(**{"model_fn": l2_net, **kwargs})


def test_bad_data_and_misuse_are_named():
    search = GridSearch(l2_net, {"hidden": [4]}, epochs=1)
    with pytest.raises(RuntimeError, match=r"best_params\(\) was called before fit"):
        search.best_params()
    x, y = xor(10)
    with pytest.raises(ValueError, match=r"X and y must hold the same number of samples, got X of shape \(10, 2\) and y of shape \(9,\)"):
        search.fit(x, y[:9])
    with pytest.raises(ValueError, match=r"cv=3 folds need at least 3 samples per task, but a task has only 2"):
        search.fit(x[:2], y[:2])
    with pytest.raises(TypeError, match=r"y must hold integer class labels, got dtype torch.float32"):
        search.fit(x, y.float())
    with pytest.raises(ValueError, match=r"either X, y .* or tasks=\[...\].*got both"):
        search.fit(x, y, tasks=[(x, y)])
    with pytest.raises(TypeError, match=r"tasks\[0\] must be an \(inputs, labels\) pair.*got Tensor of shape \(10, 2\)"):
        search.fit(tasks=[x, y])
    with pytest.raises(TypeError, match=r"model_fn must return a neurenix continual method.*got Linear from model_fn\(\*\*\{'width': 2\}\)"):
        GridSearch(lambda width: nn.Linear(2, width), {"width": [2]}).fit(x, y)
    assert not hasattr(search, "cv_results_")  # nothing recorded by the failed fits


# ---------------------------------------------------------------------------- the API document
DOCUMENT_EXAMPLE = '''
import neurenix as nx
from neurenix.continual import EWC
from neurenix.automl import GridSearch

# Define a function to create an EWC model with different hyperparameters
def create_ewc_model(importance=1000.0, fisher_sample_size=1000):
    model = nx.nn.Sequential(
        nx.nn.Linear(784, 256),
        nx.nn.ReLU(),
        nx.nn.Linear(256, 10)
    )
    return EWC(model, importance=importance, fisher_sample_size=fisher_sample_size)

# Define hyperparameter space
param_space = {
    'importance': [100.0, 1000.0, 10000.0],
    'fisher_sample_size': [100, 500, 1000]
}

# Use grid search to find the best hyperparameters
grid_search = GridSearch(
    model_fn=create_ewc_model,
    param_space=param_space,
    scoring='accuracy',
    cv=3
)

grid_search.fit(X, y)
best_params = grid_search.best_params()
print(f"Best hyperparameters: {best_params}")
'''


def test_the_document_example_runs_unchanged(capsys):
    rng = np.random.default_rng(0)
    namespace = {"X": rng.random((60, 784)), "y": rng.integers(0, 10, 60)}
    # One task: EWC's hyperparameters act from the second task on, so all 9 tie, and we say so.
    with pytest.warns(UserWarning, match=r"every combination of param_space scored .*fit\(tasks="):
        exec(compile(DOCUMENT_EXAMPLE, "continual-learning-api.txt", "exec"), namespace)
    search = namespace["grid_search"]
    assert len(search.cv_results_["params"]) == 9
    assert namespace["best_params"] == {"importance": 100.0, "fisher_sample_size": 100}
    assert "Best hyperparameters: {'importance': 100.0, 'fisher_sample_size': 100}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- parallel runs
def test_runs_in_parallel_processes_give_the_results_of_one_process():
    # Lambdas travel to the processes (joblib's loky pickles them), each run is seeded as in one
    # process and keeps the caller's thread count: equal bit for bit, not merely close.
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    options = dict(cv=2, epochs=3, batch_size=10, optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=4)
    space = {"importance": [0.0, 10.0, 1000.0]}
    one = GridSearch(ewc_net, space, **options).fit(tasks=tasks)
    try:
        parallel = GridSearch(ewc_net, space, n_jobs=2, **options).fit(tasks=tasks)
    finally:  # joblib keeps its worker processes for the next search: none may outlive this test
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    assert parallel.cv_results_ == one.cv_results_ and parallel.best_params() == one.best_params()
    assert len(set(one.cv_results_["mean_test_score"])) > 1  # the values differ: the comparison can fail


@pytest.mark.parametrize(("n_jobs", "error", "message"), [
    (0, ValueError, "n_jobs must be a number of processes >= 1, or -1 for every CPU, got 0"),
    (-2, ValueError, "n_jobs must be >= -1, got -2"),
    (1.5, TypeError, "n_jobs must be an int, got float: 1.5"),
])
def test_a_bad_n_jobs_is_refused(n_jobs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        GridSearch(ewc_net, {"importance": [1.0]}, n_jobs=n_jobs)


def test_score_gives_one_combinations_fold_scores_as_fit_does():
    tasks = [blobs([0, 1], seed=1), blobs([2, 3], seed=2)]
    options = dict(cv=2, epochs=3, batch_size=10, optimizer=lambda p: torch.optim.Adam(p, lr=0.02), seed=4)
    search = GridSearch(ewc_net, {"importance": [0.0, 1000.0]}, **options)
    results = search.fit(tasks=tasks).cv_results_
    for i, params in enumerate(results["params"]):
        assert search.score(params, tasks=tasks) == [results["split0_test_score"][i], results["split1_test_score"][i]]
    with pytest.raises(ValueError, match=re.escape("params must give a value for each of ['importance'], got ['gamma']")):
        search.score({"gamma": 1.0}, tasks=tasks)
