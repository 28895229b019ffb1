"""A GridSearch run by Optuna: one trial per combination, in as many processes or machines as share the study.

``GridSearch.fit`` scores every combination in one process (or ``n_jobs`` processes on one
machine). For a search that outgrows a machine, the same combinations can be trials of an
Optuna study whose storage every worker reaches (a database URL): each worker runs this script,
``GridSampler`` hands out the combinations, and each trial's value is ``GridSearch.score``, the
score ``fit`` would give that combination (same folds, seed and runs). Run it once, or create
the study in the storage once and then start as many workers as you like against it (two
workers creating a fresh database at the same instant would race to build its tables)::

    python examples/optuna_search.py --storage sqlite:///search.db --create
    python examples/optuna_search.py --storage sqlite:///search.db &
    python examples/optuna_search.py --storage sqlite:///search.db

(SQLite suits processes on one machine; across machines use a server database, e.g.
``--storage postgresql://user@host/db``.) It needs ``pip install optuna``.
"""

from __future__ import annotations

import argparse

import optuna
from torch import nn

from neurenix.automl import GridSearch
from neurenix.continual import EWC
from neurenix.data import split_benchmark

#: The combinations searched: EWC's importance on two tasks of split digits.
SPACE = {"importance": [0.0, 100.0, 10000.0]}


def make_method(importance: float) -> EWC:
    """One combination's method: a small MLP protected by EWC (module level, so processes can import it)."""
    return EWC(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)), importance=importance)


def make_search() -> GridSearch:
    return GridSearch(make_method, SPACE, cv=2, epochs=1, seed=0)


def tasks():
    return split_benchmark("digits", num_tasks=2, classes_per_task=2, scenario="domain", seed=0)


def objective(trial: optuna.Trial) -> float:
    params = {name: trial.suggest_categorical(name, values) for name, values in SPACE.items()}
    scores = make_search().score(params, tasks=tasks())
    trial.set_user_attr("split_scores", scores)
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", default=None, help="the study's database URL (default: in memory, this process only)")
    parser.add_argument("--study", default="neurenix-ewc-importance", help="the study's name in the storage")
    parser.add_argument("--create", action="store_true", help="create the study in the storage and stop (before starting workers)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=args.study, storage=args.storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.GridSampler(SPACE, seed=0),
    )
    if args.create:
        return study
    study.optimize(objective)  # GridSampler stops the study once every combination has a trial
    print(f"best {study.best_params} (mean score {study.best_value:.4f}) after {len(study.trials)} trials")
    return study


if __name__ == "__main__":
    main()
