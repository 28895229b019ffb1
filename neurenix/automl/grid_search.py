"""Exhaustive hyperparameter search for continual-learning methods, scored by cross-validation.

:class:`GridSearch` tries every combination of ``param_space``: for each, ``model_fn(**params)``
builds a fresh continual method, which is trained through its own ``train_step`` and scored on
held-out data, fold by fold. Two kinds of data:

- ``fit(X, y)``: one task, stratified k-fold cross-validation (the Neurenix continual-learning API's form);
- ``fit(tasks=[...])``: a task sequence. Fold ``k`` holds out part ``k`` of *every* task, trains
  the tasks in order on the rest, and scores the average accuracy over all tasks' held-out parts
  after the last task: the number a continual-learning user needs, which on a single task no
  regularization hyperparameter can move. ``validation_tasks=`` replaces the k-fold split by
  given validation sets (one split).

A benchmark's test sets are never searched on: passing a :class:`~neurenix.data.TaskSequence`
uses its ``.train`` tasks only, leaving ``.test`` for the final, unbiased report.

Limits: the model is called as ``model(inputs)`` (``train_step`` passes no task ids), so a
multi-head model that needs task ids cannot be searched yet; runs are sequential, in one process.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from neurenix.continual._checks import check_int
from neurenix.continual.base import ContinualMethod, evaluation_mode
from neurenix.data.tasks import TaskDataset

__all__ = ["GridSearch", "default_optimizer", "parameter_grid", "stratified_folds"]

Scorer = Callable[[Tensor, Tensor], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: Adam's learning rate when no ``optimizer`` factory is given (PyTorch's own default).
DEFAULT_LEARNING_RATE = 1e-3


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, lr=1e-3)``: the optimizer each run gets unless told otherwise."""
    return torch.optim.Adam(params, lr=DEFAULT_LEARNING_RATE)


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).double().mean())


def _neg_log_loss(logits: Tensor, targets: Tensor) -> float:
    return -float(nn.functional.cross_entropy(logits.double(), targets))


#: Built-in scorers, ``(logits, targets) -> float``, higher is better (scikit-learn's convention).
SCORERS: dict[str, Scorer] = {"accuracy": _accuracy, "neg_log_loss": _neg_log_loss}


def _run_with_threads(search: "GridSearch", params: dict[str, Any], tasks: list, seed: int, threads: int) -> float:
    """One run in a worker process, with the caller's number of PyTorch threads (a float sum
    split over another number of threads may round differently)."""
    torch.set_num_threads(threads)
    return search._run(params, tasks, seed)


def parameter_grid(param_space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``param_space``, the last name varying fastest (``itertools.product``).

    Names keep ``param_space``'s order (scikit-learn's ``ParameterGrid`` sorts them; keeping the
    user's order makes the grid, and the tie-break between equal scores, read as written).
    """
    names = list(param_space)
    return [dict(zip(names, values)) for values in itertools.product(*(param_space[n] for n in names))]


def stratified_folds(targets: Tensor, cv: int, seed: int) -> list[Tensor]:
    """The validation indices of each of ``cv`` folds: shuffled, then dealt out class by class.

    ``perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))``; the samples in
    that order are stably sorted by label and dealt round-robin, so fold ``k`` is
    ``order[k::cv]`` with ``order = perm[argsort(targets[perm], stable=True)]``. Every class is
    spread evenly over the folds and fold sizes differ by at most one.
    """
    perm = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(targets[perm], stable=True)]
    return [order[k::cv] for k in range(cv)]


@dataclass
class _Task:
    """One task's training and validation samples for one fold."""

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor


class GridSearch:
    """Try every combination of ``param_space`` and keep the one that cross-validates best.

    Each run (one combination, one fold) is built and trained the same way, so scores differ only
    by the hyperparameters: under ``torch.manual_seed(seed)`` (in a forked RNG state, so the
    caller's generators are untouched) ``method = model_fn(**params)`` is built,
    ``optimizer(method.model.parameters())`` made, and each task ``t = 0, 1, ...`` trained for
    ``epochs`` epochs of mini-batches in the order of ``torch.randperm`` from one
    ``torch.Generator().manual_seed(seed)`` per run (one permutation per epoch):

    - ``method.register_task(t, DataLoader(TensorDataset(x_t, y_t), batch_size=batch_size))``
      before the task (EWC's Fisher and MAS's importance get their data; the previous task is consolidated);
    - ``method.train_step(optimizer, loss_fn, xb, yb, task_id=t)`` per batch, then
      ``method.add_to_memory(xb, yb, t)`` for ``ExperienceReplay``, whose ``train_step`` leaves
      that to its caller (the rehearsal methods whose ``remembers_training_batches`` is true,
      ``DarkExperienceReplay``, ``ERACE``, ``AGEM`` and ``GEM``, offer the batch to their
      memory inside ``train_step``).

    ``GDumb`` instead gets each task's batches through ``add_to_memory`` and is then retrained on
    its memory (``train_on_memory`` with the same optimizer factory, loss, epochs and batch size).
    Then the model, in eval mode without gradients, is scored on each task's held-out samples
    and the scores are averaged over the tasks; a method that predicts through a classifier of
    its own (``ICaRL.classifier``, nearest means of exemplars) ends the last task and is scored
    by it. Floating-point inputs are cast to the model's
    floating dtype (NumPy's float64 meets a float32 model).

    Args:
        model_fn: ``model_fn(**params)`` returns a continual method (a
            :class:`~neurenix.continual.ContinualMethod`: ``EWC``, a rehearsal method such as
            ``ExperienceReplay`` or ``DarkExperienceReplay``, ...).
        param_space: a non-empty dict from ``model_fn``'s argument names to non-empty lists of
            values.
        scoring: ``"accuracy"``, ``"neg_log_loss"``, or a callable ``(logits, targets) -> float``;
            higher is better.
        cv: folds of cross-validation, ``>= 2``.
        epochs: passes over each task's training part per run, ``>= 1``.
        batch_size: samples per training step, ``>= 1``.
        optimizer: ``optimizer(parameters)`` returns the optimizer of a run (default
            :func:`default_optimizer`, Adam with ``lr=1e-3``).
        loss_fn: ``loss_fn(outputs, targets)``; default ``torch.nn.CrossEntropyLoss()``.
        seed: the seed of the folds, the model initialization and the batch order; ``None``
            takes ``torch.initial_seed()`` at ``fit`` (so ``nx.init(seed)`` makes runs repeatable).
        verbose: print each combination's mean score.
        n_jobs: runs (combination × fold) at once, each in a process of its own (joblib's
            ``loky`` backend, which scikit-learn uses for its searches); ``-1`` uses every CPU.
            Each run is seeded as in one process and runs with the caller's number of PyTorch
            threads, so the results equal ``n_jobs=1``'s bit for bit. ``model_fn``, the optimizer
            factory and the loss are sent to the processes (lambdas and closures included).
            joblib keeps its worker processes for the next parallel call (they exit after a few
            idle minutes, or with ``joblib.externals.loky.get_reusable_executor().shutdown()``).

    Attributes (after ``fit``):
        cv_results_: scikit-learn style, one entry per combination in grid order: ``params``,
            ``param_<name>``, ``split<k>_test_score``, ``mean_test_score``, ``std_test_score``
            (population standard deviation over folds) and ``rank_test_score`` (1 is best; equal
            scores share the lowest rank).
        best_index_, best_params_, best_score_: the best combination (the first in grid order
            among equals), its parameters and its mean score.
        seed_: the seed the fit used.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range, ``param_space``
            empty, holding an empty list, or naming an argument ``model_fn`` does not take (or
            leaving out one it requires); the message names the argument and the value.

    Example::

        search = GridSearch(lambda importance: EWC(make_model(), importance=importance),
                            {"importance": [1.0, 100.0, 10000.0]}, epochs=2)
        search.fit(tasks=benchmark)           # benchmark.train, k-fold within each task
        search.best_params()                  # e.g. {'importance': 100.0}
    """

    def __init__(
        self,
        model_fn: Callable[..., ContinualMethod],
        param_space: Mapping[str, Sequence[Any]],
        scoring: Union[str, Scorer] = "accuracy",
        cv: int = 3,
        *,
        epochs: int = 5,
        batch_size: int = 32,
        optimizer: OptimizerFactory = default_optimizer,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        seed: Optional[int] = None,
        verbose: bool = False,
        n_jobs: int = 1,
    ) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}: {model_fn!r:.80}")
        self.model_fn = model_fn
        self.param_space = _checked_param_space(param_space, model_fn)
        self.scoring = scoring
        self._scorer = _checked_scoring(scoring)
        self.cv = check_int("cv", cv, minimum=2)
        self.epochs = check_int("epochs", epochs, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable parameters -> Optimizer, got {type(optimizer).__name__}: {optimizer!r:.80}")
        self.optimizer = optimizer
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}: {loss_fn!r:.80}")
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.verbose = bool(verbose)
        self.n_jobs = check_int("n_jobs", n_jobs, minimum=-1)
        if self.n_jobs == 0 or self.n_jobs < -1:
            raise ValueError(f"n_jobs must be a number of processes >= 1, or -1 for every CPU, got {n_jobs!r}")

    # ---------------------------------------------------------------------------- fitting
    def fit(
        self,
        X: Any = None,
        y: Any = None,
        *,
        tasks: Any = None,
        validation_tasks: Any = None,
    ) -> "GridSearch":
        """Score every combination and record the results; returns ``self``.

        Args:
            X: one task's inputs ``(N, ...)``, a tensor or a NumPy array.
            y: its integer labels ``(N,)``.
            tasks: instead of ``X, y``, a task sequence: a list of tasks, each an ``(inputs,
                labels)`` pair or a dataset whose items are ``(x, y)`` or ``(x, y, task_id)``
                (``TensorDataset``, ``TaskDataset``), or an object with a ``.train`` list of them
                (a :class:`~neurenix.data.TaskSequence`, whose ``.test`` is left alone).
            validation_tasks: with ``tasks``, one validation set per task, in the same forms;
                then every combination is scored once on them instead of by ``cv`` folds.

        Raises:
            TypeError / ValueError: data of the wrong kind or shape, ``X`` and ``tasks`` both or
                neither given, ``cv`` larger than a task's sample count, or ``model_fn``
                returning something that is not a continual method.
        """
        seed = torch.initial_seed() if self.seed is None else self.seed
        folds = self._folds(X, y, tasks, validation_tasks, seed)
        grid = parameter_grid(self.param_space)
        flat = self._run_all([(params, fold) for params in grid for fold in folds], seed)
        scores = [flat[k : k + len(folds)] for k in range(0, len(flat), len(folds))]
        self.seed_ = seed
        self._record(grid, scores, single_task=len(folds[0]) == 1)
        return self

    def score(
        self,
        params: Mapping[str, Any],
        X: Any = None,
        y: Any = None,
        *,
        tasks: Any = None,
        validation_tasks: Any = None,
    ) -> list[float]:
        """One combination's score on each fold, exactly as :meth:`fit` computes it (the same
        folds, seed and runs): ``fit``'s ``split<k>_test_score`` of that combination.

        For running a search's combinations elsewhere, one at a time: each trial of a
        distributed search engine (an Optuna study with shared storage) scores its combination
        with ``score``, and the search over every combination equals ``fit``'s
        (``examples/optuna_search.py``).

        Args:
            params: the arguments of ``model_fn``: one value for each name of ``param_space``.
            X: one task's inputs, as for :meth:`fit`.
            y: its labels.
            tasks: a task sequence instead of ``X, y``.
            validation_tasks: with ``tasks``, one validation set per task.

        Raises:
            ValueError: ``params`` names other arguments than ``param_space``; and as :meth:`fit`.
        """
        params = dict(params)
        if set(params) != set(self.param_space):
            raise ValueError(f"params must give a value for each of {sorted(self.param_space)}, got {sorted(params)}")
        seed = torch.initial_seed() if self.seed is None else self.seed
        folds = self._folds(X, y, tasks, validation_tasks, seed)
        return self._run_all([(params, fold) for fold in folds], seed)

    def best_params(self) -> dict[str, Any]:
        """The best combination found by :meth:`fit` (a copy).

        Raises:
            RuntimeError: ``fit`` has not run yet.
        """
        if not hasattr(self, "best_params_"):
            raise RuntimeError("GridSearch.best_params() was called before fit(X, y) or fit(tasks=...): nothing was searched yet")
        return dict(self.best_params_)

    def _run_all(self, runs: list[tuple[dict[str, Any], list[_Task]]], seed: int) -> list[float]:
        """Every run's score, in the order of ``runs``: here, or in ``n_jobs`` processes."""
        if self.n_jobs == 1 or len(runs) == 1:
            return [self._run(params, tasks, seed) for params, tasks in runs]
        import joblib  # scikit-learn's dependency: imported only for a parallel search

        threads = torch.get_num_threads()
        jobs = (joblib.delayed(_run_with_threads)(self, params, tasks, seed, threads) for params, tasks in runs)
        return list(joblib.Parallel(n_jobs=self.n_jobs, backend="loky")(jobs))

    def _run(self, params: dict[str, Any], tasks: list[_Task], seed: int) -> float:
        """Build ``model_fn(**params)``, train it on the tasks in order, return the mean held-out score."""
        # Every CUDA device named, so that fork_rng does not warn on multi-GPU machines.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            method = self._build(params)
            dtype = _floating_dtype(method.model)
            optimizer = self.optimizer(method.model.parameters())
            order = torch.Generator().manual_seed(seed)
            for task_id, task in enumerate(tasks):
                self._train_task(method, optimizer, task_id, _cast(task.train_inputs, dtype), task.train_targets, order)
            predictor = getattr(method, "classifier", None)
            if predictor is not None:  # iCaRL predicts by nearest means, which a task's end computes
                method.finish_task()
            return sum(self._score(method, predictor, _cast(t.val_inputs, dtype), t.val_targets) for t in tasks) / len(tasks)

    def _build(self, params: dict[str, Any]) -> ContinualMethod:
        try:
            method = self.model_fn(**params)
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11+: say which combination failed
                error.add_note(f"(raised by GridSearch's model_fn(**{params!r}))")
            raise
        if not isinstance(method, ContinualMethod):
            raise TypeError(
                f"model_fn must return a neurenix continual method (a ContinualMethod such as EWC or "
                f"ExperienceReplay), got {type(method).__name__} from model_fn(**{params!r}); wrap the "
                "network: return EWC(model, ...)"
            )
        return method

    def _train_task(
        self, method: ContinualMethod, optimizer: torch.optim.Optimizer, task_id: int, inputs: Tensor, targets: Tensor, order: torch.Generator
    ) -> None:
        method.register_task(task_id, DataLoader(TensorDataset(inputs, targets), batch_size=self.batch_size))
        if hasattr(method, "train_on_memory"):  # GDumb: the task fills the memory, then retrains on it alone
            for batch in torch.randperm(inputs.shape[0], generator=order).split(self.batch_size):
                method.add_to_memory(inputs[batch], targets[batch], task_id)
            method.train_on_memory(self.optimizer, self.loss_fn, self.epochs, self.batch_size, generator=order)
            return
        # Only ExperienceReplay leaves the memory to its caller; the other rehearsal methods
        # store the batch in train_step and refuse it a second time.
        remembers_itself = getattr(method, "remembers_training_batches", True)
        remember = None if remembers_itself else getattr(method, "add_to_memory", None)
        method.model.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(inputs.shape[0], generator=order).split(self.batch_size):
                xb, yb = inputs[batch], targets[batch]
                method.train_step(optimizer, self.loss_fn, xb, yb, task_id=task_id)
                if remember is not None:
                    remember(xb, yb, task_id)

    def _score(self, method: ContinualMethod, predictor: Optional[Callable[[Tensor], Tensor]], inputs: Tensor, targets: Tensor) -> float:
        predict = method.model if predictor is None else predictor
        with evaluation_mode(method.model), torch.no_grad():
            chunks = inputs.to(method.device).split(self.batch_size)
            logits = torch.cat([predict(chunk) for chunk in chunks])
        return float(self._scorer(logits, targets.to(logits.device)))

    def _record(self, grid: list[dict[str, Any]], scores: list[list[float]], single_task: bool) -> None:
        means = [sum(s) / len(s) for s in scores]
        stds = [math.sqrt(sum((v - m) ** 2 for v in s) / len(s)) for s, m in zip(scores, means)]
        ranked = [-math.inf if math.isnan(m) else m for m in means]  # a diverged run never wins
        results: dict[str, list[Any]] = {"params": [dict(p) for p in grid]}
        for name in self.param_space:
            results[f"param_{name}"] = [p[name] for p in grid]
        for k in range(len(scores[0])):
            results[f"split{k}_test_score"] = [s[k] for s in scores]
        results["mean_test_score"] = means
        results["std_test_score"] = stds
        results["rank_test_score"] = [1 + sum(other > m for other in ranked) for m in ranked]
        self.cv_results_ = results
        self.best_index_ = max(range(len(means)), key=lambda i: (ranked[i], -i))  # first among equals
        self.best_params_ = dict(grid[self.best_index_])
        self.best_score_ = means[self.best_index_]
        if self.verbose:
            for params, mean, std in zip(grid, means, stds):
                print(f"GridSearch {params}: {mean:.4f} ± {std:.4f}")
        if len(grid) > 1 and len(set(means)) == 1:
            hint = (
                " (on a single task a continual method's regularization never acts: it protects a task "
                "from the second one on; search with fit(tasks=[...]))" if single_task else ""
            )
            warnings.warn(f"every combination of param_space scored {means[0]!r}: the hyperparameters made no difference{hint}", stacklevel=3)

    # ---------------------------------------------------------------------------- data
    def _folds(self, X: Any, y: Any, tasks: Any, validation_tasks: Any, seed: int) -> list[list[_Task]]:
        """Each fold's list of tasks, checked before any training."""
        if tasks is not None:
            if X is not None or y is not None:
                raise ValueError("fit takes either X, y (one task) or tasks=[...] (a sequence), got both")
            train = [_task_tensors(f"tasks[{i}]", t) for i, t in enumerate(_task_list("tasks", tasks))]
            if validation_tasks is not None:
                val = [_task_tensors(f"validation_tasks[{i}]", t) for i, t in enumerate(_task_list("validation_tasks", validation_tasks))]
                if len(val) != len(train):
                    raise ValueError(f"validation_tasks must hold one set per task: got {len(val)} for {len(train)} tasks")
                return [[_Task(*t, *v) for t, v in zip(train, val)]]
        else:
            if validation_tasks is not None:
                raise ValueError("validation_tasks goes with tasks=[...]; fit(X, y) cross-validates instead")
            if X is None or y is None:
                raise ValueError(f"fit needs X and y, or tasks=[...]; got X={_short(X)} and y={_short(y)}")
            train = [_checked_pair("X", "y", X, y)]
        smallest = min(t[1].shape[0] for t in train)
        if self.cv > smallest:
            raise ValueError(f"cv={self.cv} folds need at least {self.cv} samples per task, but a task has only {smallest}")
        folds: list[list[_Task]] = [[] for _ in range(self.cv)]
        for inputs, targets in train:
            held_out = stratified_folds(targets, self.cv, seed)
            for k, val_index in enumerate(held_out):
                keep = torch.ones(targets.shape[0], dtype=torch.bool)
                keep[val_index] = False
                folds[k].append(_Task(inputs[keep], targets[keep], inputs[val_index], targets[val_index]))
        return folds


