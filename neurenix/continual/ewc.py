"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017); online EWC (Schwarz et al. 2018)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_choice, check_int, check_model, check_real, check_task_id
from neurenix.continual.base import default_seed, trainable_parameters, uncompiled
from neurenix.continual.quadratic import QuadraticPenaltyMethod, snapshot
from neurenix.continual.sample_gradients import PerSampleGradients, readable_task_batch, task_gradient_mean

__all__ = ["EWC", "FISHER_LABELS"]

#: The labels EWC's Fisher is taken at: the dataset's ("empirical"), drawn from the model's
#: predictive distribution ("true"), or the model's most likely label ("predicted").
FISHER_LABELS = ("empirical", "true", "predicted")

_PREDICTED_GAUSSIAN = (
    "fisher='predicted' needs a likelihood with a most likely label (categorical or bernoulli), got a gaussian "
    "one: its most likely target is the output itself, where the Fisher is zero; use fisher='true' or 'empirical'"
)

class EWC(QuadraticPenaltyMethod):
    """Elastic Weight Consolidation: a quadratic pull weighted by each parameter's Fisher information.

    After each task ``t`` the diagonal Fisher ``F_t`` is estimated at the task's final parameters
    ``θ*_t`` from ``fisher_sample_size`` samples of the task, each with its own gradient: in
    closed form for networks of ``nn.Linear`` layers (about one training step per batch), else
    with ``torch.func.vmap`` over per-sample gradients. Training later tasks adds ``importance/2 · Σ_t Σ F_t·(θ − θ*_t)²``
    (one penalty per task), or, with ``online=True``, ``importance/2 · Σ F·(θ − θ*)²`` with
    ``F ← gamma·F + F_t`` and the single anchor of the last task.

    The Fisher is that of the likelihood the model is trained with (``likelihood``): by default
    read from the loss given to ``train_step`` (``cross_entropy``/``CrossEntropyLoss``/``NLLLoss``:
    categorical; ``mse_loss``/``MSELoss``: Gaussian; ``binary_cross_entropy_with_logits``/
    ``BCEWithLogitsLoss``: Bernoulli), else from the targets: class indices mean categorical, and
    floating-point targets must be told (``likelihood="gaussian"`` for regression). A model with
    one output under a categorical likelihood is refused (its Fisher would be zero).

    Args:
        model: the network whose parameters are protected (for a Lightning run: the
            LightningModule or a submodule of it). Its outputs are the likelihood's parameters
            (class logits by default).
        importance: ``λ`` in the penalty, ``>= 0``.
        fisher_sample_size: samples per task for the Fisher, ``> 0`` (all of them if the task
            has fewer); drawn at random (``seed``) from a map-style dataset.
        device: where the state lives; ``None`` follows the model.
        online: keep one running Fisher and one anchor instead of one penalty per task.
        gamma: decay of the running Fisher in online mode, in ``[0, 1]``.
        fisher: ``"empirical"`` (gradients at the dataset's labels), ``"true"`` (at labels
            drawn from the model's own predictive distribution) or ``"predicted"`` (at the
            label the model finds most likely: its largest logit, as the code behind Hsu et al.
            2018 and FACIL's ``max_pred``; not with a Gaussian likelihood, whose Fisher would
            then be zero).
        seed: seeds the sampling of Fisher data and labels; ``None`` derives one from PyTorch's
            initial seed (so ``seed_everything`` makes runs repeatable). PyTorch's global
            generator is left as it was (the Fisher's DataLoaders draw from it otherwise).
        likelihood: ``None`` (inferred, above), ``"categorical"`` (logits; cross-entropy),
            ``"gaussian"`` (means of a unit-variance Gaussian; squared error: the Fisher scales
            with ``1/σ²``, which ``importance`` absorbs) or ``"bernoulli"`` (one logit per
            output; binary cross-entropy with logits).

    Raises:
        TypeError / ValueError: an argument outside its range (named in the message).

    Example::

        ewc = EWC(model, importance=1000.0)
        ewc.register_task(task_id=1, dataloader=task1_loader)
        for inputs, targets in task1_loader:
            ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
        ewc.register_task(task_id=2, dataloader=task2_loader)  # consolidates task 1
    """

    penalty_name = "EWC penalty"

    def __init__(
        self,
        model: torch.nn.Module,
        importance: float = 1000.0,
        fisher_sample_size: int = 1000,
        device: Optional[torch.device] = None,
        *,
        online: bool = False,
        gamma: float = 1.0,
        fisher: str = "empirical",
        seed: Optional[int] = None,
        likelihood: Optional[str] = None,
    ) -> None:
        check_model(model)
        self.importance = check_real("importance", importance, minimum=0.0)
        self.fisher_sample_size = check_int("fisher_sample_size", fisher_sample_size, minimum=1)
        if not isinstance(online, bool):
            raise TypeError(f"online must be a bool, got {type(online).__name__}: {online!r}")
        self.online = online
        self.gamma = check_real("gamma", gamma, minimum=0.0, maximum=1.0)
        self.fisher = check_choice("fisher", fisher, FISHER_LABELS)
        self.likelihood = None if likelihood is None else check_choice("likelihood", likelihood, CF.LIKELIHOODS)
        if self.fisher == "predicted" and self.likelihood == "gaussian":
            raise ValueError(_PREDICTED_GAUSSIAN)
        seed = default_seed("EWC") if seed is None else check_int("seed", seed, minimum=0)
        super().__init__(model, device)
        self._generator = torch.Generator().manual_seed(seed)
        #: task id -> {"fisher": {name: F}, "anchor": {name: θ*}, "buffers": {name: b}, "samples": n}
        #: (buffers: BatchNorm statistics and the like at the task's end); in online mode
        #: a single entry (the last task) holding the running Fisher.
        self._tasks: dict[int, dict[str, Any]] = {}
        #: The likelihood of the last loss function given to train_step, where it names one.
        self._loss_likelihood: Optional[str] = None

    def hyperparameters(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "importance": self.importance,
            "fisher_sample_size": self.fisher_sample_size,
            "online": self.online,
            "gamma": self.gamma,
            "fisher": self.fisher,
        }
        if self.likelihood is not None:  # a key added later joins only when set: old checkpoints load
            settings["likelihood"] = self.likelihood
        return settings

    def _penalty_scale(self) -> float:
        return self.importance

    # ---------------------------------------------------------------------------- the continual-learning API
    def get_ewc_loss(self) -> Tensor:
        """``importance/2 · Σ_t Σ F_t·(θ − θ*_t)²``, differentiable in the model's parameters.

        Zero before the first task is consolidated. A tensor to add to a loss in your own loop.
        To read it as a number use ``.item()`` (PyTorch warns on ``float()`` of a tensor that requires grad).

        Raises:
            FloatingPointError: the penalty is NaN or infinite (the message names the parameter).
        """
        return self.penalty()

    def update_fisher(self, task_id: int, dataloader: Any) -> None:
        """Estimate task ``task_id``'s Fisher from ``dataloader`` (replacing what it had).

        For the task being trained, the data is kept and used when the task is consolidated.
        For a consolidated task, the Fisher is computed at that task's own anchor ``θ*``
        (not at the current parameters). In online mode only the last task, consolidated
        without data, can get its Fisher later (older ones are folded into the running sum).

        Raises:
            ValueError: ``dataloader`` is ``None``, or ``task_id`` was never registered, or
                (online mode) its Fisher can no longer be separated from the running sum.
        """
        task_id = check_task_id(task_id)
        if dataloader is None:
            raise ValueError(f"update_fisher needs data for task {task_id}, got dataloader=None")
        if task_id == self.active_task:
            self._task_data = dataloader
            return
        if task_id not in self._tasks:
            if task_id in self.finished_tasks and self.online:
                raise ValueError(
                    f"online EWC folded task {task_id}'s Fisher into its running sum; only the last "
                    f"task ({self.finished_tasks[-1]}) can get its Fisher later"
                )
            known = self.finished_tasks + ([self.active_task] if self.active_task is not None else [])
            raise ValueError(f"update_fisher: task_id={task_id} was never registered (tasks: {known})")
        self.prepare_for_device()
        term = self._tasks[task_id]
        fisher, samples = self._estimate_fisher(term["anchor"], dataloader, term["buffers"], task_id=task_id)
        if self.online:
            if term["samples"] > 0:
                raise ValueError(
                    f"online EWC already holds task {task_id}'s Fisher inside its running sum; "
                    "it can only be supplied later for a task consolidated without data"
                )
            fisher = {name: term["fisher"][name] + f for name, f in fisher.items()}
        self._tasks[task_id] = {**term, "fisher": fisher, "samples": samples}
        self._rebuild_penalty()

    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        task_id: int,
    ) -> Tensor:
        """:meth:`ContinualMethod.train_step`; ``loss_fn`` also tells the Fisher's likelihood (see the class)."""
        likelihood = likelihood_of_loss(loss_fn)
        if self.fisher == "predicted" and (self.likelihood or likelihood) == "gaussian":
            raise ValueError(f"{_PREDICTED_GAUSSIAN} (the likelihood of loss_fn {getattr(loss_fn, '__name__', type(loss_fn).__name__)})")
        if likelihood is None and self.likelihood is None and isinstance(targets, Tensor):
            name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            _refuse_unknown_likelihood(targets, f"train_step's targets, with a loss_fn ({name}) that names none")
        loss = super().train_step(optimizer, loss_fn, inputs, targets, task_id)
        # Set after the step: a new task_id consolidates the previous task with its own loss's.
        self._loss_likelihood = likelihood or self._loss_likelihood
        return loss

    def check_task_batch(self, batch: Any) -> None:
        """At a fit's first batch: the Fisher will read the fit's batches at the task's end; can it?"""
        if self._task_data is not None:  # the user gave the Fisher's data (register_task, update_fisher)
            return
        targets = readable_task_batch(self, batch, "Fisher")
        if self.likelihood is None:
            _refuse_unknown_likelihood(targets, "the training batches")

    def _likelihood_of(self, targets: Tensor) -> str:
        """The likelihood whose Fisher is taken: given, else the train_step loss's, else from the targets."""
        likelihood = self.likelihood or self._loss_likelihood
        if likelihood is None:
            _refuse_unknown_likelihood(targets, "the Fisher's data")
            likelihood = "categorical"
        return likelihood

    # ---------------------------------------------------------------------------- consolidation
    def _consolidate(self, task_id: int, data: Any) -> None:
        anchor = snapshot(trainable_parameters(self.model), self.device)
        buffers = snapshot(dict(uncompiled(self.model).named_buffers()), self.device)
        if data is None:
            warnings.warn(
                f"EWC consolidated task {task_id} without data: its penalty is zero until "
                f"update_fisher({task_id}, dataloader) supplies it",
                stacklevel=3,
            )
            fisher, samples = {name: torch.zeros_like(a) for name, a in anchor.items()}, 0
        else:
            fisher, samples = self._estimate_fisher(anchor, data, task_id=task_id)
        if self.online and self._tasks:
            (previous,) = self._tasks.values()
            fisher = {name: f + self.gamma * previous["fisher"][name] for name, f in fisher.items()}
            self._tasks = {}
        self._tasks[task_id] = {"fisher": fisher, "anchor": anchor, "buffers": buffers, "samples": samples}
        self._rebuild_penalty()

    def _rebuild_penalty(self) -> None:
        """Fold ``Σ_t F_t·(θ − θ*_t)²`` into ``W·(θ − θ̄)² + 2c`` exactly.

        ``W = Σ_t F_t``, ``θ̄ = Σ_t F_t θ*_t / W`` and ``2c = Σ_t F_t·(θ*_t − θ̄)²`` (the parallel-axis
        identity). ``θ̄`` is computed as an offset from the last anchor so that one task gives
        exactly ``θ̄ = θ*``.
        """
        terms = list(self._tasks.values())
        if not terms:
            self._set_penalty({}, None, 0.0)
            return
        last = terms[-1]["anchor"]
        weight, anchor, constant = {}, {}, 0.0
        for name, last_anchor in last.items():
            fishers = [t["fisher"][name] for t in terms]
            total = torch.stack(fishers).sum(0)
            offset = sum(f * (t["anchor"][name] - last_anchor) for f, t in zip(fishers, terms))
            mean = last_anchor + offset / total.clamp_min(torch.finfo(total.dtype).tiny)
            weight[name], anchor[name] = total, mean
            if len(terms) > 1:
                constant += 0.5 * sum(float((f * (t["anchor"][name] - mean).square()).sum()) for f, t in zip(fishers, terms))
        self._set_penalty(anchor, weight, constant)

    def _estimate_fisher(
        self, at: dict[str, Tensor], data: Any, buffers: Optional[dict[str, Tensor]] = None, *, task_id: Optional[int] = None
    ) -> tuple[dict[str, Tensor], int]:
        """Mean squared per-sample gradient at parameters ``at`` (and ``buffers``, default the
        model's own), from up to ``fisher_sample_size`` samples of task ``task_id``
        (:func:`~neurenix.continual.sample_gradients.task_gradient_mean`)."""
        gradients = PerSampleGradients(self.model, at, power=2)

        def batch_sums(others: dict[str, Tensor], inputs: tuple[Tensor, ...], targets: Tensor) -> tuple[dict[str, Tensor], int]:
            likelihood = self._likelihood_of(targets)
            if self.fisher != "empirical":
                targets = self._labels_from_model(at, others, inputs, likelihood)
            return gradients.sums(others, inputs, targets, CF.likelihood_objective(likelihood)), targets.shape[0]

        return task_gradient_mean(
            self, at, data, self.fisher_sample_size, self._generator, batch_sums, buffers=buffers, task_id=task_id
        )

    def _labels_from_model(
        self, at: dict[str, Tensor], others: dict[str, Tensor], inputs: tuple[Tensor, ...], likelihood: str
    ) -> Tensor:
        """The labels of the true Fisher (drawn from the model) or of the "predicted" one (its most likely label)."""
        with torch.no_grad():
            logits = torch.func.functional_call(uncompiled(self.model), (at, others), inputs)
        # Non-finite logits (NaN inputs or parameters) cannot be sampled from; zeros can, and such
        # a Fisher is refused after the sum (its inputs are counted, its values are checked).
        logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
        if self.fisher == "predicted":
            return CF.predicted_labels(logits, likelihood)
        return CF.sample_model_labels(logits.cpu(), self._generator, likelihood).to(logits.device)

    # ---------------------------------------------------------------------------- state
    def _move_state(self, device: torch.device) -> None:
        self._tasks = {
            task: {**term, **{key: _on(term[key], device) for key in ("fisher", "anchor", "buffers")}}
            for task, term in self._tasks.items()
        }
        self._rebuild_penalty()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "tasks": dict(self._tasks),
            "generator": self._generator.get_state(),
            "loss_likelihood": self._loss_likelihood,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loss_likelihood = state_dict.get("loss_likelihood")
        device = self.device
        self._tasks = {
            int(task): {
                "fisher": _on(term["fisher"], device),
                "anchor": _on(term["anchor"], device),
                "buffers": _on(term.get("buffers", {}), device),
                "samples": int(term.get("samples", 0)),
            }
            for task, term in state_dict.get("tasks", {}).items()
        }
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"].cpu())
        self._rebuild_penalty()


