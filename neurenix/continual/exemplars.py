"""Exemplars chosen from a task's data in feature space, and the nearest-mean-of-exemplars classifier.

iCaRL (Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation Learning") keeps,
per class, the samples whose features best represent the class (herding), and classifies by the
nearest class mean of those exemplars' features. The pieces, usable with any model and memory:

- :class:`FeatureExtractor`: a submodule's output (``feature_extractor=model.backbone``, or its
  name) when the model runs on inputs, flattened to ``(N, D)``;
- :func:`select_exemplars`: a task's data ranked per class by a strategy (``"herding"``,
  ``"closest"``, ``"random"``) into an :class:`~neurenix.continual.memory.ExemplarMemory`;
- :class:`NearestMeanClassifier`: scores ``−‖f − μ_c‖²`` from the memory's class means, a
  predictor for the metrics (``ForgettingCurves(predictor=...)``).

Features are L2-normalized, and so are the class means after averaging, as in the paper.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from neurenix.continual import functional as CF
from neurenix.continual._checks import (
    check_choice,
    check_model,
    check_task_id,
)
from neurenix.continual.base import (
    _first_parameter,
    eagerly,
    evaluation_mode,
    global_generator_kept,
    inputs_as_given,
    model_arguments,
    uncompiled,
)
from neurenix.continual.callback import split_batch
from neurenix.continual.capture import hidden_forwards
from neurenix.continual.distributed import (
    all_gather_objects,
    rank_and_world_size,
    sum_across_ranks_,
)
from neurenix.continual.memory import ExemplarMemory

__all__ = ["STRATEGIES", "FeatureExtractor", "NearestMeanClassifier", "select_exemplars"]

#: How :func:`select_exemplars` ranks a class's candidates.
STRATEGIES = ("herding", "closest", "random")

#: Samples per forward when the data comes as tensors (and for the memory's exemplars).
BATCH_SIZE = 256


class FeatureExtractor:
    """The output of ``feature_extractor`` (a submodule of ``model``, or its name in
    ``model.named_modules()``) when ``model`` runs on inputs, flattened to ``(N, D)`` float32.

    The whole model runs (so that a submodule's inputs are what training gives it), inside
    :func:`~neurenix.continual.capture.hidden_forwards` so that no method's capture of the
    training forward mistakes it for the step's; a forward hook reads the submodule's output (its
    last call, where the forward calls it more than once). Gradients and mode are the caller's.
    A ``torch.compile``'d model is read through the module it wraps (submodule names resolve as
    in the module itself) and runs eagerly: features are extracted at a task's end, by design
    outside any compiled graph (docs/compile.md).

    Args:
        model: the network.
        feature_extractor: a module inside ``model`` (``model.backbone``), or its name
            (``"backbone"``, ``"net.2"``); ``model`` itself takes its outputs as features.

    Raises:
        ValueError: ``feature_extractor`` is not a submodule of ``model`` or names none.
        TypeError: it is neither a module nor a string.
    """

    def __init__(self, model: nn.Module, feature_extractor: Union[nn.Module, str]) -> None:
        self.model = uncompiled(check_model(model))
        self.name, self.module = _find_submodule(self.model, feature_extractor)

    def __call__(self, inputs: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        """Features of ``inputs`` (and ``task_ids`` for a multi-head model), ``(N, D)`` float32.

        Raises:
            ValueError: the submodule did not run, or gave no tensor of at least 2 dimensions.
        """
        outputs: list[Any] = []
        handle = self.module.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            with hidden_forwards(), eagerly():  # a forward compiled in place (Lightning's) too
                self.model(*model_arguments(self.model, inputs, task_ids))
        finally:
            handle.remove()
        if not outputs:
            raise ValueError(
                f"feature_extractor={self.name!r} did not run in {type(self.model).__name__}'s forward: give the "
                "submodule whose output is the features"
            )
        features = outputs[-1]
        if not isinstance(features, Tensor) or features.dim() < 2:
            described = f"a tensor of shape {tuple(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"feature_extractor={self.name!r} must output a tensor of (N, ...) features, got {described}"
            )
        return features.flatten(1).float()


def _find_submodule(model: nn.Module, wanted: object) -> tuple[str, nn.Module]:
    """``(name, module)`` of ``wanted`` inside ``model`` (``""`` names ``model`` itself)."""
    modules = dict(model.named_modules())
    if isinstance(wanted, str):
        if wanted in modules:
            return wanted, modules[wanted]
        names = [name for name in modules if name][:8]
        raise ValueError(
            f"feature_extractor={wanted!r} names no submodule of {type(model).__name__}; its submodules include "
            f"{names}"
        )
    if isinstance(wanted, nn.Module):
        for name, module in modules.items():
            if module is wanted:
                return name or type(model).__name__, module
        raise ValueError(
            f"feature_extractor={type(wanted).__name__} is not a submodule of {type(model).__name__}: give a module "
            "inside the model (model.backbone) or its name"
        )
    raise TypeError(f"feature_extractor must be a torch.nn.Module or its name, got {type(wanted).__name__}: {wanted!r:.80}")


# -------------------------------------------------------------------------------------- candidates
class _Candidates:
    """A task's samples on this rank, read in a fixed order so that a sample chosen by its
    position can be fetched again: by dataset index for a map-style DataLoader or tensors (the
    inputs are not held meanwhile), else by keeping the iterable's batches as it yields them
    (no copy). Under DDP each rank reads its own shard: every ``world_size``-th sample of a
    dataset or tensors, or what the iterable's sampler gives it."""

    def __init__(self, data: Any) -> None:
        rank, world_size = rank_and_world_size()
        self._tensors: Optional[tuple[Tensor, ...]] = None
        self._loader: Optional[DataLoader] = None
        self._kept: list[tuple[Tensor, Tensor]] = []
        if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(d, Tensor) for d in data):
            split_batch(tuple(data[:2]))  # the same checks as a batch's
            self._tensors = tuple(data[:2])
            self._indices = list(range(data[0].shape[0]))[rank::world_size]
        elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and hasattr(data.dataset, "__len__"):
            self._loader = data
            self._indices = list(range(len(data.dataset)))[rank::world_size]
        elif hasattr(data, "__iter__") and not isinstance(data, (Tensor, str)):
            self._iterable = data
            self._indices = []
        else:
            raise TypeError(
                "the task's data must be a DataLoader, an iterable of (inputs, targets[, task_ids]) batches or an "
                f"(inputs, targets) pair of tensors, got {type(data).__name__}"
            )

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(inputs, targets)`` batches in candidate order."""
        if self._tensors is not None:
            for start in range(0, len(self._indices), BATCH_SIZE):
                yield self._take_tensors(self._indices[start : start + BATCH_SIZE])
        elif self._loader is not None:
            yield from self._load(self._indices, self._loader.batch_size or BATCH_SIZE)
        else:
            for batch in self._iterable:
                inputs, targets, _ = split_batch(batch)
                self._kept.append((inputs, targets))
                yield inputs, targets

    def take(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        """The candidates at ``positions`` (in :meth:`batches`' order), in that order."""
        if self._tensors is not None:
            return self._take_tensors([self._indices[p] for p in positions])
        if self._loader is not None:
            parts = list(self._load([self._indices[p] for p in positions], max(1, len(positions))))
            return parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        bounds = torch.tensor([0] + [targets.shape[0] for _, targets in self._kept]).cumsum(0)
        where = torch.tensor(positions, dtype=torch.long)
        batch = torch.searchsorted(bounds, where, right=True) - 1
        rows = [self._kept[b][0][r : r + 1] for b, r in zip(batch.tolist(), (where - bounds[batch]).tolist())]
        labels = [self._kept[b][1][r : r + 1] for b, r in zip(batch.tolist(), (where - bounds[batch]).tolist())]
        return torch.cat(rows), torch.cat(labels)

    def _take_tensors(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        assert self._tensors is not None
        chosen = torch.tensor(indices, dtype=torch.long)
        inputs, targets = self._tensors
        return inputs[chosen.to(inputs.device)], targets[chosen.to(targets.device)]

    def _load(self, indices: list[int], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        assert self._loader is not None
        loader = DataLoader(self._loader.dataset, batch_size=batch_size, sampler=indices, collate_fn=self._loader.collate_fn)
        for batch in loader:
            inputs, targets, _ = split_batch(batch)
            yield inputs, targets


# -------------------------------------------------------------------------------------- selection
def select_exemplars(
    memory: ExemplarMemory,
    extractor: FeatureExtractor,
    data: Any,
    task_id: int,
    strategy: str = "herding",
    *,
    convert_inputs: Callable[[Any], Any] = inputs_as_given,
    extras_of: Optional[Callable[[Tensor, Tensor], dict[str, Tensor]]] = None,
) -> dict[int, int]:
    """Rank each class's samples in ``data`` and offer the chosen ones to ``memory``.

    The model runs over the task's data once, without gradients, in eval mode (each submodule's
    mode restored after) and leaving PyTorch's global generator as it was; what is held meanwhile
    is the features (``N × D`` on the model's device), labels and positions, not a copy of the
    inputs: the chosen samples are fetched again by position once ranked (for a DataLoader over a
    map-style dataset, or tensors; a plain iterable's batches are kept as it yields them). Each
    class's candidates are ranked by ``strategy`` on L2-normalized features, as many as the class's
    quota once this task's classes have arrived (:meth:`ExemplarMemory.quotas_after`):

    - ``"herding"``: iCaRL's herding (:func:`~neurenix.continual.functional.herding_order`);
    - ``"closest"``: nearest the class mean first (:func:`~neurenix.continual.functional.closest_to_mean_order`);
    - ``"random"``: a permutation from the memory's generator (no forward is run).

    Under DDP each rank selects from its own shard into its own memory (every ``world_size``-th
    sample of a dataset; an iterable as its sampler shards it): gathering every candidate's
    inputs on every rank would cost ``N ×`` the input size per rank, for exemplars each rank only
    needs a share of.

    Args:
        memory: where the exemplars go.
        extractor: the features (:class:`FeatureExtractor`).
        data: the task's samples: a DataLoader, an iterable of ``(inputs, targets[, task_ids])``
            batches, or an ``(inputs, targets)`` pair of tensors; targets are class labels.
        task_id: the task the samples belong to (stored with them).
        strategy: one of :data:`STRATEGIES`.
        convert_inputs: applied to inputs before the model sees them and before they are stored
            (a Lightning fit's precision conversion).
        extras_of: ``extras_of(inputs, task_ids) -> {field: values}``, further per-sample fields
            to store with the chosen samples (Dark Experience Replay's logits).

    Returns:
        How many exemplars each class of ``data`` now holds.

    Raises:
        ValueError / TypeError: an unknown strategy, data that is not batches of class labels, or
            data without a sample (nothing is changed then).
    """
    check_choice("strategy", strategy, STRATEGIES)
    task_id = check_task_id(task_id)
    if not isinstance(memory, ExemplarMemory):
        raise TypeError(f"memory must be an ExemplarMemory, got {type(memory).__name__}")
    candidates = _Candidates(data)
    with torch.no_grad(), evaluation_mode(extractor.model), global_generator_kept():
        features, labels = _features_of(candidates, extractor, convert_inputs, needed=strategy != "random")
        chosen, ranks = _ranked(memory, features, labels, strategy)
        if not chosen:
            return {}
        inputs, targets = candidates.take(chosen)
        inputs, targets = convert_inputs(inputs.to(memory.device)), targets.to(memory.device)
        task_ids = torch.full((len(chosen),), task_id, dtype=torch.long, device=memory.device)
        extras = {} if extras_of is None else extras_of(inputs, task_ids)
    memory.add_ranked(inputs, targets, task_id, ranks.to(memory.device), **extras)
    sizes = memory.class_sizes()
    return {key: sizes[key] for key in sorted(set(targets.tolist()))}


def _features_of(
    candidates: _Candidates, extractor: FeatureExtractor, convert_inputs: Callable[[Any], Any], *, needed: bool
) -> tuple[Optional[Tensor], Tensor]:
    """Every candidate's normalized features (``None`` when not ``needed``) and labels, in order."""
    device = _model_device(extractor.model)
    features, labels = [], []
    not_finite = torch.zeros(1, dtype=torch.float64, device=device)
    for inputs, targets in candidates.batches():
        if targets.dim() != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError(
                "exemplars are chosen per class: targets must be class labels (a 1-D integer tensor), got targets "
                f"of shape {tuple(targets.shape)} and dtype {targets.dtype}"
            )
        labels.append(targets.to(device))
        inputs = inputs.to(device)
        if inputs.is_floating_point():
            not_finite += (~torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(1)).sum()
        if needed:
            features.append(F.normalize(extractor(convert_inputs(inputs)), dim=1))
    # Summed over the ranks, so that all refuse together (one raising alone would leave the
    # others waiting in their next collective).
    sum_across_ranks_([not_finite])
    if not_finite.item() > 0:
        raise ValueError(
            f"the task's data holds {int(not_finite.item())} samples with NaN or infinite inputs: they would be "
            "kept as exemplars and replayed; no exemplar of this task was chosen"
        )
    if not labels:
        raise ValueError("select_exemplars got a task without samples: the data yielded no batch")
    return (torch.cat(features) if needed else None), torch.cat(labels)


def _ranked(memory: ExemplarMemory, features: Optional[Tensor], labels: Tensor, strategy: str) -> tuple[list[int], Tensor]:
    """The positions of each class's chosen candidates (up to its quota) and their ranks."""
    values, by_label = torch.sort(labels, stable=True)
    classes, sizes = torch.unique_consecutive(values, return_counts=True)
    quotas = memory.quotas_after(classes.tolist())
    chosen, ranks = [], []
    for key, positions in zip(classes.tolist(), by_label.split(sizes.tolist())):
        quota = quotas[key]
        if strategy == "random":
            picked = positions[torch.argsort(memory.random_ranks(positions.shape[0]).to(positions.device))][:quota]
        elif strategy == "herding":
            picked = positions[CF.herding_order(features[positions], quota)]
        else:
            picked = positions[CF.closest_to_mean_order(features[positions], quota)]
        chosen.extend(picked.tolist())
        ranks.append(torch.arange(picked.shape[0]))
    return chosen, (torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long))


def _model_device(model: nn.Module) -> torch.device:
    first = _first_parameter(model)
    return first.device if first is not None else torch.device("cpu")


# -------------------------------------------------------------------------------------- NCM
class NearestMeanClassifier:
    """Classify by the nearest mean of exemplars (iCaRL's NCM): ``argmax_c −‖φ(x) − μ_c‖²`` with
    ``φ`` the normalized features and ``μ_c`` the normalized mean of class ``c``'s exemplars'
    features in ``memory``.

    Any callable ``(inputs, task_ids=None) -> (N, C) scores`` is a predictor for the metrics; this
    one is (``ForgettingCurves(predictor=classifier)``). Classes without exemplars score ``−inf``.
    The means are computed by :meth:`update_means` with the network as it is then, as the paper
    computes them after each task's selection; with ``refresh`` (the default), :meth:`scores`
    first recomputes them whenever the memory's exemplars have changed since (a task's end
    selected new ones), so that a metric measuring at a task's end, after the method that selects
    (listed before it in ``callbacks``), uses that task's means.

    Args:
        model: the network.
        feature_extractor: a submodule of ``model`` or its name (:class:`FeatureExtractor`), or a
            :class:`FeatureExtractor`.
        memory: the exemplars.
        refresh: recompute the means in :meth:`scores` when the exemplars have changed. Under
            DDP that is a collective: every rank must then score at the same points (the metrics
            do).

    Example::

        classifier = NearestMeanClassifier(model, model.backbone, memory)
        classifier.update_means()
        predicted = classifier.predict(inputs)
    """

    def __init__(
        self,
        model: nn.Module,
        feature_extractor: Union[nn.Module, str, FeatureExtractor],
        memory: ExemplarMemory,
        *,
        refresh: bool = True,
    ) -> None:
        if isinstance(feature_extractor, FeatureExtractor):
            if feature_extractor.model is not uncompiled(model):
                raise ValueError("feature_extractor is a FeatureExtractor of another model than `model`")
            self.extractor = feature_extractor
        else:
            self.extractor = FeatureExtractor(model, feature_extractor)
        if not hasattr(memory, "take") or not hasattr(memory, "classes"):
            raise TypeError(f"memory must be an ExemplarMemory (or a ClassBalancedMemory), got {type(memory).__name__}")
        self.model = model
        self.memory = memory
        #: ``(C, D)`` normalized class means and ``(C,)`` which classes have one; ``None`` before
        #: :meth:`update_means`.
        self.means: Optional[Tensor] = None
        self.seen: Optional[Tensor] = None
        self.refresh = bool(refresh)
        #: The memory's (samples offered, samples held) when the means were computed.
        self._computed_at: Optional[tuple[int, int]] = None

    def update_means(self, convert_inputs: Callable[[Any], Any] = inputs_as_given) -> None:
        """Recompute every class's mean from the memory's exemplars with the current network.

        Per-class feature sums and counts are summed over DDP ranks before dividing (every rank
        then holds the means of all ranks' exemplars); runs without gradients in eval mode.
        """
        device = _model_device(self.model)
        features, labels = self._exemplar_features(device, convert_inputs)
        # Ranks may hold different classes (and one none at all): agree on the table's shape.
        shapes = all_gather_objects((max(self.memory.classes, default=-1) + 1, features.shape[1]))
        num_classes, dimension = max(c for c, _ in shapes), max(d for _, d in shapes)
        if features.shape[1] != dimension:  # this rank holds no exemplar
            features = features.new_zeros(0, dimension)
        sums, counts = CF.class_sums(features.double(), labels, num_classes)
        sum_across_ranks_([sums, counts])
        self.seen = counts > 0
        self.means = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), dim=1).float()
        self._computed_at = self._memory_version()

    def _memory_version(self) -> tuple[int, int]:
        # Every selection offers candidates (num_seen grows); the same on every rank at a task's end.
        return (self.memory.num_seen, len(self.memory))

    def _exemplar_features(self, device: torch.device, convert_inputs: Callable[[Any], Any]) -> tuple[Tensor, Tensor]:
        """The normalized features and labels of every exemplar in memory (``(0, 0)`` and ``(0,)``
        for an empty one)."""
        size = len(self.memory)
        features, labels = [torch.zeros(0, 0, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
        with torch.no_grad(), evaluation_mode(self.model), global_generator_kept():
            for start in range(0, size, BATCH_SIZE):
                stored = self.memory.take(torch.arange(start, min(size, start + BATCH_SIZE), device=self.memory.device))
                inputs = convert_inputs(stored.inputs.to(device))
                features.append(F.normalize(self.extractor(inputs, stored.task_ids.to(device)), dim=1))
                labels.append(stored.targets.to(device))
        return (torch.cat(features[1:]) if size else features[0]), torch.cat(labels)

    def scores(self, inputs: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        """``(N, C)`` scores ``−‖φ(x) − μ_c‖²`` (``−inf`` for classes without exemplars).

        Raises:
            RuntimeError: no means yet (:meth:`update_means` first, with exemplars in memory).
        """
        if self.refresh and self._computed_at != self._memory_version():
            self.update_means()
        if self.means is None or self.seen is None or not bool(self.seen.any()):
            raise RuntimeError(
                "NearestMeanClassifier has no class means: call update_means() once the memory holds exemplars"
            )
        device = _model_device(self.model)
        with torch.no_grad(), evaluation_mode(self.model):
            features = F.normalize(self.extractor(inputs.to(device), None if task_ids is None else task_ids.to(device)), dim=1)
        return CF.nearest_mean_scores(features, self.means.to(device), self.seen.to(device))

    __call__ = scores

    def predict(self, inputs: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        """The predicted class of each sample (the nearest mean)."""
        return self.scores(inputs, task_ids).argmax(1)

    def state_dict(self) -> dict[str, Any]:
        """The means, as tensors (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "means": None if self.means is None else self.means.clone(),
            "seen": None if self.seen is None else self.seen.clone(),
            "computed_at": None if self._computed_at is None else torch.tensor(self._computed_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means, self.seen = state.get("means"), state.get("seen")
        computed_at = state.get("computed_at")
        self._computed_at = None if computed_at is None else (int(computed_at[0]), int(computed_at[1]))