# ---------------------------------------------------------------------------- checks
def _checked_param_space(param_space: object, model_fn: Callable[..., Any]) -> dict[str, list[Any]]:
    if not isinstance(param_space, Mapping):
        raise TypeError(f"param_space must be a dict of name -> list of values, got {type(param_space).__name__}: {param_space!r:.80}")
    if not param_space:
        raise ValueError("param_space must name at least one hyperparameter, got an empty dict {}")
    checked: dict[str, list[Any]] = {}
    for name, values in param_space.items():
        if not isinstance(name, str):
            raise TypeError(f"param_space's names must be strings (model_fn's argument names), got {name!r}")
        if hasattr(values, "tolist"):
            values = values.tolist()  # a NumPy array or tensor: Python scalars, which the methods' checks take
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            raise TypeError(f"param_space[{name!r}] must be a list of values to try, got {type(values).__name__}: {values!r:.80}")
        values = list(values)
        if not values:
            raise ValueError(f"param_space[{name!r}] must list at least one value, got {values!r}")
        checked[name] = values
    _check_names_taken(checked, model_fn)
    return checked


def _check_names_taken(param_space: dict[str, list[Any]], model_fn: Callable[..., Any]) -> None:
    try:
        parameters = inspect.signature(model_fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): model_fn will say
        return
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        unknown = [name for name in param_space if name not in by_keyword]
        if unknown:
            raise ValueError(
                f"param_space names {unknown} but model_fn {_name(model_fn)} takes no such argument "
                f"(it takes {sorted(by_keyword)})"
            )
    required = [
        p.name for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in param_space
    ]
    if required:
        raise ValueError(f"model_fn {_name(model_fn)} requires {required}, which param_space {sorted(param_space)} does not give")