#: Loss functions that name their likelihood: the Fisher of the loss the user trains with.
_LOSS_LIKELIHOODS: dict[Any, str] = {
    torch.nn.CrossEntropyLoss: "categorical",
    torch.nn.functional.cross_entropy: "categorical",
    torch.nn.NLLLoss: "categorical",  # of log-probabilities, whose log-softmax is themselves
    torch.nn.functional.nll_loss: "categorical",
    torch.nn.MSELoss: "gaussian",
    torch.nn.functional.mse_loss: "gaussian",
    torch.nn.BCEWithLogitsLoss: "bernoulli",
    torch.nn.functional.binary_cross_entropy_with_logits: "bernoulli",
}


def likelihood_of_loss(loss_fn: Any) -> Optional[str]:
    """The likelihood behind one of PyTorch's losses (a class instance or the function), else ``None``."""
    try:
        return _LOSS_LIKELIHOODS.get(loss_fn) or _LOSS_LIKELIHOODS.get(type(loss_fn))
    except TypeError:  # an unhashable callable
        return None


def _refuse_unknown_likelihood(targets: Tensor, source: str) -> None:
    """Floating-point targets leave the likelihood open (regression? binary? soft labels?): ask."""
    if targets.is_floating_point():
        raise ValueError(
            f"EWC cannot tell the likelihood of floating-point targets ({targets.dtype}, from {source}): pass "
            "EWC(..., likelihood='gaussian') for squared-error regression, 'bernoulli' for binary "
            "cross-entropy with logits, or 'categorical' for class probabilities (soft labels)"
        )


def _on(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: t.to(device) for name, t in tensors.items()}