def _checked_scoring(scoring: object) -> Scorer:
    if callable(scoring):
        return scoring  # type: ignore[return-value]
    if isinstance(scoring, str) and scoring in SCORERS:
        return SCORERS[scoring]
    raise ValueError(f"scoring must be one of {', '.join(map(repr, SCORERS))} or a callable (logits, targets) -> float; got {scoring!r}")


def _checked_pair(x_name: str, y_name: str, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
    inputs, targets = _as_tensor(x_name, inputs), _as_tensor(y_name, targets)
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{x_name} must hold at least one sample, got shape {tuple(inputs.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"{y_name} must be 1-D (one label per sample), got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"{y_name} must hold integer class labels, got dtype {targets.dtype}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{x_name} and {y_name} must hold the same number of samples, got {x_name} of shape "
            f"{tuple(inputs.shape)} and {y_name} of shape {tuple(targets.shape)}"
        )
    return inputs, targets.long()


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or an array, got {type(value).__name__}: {value!r:.80}") from None


def _task_list(name: str, tasks: Any) -> list[Any]:
    if hasattr(tasks, "train") and not isinstance(tasks, (Sequence, Dataset)):
        tasks = tasks.train  # a TaskSequence: search on its training tasks, never on .test
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise TypeError(f"{name} must be a non-empty list of tasks (or a benchmark with .train), got {_short(tasks)}")
    return list(tasks)


def _task_tensors(name: str, task: Any) -> tuple[Tensor, Tensor]:
    """A task's ``(inputs, labels)`` from a pair of arrays or a dataset of ``(x, y[, task_id])`` items."""
    if isinstance(task, TensorDataset):
        inputs, targets = task.tensors[:2]
    elif isinstance(task, TaskDataset):
        inputs, targets = task[:][:2]  # the whole task as one batch, its transform applied
    elif isinstance(task, Dataset):
        samples = [task[i] for i in range(len(task))]  # type: ignore[arg-type]
        inputs = torch.stack([torch.as_tensor(s[0]) for s in samples])
        targets = torch.as_tensor([int(s[1]) for s in samples])
    elif isinstance(task, (tuple, list)) and len(task) == 2:
        return _checked_pair(f"{name}[0]", f"{name}[1]", *task)
    else:
        raise TypeError(f"{name} must be an (inputs, labels) pair or a dataset of (x, y) items, got {_short(task)}")
    return _checked_pair(f"{name}'s inputs", f"{name}'s labels", inputs, targets)


def _floating_dtype(model: nn.Module) -> Optional[torch.dtype]:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _cast(inputs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return inputs.to(dtype) if dtype is not None and inputs.is_floating_point() else inputs


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}: {value!r:.60}"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
