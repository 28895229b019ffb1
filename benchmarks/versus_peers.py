"""Our methods against the same methods in Avalanche, on the same protocol, in one run.

The protocol: split Fashion-MNIST (any MNIST-like IDX data with ``--data mnist --root DIR``),
class-incremental, 5 tasks of 2 classes, ``--epochs`` (1) per task, an MLP 784-400-400-10, batch
128, Adam (lr 1e-3, a fresh optimizer state per task on every side). The same sequence runs
through

- **loop**: a plain PyTorch loop over the tasks' tensors, no method (the limit);
- **lightning**: plain Lightning, one ``Trainer.fit`` per task on a stock ``DataLoader`` over a
  ``TensorDataset``, no method (what Lightning itself costs);
- **ours/M**: our Lightning path: ``TaskSequenceDataModule`` + ``fit_sequence`` + method M's
  callback (``ours/naive``: no callback);
- **avalanche/M**: ``avalanche-lib`` 0.6.0's ``Naive`` strategy with method M's plugin (or M's own
  strategy where Avalanche has one: ``DER``, ``ER_ACE``, ``ICaRL``), in a worker process of its own
  virtual environment (``--peer-python``), fed the same tensors and the same initial weights through
  a file; **avalanche/loop** is the plain loop (the same function) in that environment, whose torch
  differs from ours;
- **avalanche/ewc_batch**: a check, Avalanche's EWC with its λ scaled by the batch size
  (``PEER_CHECKS``: what the EWC gap comes from).

Each method's hyper-parameters are ours, mapped onto Avalanche's so that both compute the same
objective where the definitions allow (``MAPPINGS``: what is mapped, and what still differs).

A round runs every variant once, in reversed order every other round (A B C, C B A, ...), as
``continual_overhead.py`` does; round ``r`` uses seed ``seed + r`` for the initial weights and the
shuffling, on every side, so the accuracies are those of ``rounds`` seeds. Times are of the whole
sequence (method, trainer or strategy built, every task trained and consolidated), not of the data
loading or the final evaluation; the tables give medians over the rounds and their ratios to the
plain loop of the same run. Accuracy: the mean over tasks of the test accuracy after the last task,
over the whole head (no task id), computed by the same function on both sides, of each method's own
prediction (iCaRL's nearest mean of exemplars, BiC's corrected logits, GDumb's retrained network).

    python benchmarks/versus_peers.py --peer-python /tmp/peers-venv/bin/python [--rounds 4]
        [--epochs 1] [--threads 2] [--data fashion_mnist|mnist|digits] [--root DIR]
        [--methods naive,ewc,si,lwf,replay,mas,rwalk,gem,agem,der,derpp,er_ace,icarl,bic,gdumb]
        [--quick] [--json PATH]

Without ``--peer-python`` only our side runs. ``--quick`` is a smoke mode (scikit-learn's digits,
a 16-16 MLP, one round: seconds; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, run from anywhere
import continual_overhead as overhead  # noqa: E402
from versus_peers_avalanche import build_mlp, plain_loop, task_accuracies  # noqa: E402

from neurenix.continual import (  # noqa: E402
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
    KnowledgeDistillation,
    RWalk,
    SynapticIntelligence,
)
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark  # noqa: E402

WORKER = Path(__file__).resolve().parent / "versus_peers_avalanche.py"
#: Scores of a batch of inputs, ``(N, classes)``: how a method predicts (its arg max).
Predictor = Callable[[Tensor], Tensor]
#: What a run returns: its optimizer steps, and its predictor where not the network's outputs.
Outcome = tuple[int, Optional[Predictor]]
NUM_TASKS = 5
#: Our hyper-parameters: the documented defaults (distillation over the seen classes, the
#: class-incremental choice; replay with exemplars drawn at random at each task's end, see MAPPINGS).
EWC_IMPORTANCE, FISHER_SAMPLES = 1000.0, 1000
SI_IMPORTANCE, SI_XI = 1.0, 0.1
TEMPERATURE, DISTILLATION_ALPHA = 2.0, 0.5
MEMORY_SIZE, REPLAY_RATIO = 1000, 0.5
MAS_IMPORTANCE, MAS_SAMPLES = 1.0, 1000
RWALK_IMPORTANCE, RWALK_ALPHA, RWALK_INTERVAL = 1.0, 0.9, 10
#: The memory-based methods share replay's memory size and, where a ratio is theirs to set, its
#: ratio; DER's weights and A-GEM's and GEM's settings are continual_overhead.py's.
DER_ALPHA, DERPP_BETA = 0.2, 1.0
AGEM_REFERENCE_SIZE, GEM_MARGIN = 256, 0.5
#: BiC: Avalanche keeps its held-out (validation) set beside a memory of ``mem_size``, 10% of
#: ``mem_size`` in size; ours holds both in ``memory_size``: 1,100 of which 1/11 (100) held out.
BIC_HELD_OUT_SHARE = 0.1
BIC_MEMORY = MEMORY_SIZE + round(BIC_HELD_OUT_SHARE * MEMORY_SIZE)
BIC_HELD_OUT = round(BIC_HELD_OUT_SHARE * MEMORY_SIZE) / BIC_MEMORY
#: The methods both sides have (naive: none, on both sides).
METHODS = ("naive", "ewc", "si", "lwf", "replay", "mas", "rwalk",
           "gem", "agem", "der", "derpp", "er_ace", "icarl", "bic", "gdumb")
#: Avalanche-only runs that test an explanation of a gap: ``ewc_batch`` multiplies EWC's
#: ``ewc_lambda`` by the batch size, the factor by which its Fisher estimate is smaller than ours
#: (MAPPINGS). Each runs when the method it checks is measured.
PEER_CHECKS = {"ewc_batch": "ewc"}
#: Methods whose LightningModule needs ContinualLossMixin (they change the batch or the loss).
NEEDS_MIXIN = ("lwf", "replay", "der", "derpp", "er_ace", "icarl", "bic")


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on (it goes into the JSON as is)."""

    data: str
    root: Optional[str]
    hidden: tuple[int, ...]
    batch_size: int
    epochs: int
    rounds: int
    threads: int
    methods: tuple[str, ...]
    learning_rate: float = overhead.LEARNING_RATE
    seed: int = 0  # the class order; round r also uses seed + r for weights and shuffling


DEFAULT = Setup("fashion_mnist", overhead.FASHION_MNIST, (400, 400), 128, epochs=1, rounds=4, threads=2, methods=METHODS)
QUICK = dict(data="digits", root=None, hidden=(16, 16), rounds=1)


# ---------------------------------------------------------------------------- the mapping
@dataclass(frozen=True)
class Mapping:
    """How one of our methods is expressed in Avalanche, and what still differs by definition."""

    ours: str
    avalanche: str
    mapped: str
    differs: str


def replay_count(batch_size: int = DEFAULT.batch_size) -> int:
    """Remembered samples joined to each batch of ``batch_size`` new ones: ``round(REPLAY_RATIO · B)``."""
    return round(REPLAY_RATIO * batch_size)


def icarl_replay_ratio(task_size: float) -> float:
    """Our iCaRL's ``replay_ratio`` for tasks of ``task_size`` samples: ``M / D``, exemplars per new
    sample when the exemplars are shuffled into the task's data (the paper, and Avalanche)."""
    return MEMORY_SIZE / task_size


def peer_settings(method: str) -> dict[str, Any]:
    """The Avalanche plugin's arguments that give our method's objective (see ``MAPPINGS``)."""
    if method in ("naive", "loop"):  # loop: our plain loop in their environment
        return {}
    if method == "ewc":  # theirs: λ·Σ F(θ-θ*)², ours: importance/2·Σ F(θ-θ*)²
        return {"ewc_lambda": EWC_IMPORTANCE / 2, "mode": "separate"}
    if method == "ewc_batch":  # their estimate ≈ ours / batch size: the same penalty in expectation
        return {"ewc_lambda": EWC_IMPORTANCE / 2 * DEFAULT.batch_size, "mode": "separate"}
    if method == "si":  # theirs: λ/2·Σ Ω(θ-θ*)², ours: importance·Σ Ω(θ-θ*)²; eps is ξ
        return {"si_lambda": 2 * SI_IMPORTANCE, "eps": SI_XI}
    if method == "lwf":  # theirs: CE + α'·KL, ours: (1-α)·CE + α·T²·KL = (1-α)·(CE + α·T²/(1-α)·KL)
        return {"alpha": DISTILLATION_ALPHA * TEMPERATURE**2 / (1 - DISTILLATION_ALPHA), "temperature": TEMPERATURE}
    if method == "replay":  # a batch of B new samples gets round(ratio·B) from memory on both sides
        return {"mem_size": MEMORY_SIZE, "batch_size_mem": round(REPLAY_RATIO * DEFAULT.batch_size),
                "storage": "ClassBalancedBuffer"}
    if method == "mas":  # no ½ on either side
        return {"lambda_reg": MAS_IMPORTANCE, "alpha": 0.5}
    if method == "rwalk":  # no ½ on either side; EWC++'s moving average and the score interval as ours
        return {"ewc_lambda": RWALK_IMPORTANCE, "ewc_alpha": RWALK_ALPHA, "delta_t": RWALK_INTERVAL}
    if method == "gem":  # their memory is per task: ours split over the tasks, as in the last task
        return {"patterns_per_experience": MEMORY_SIZE // NUM_TASKS, "memory_strength": GEM_MARGIN}
    if method == "agem":
        return {"patterns_per_experience": MEMORY_SIZE // NUM_TASKS, "sample_size": AGEM_REFERENCE_SIZE}
    if method in ("der", "derpp"):  # DER strategy; beta = 0 is DER, as ours
        return {"mem_size": MEMORY_SIZE, "batch_size_mem": replay_count(), "alpha": DER_ALPHA,
                "beta": DERPP_BETA if method == "derpp" else 0.0}
    if method == "er_ace":  # ER_ACE strategy
        return {"mem_size": MEMORY_SIZE, "batch_size_mem": replay_count()}
    if method == "icarl":  # ICaRL strategy: exemplars join the task's data (ours: replay_ratio = M/D)
        return {"memory_size": MEMORY_SIZE}
    if method == "bic":  # their held-out set (10% of mem_size) is beside the memory, ours in it
        return {"mem_size": MEMORY_SIZE, "batch_size_mem": replay_count(), "val_percentage": BIC_HELD_OUT_SHARE,
                "T": int(TEMPERATURE)}
    if method == "gdumb":
        return {"mem_size": MEMORY_SIZE}
    raise ValueError(f"method must be one of {', '.join((*METHODS, *PEER_CHECKS))}, got {method!r}")


MAPPINGS = {
    "naive": Mapping("no callback", "Naive", "nothing to map", "nothing"),
    "ewc": Mapping(
        f"EWC(importance={EWC_IMPORTANCE:g}, fisher_sample_size={FISHER_SAMPLES})",
        f"EWCPlugin(ewc_lambda={EWC_IMPORTANCE / 2:g}, mode='separate')",
        "ewc_lambda = importance/2 (their penalty has no ½); one penalty per earlier task on both sides",
        "their 'Fisher' is the squared mini-batch-mean gradient averaged over the task's batches (all "
        "its samples), ours the mean squared per-sample gradient of 1,000 samples: for uncorrelated "
        "samples theirs is about 1/batch-size of ours, so their penalty is that much weaker"),
    "ewc_batch": Mapping(
        "(a check, not a method: Avalanche only)",
        f"EWCPlugin(ewc_lambda={EWC_IMPORTANCE / 2 * DEFAULT.batch_size:g}, mode='separate')",
        f"ewc_lambda = importance/2 · {DEFAULT.batch_size}: their Fisher estimate scaled back to ours, in expectation",
        "tests the explanation of the EWC gap: with it, their accuracy should come near ours"),
    "si": Mapping(
        f"SynapticIntelligence(importance={SI_IMPORTANCE:g}, xi={SI_XI:g})",
        f"SynapticIntelligencePlugin(si_lambda={2 * SI_IMPORTANCE:g}, eps={SI_XI:g})",
        "si_lambda = 2·importance (their penalty is λ/2·ΣΩ(θ-θ*)²), eps = ξ (the damping)",
        "their Ω is clipped at 0.001 per parameter and not passed through a ReLU (a parameter that went "
        "uphill gets a negative Ω); their path integral uses the gradient with the penalty's part, ours "
        "the task loss's alone; they copy parameters and gradients to the CPU every step"),
    "lwf": Mapping(
        f"KnowledgeDistillation(temperature={TEMPERATURE:g}, alpha={DISTILLATION_ALPHA:g}, units='seen')",
        f"LwFPlugin(alpha={peer_settings('lwf')['alpha']:g}, temperature={TEMPERATURE:g})",
        "alpha' = α·T²/(1-α): their loss CE + α'·KL is ours divided by (1-α), which Adam's update "
        "does not see (up to its ε); both distil the units of the classes seen before, KL with batchmean",
        "their teacher is a copy left in train mode (no dropout or batch norm here: the same outputs)"),
    "replay": Mapping(
        f"ExperienceReplay(memory_size={MEMORY_SIZE}, replay_ratio={REPLAY_RATIO:g}, selection='random')",
        f"ReplayPlugin(mem_size={MEMORY_SIZE}, batch_size_mem=64, storage_policy=ClassBalancedBuffer({MEMORY_SIZE}))",
        "memory split evenly over the classes seen, filled at random from each task's data at its end; "
        "64 remembered samples joined to each batch of 128 (ours: round(0.5·B))",
        "they draw memory batches as shuffled passes over the memory (and 64 also in a task's last, "
        "smaller batch), we draw round(0.5·B) distinct samples at random each step; our default "
        "replay (a reservoir filled during training) is not what they have, so it is not compared"),
    "mas": Mapping(
        f"MAS(importance={MAS_IMPORTANCE:g}, sample_size={MAS_SAMPLES})",
        f"MASPlugin(lambda_reg={MAS_IMPORTANCE:g}, alpha=0.5)",
        "lambda_reg = importance (neither has a ½)",
        # No vertical bars in this text: it goes into a markdown table.
        "their Ω is the absolute gradient of the mini-batch mean of ‖f(x)‖², averaged over the task's batches "
        "(opposite per-sample gradients cancel), ours the mean of each sample's absolute gradient over 1,000 "
        "samples; they average the tasks' Ω (Ω ← 0.5·Ω + 0.5·Ω_t, their alpha; any alpha is a "
        "weighted mean), we add them up (the paper and the authors' code)"),
    "rwalk": Mapping(
        f"RWalk(importance={RWALK_IMPORTANCE:g}, alpha={RWALK_ALPHA:g}, interval={RWALK_INTERVAL})",
        f"RWalkPlugin(ewc_lambda={RWALK_IMPORTANCE:g}, ewc_alpha={RWALK_ALPHA:g}, delta_t={RWALK_INTERVAL})",
        "ewc_lambda = importance (neither has a ½), ewc_alpha = alpha, delta_t = interval",
        "their score's ε is float32's machine epsilon (fixed, 1.2e-7), ours epsilon=1e-3; they apply "
        "the ReLU once to the averaged scores, we per interval; they get the unregularized gradient "
        "from an extra forward and backward pass each step, we read it before the penalty is added"),
    "gem": Mapping(
        f"GEM(memory_size={MEMORY_SIZE}, margin={GEM_MARGIN:g})",
        f"GEMPlugin(patterns_per_experience={MEMORY_SIZE // NUM_TASKS}, memory_strength={GEM_MARGIN:g})",
        f"memory_strength = margin (the lower bound on the dual variables); {MEMORY_SIZE // NUM_TASKS} = "
        f"{MEMORY_SIZE}/{NUM_TASKS} samples per task, what our memory holds of each earlier task in the last "
        "task; one constraint per earlier task, the gradient of the mean cross-entropy on all its memory",
        f"their memory keeps {MEMORY_SIZE // NUM_TASKS} samples of each task (the first of a shuffled pass, at "
        f"its end), ours {MEMORY_SIZE} split over the tasks seen (a reservoir of each task's stream during it): "
        "earlier in the sequence we hold more of each earlier task (up to 1,000 in the second), so our "
        "constraints are estimated on more samples and cost more; their quadratic program adds 0.001 to "
        "the diagonal of GGᵀ (quadprog), ours is solved exactly (an active set in float64)"),
    "agem": Mapping(
        f"AGEM(memory_size={MEMORY_SIZE}, reference_size={AGEM_REFERENCE_SIZE})",
        f"AGEMPlugin(patterns_per_experience={MEMORY_SIZE // NUM_TASKS}, sample_size={AGEM_REFERENCE_SIZE})",
        f"sample_size = reference_size (the samples of each reference gradient); {MEMORY_SIZE // NUM_TASKS} "
        "samples per task as for GEM; the same projection, g − (g·g_ref / g_ref·g_ref) g_ref when g·g_ref < 0",
        "their reference batch takes sample_size // k samples of each of the k finished tasks (passes over "
        "each task's memory), ours 256 drawn at random from all of them (equal shares: the same in "
        "expectation); their memory per task is fixed and chosen at the task's end, ours shared as for GEM"),
    "der": Mapping(
        f"DarkExperienceReplay(memory_size={MEMORY_SIZE}, alpha={DER_ALPHA:g}, beta=0, replay_ratio={REPLAY_RATIO:g}, "
        "selection='random')",
        f"DER(mem_size={MEMORY_SIZE}, batch_size_mem={replay_count()}, alpha={DER_ALPHA:g}, beta=0)",
        f"alpha = alpha (both F.mse_loss over samples and units), beta = 0; {replay_count()} remembered samples "
        f"per batch of {DEFAULT.batch_size}; memory split evenly over the classes seen, drawn at random from each "
        "task's data at its end, each sample's logits those of the network at that moment",
        "their DER is a strategy of its own (a class-balanced memory filled at a task's end, the authors' "
        "is a reservoir during training: so is our default, not compared); they draw memory batches as "
        "shuffled passes, we draw distinct samples at random each step; one forward of the joined batch "
        "against our forward per part (the same outputs: no batch norm here)"),
    "derpp": Mapping(
        f"DarkExperienceReplay(memory_size={MEMORY_SIZE}, alpha={DER_ALPHA:g}, beta={DERPP_BETA:g}, "
        f"replay_ratio={REPLAY_RATIO:g}, selection='random')",
        f"DER(mem_size={MEMORY_SIZE}, batch_size_mem={replay_count()}, alpha={DER_ALPHA:g}, beta={DERPP_BETA:g})",
        "as DER, and beta = beta (the cross-entropy on remembered labels)",
        "as DER; and their two memory terms share one batch of remembered samples, ours draw one each "
        "(the authors' code draws two)"),
    "er_ace": Mapping(
        f"ERACE(memory_size={MEMORY_SIZE}, replay_ratio={REPLAY_RATIO:g})",
        f"ER_ACE(mem_size={MEMORY_SIZE}, batch_size_mem={replay_count()})",
        f"{replay_count()} replayed samples per batch of {DEFAULT.batch_size}; the incoming batch's cross-entropy over "
        "the classes present in it, plus the replayed batch's; our memory a reservoir of the stream, which "
        "at each task's end is, in expectation, what theirs is during the task (a class-balanced sample of "
        "every class seen: the classes are of equal size)",
        "their loss is half of ours (the mean of the two terms; Adam does not see the factor, up to its ε); "
        "they score the replayed batch over every output unit (classes not met yet included), we over the "
        "classes seen; their memory takes the whole task's data at its start (its classes then hold their "
        "share at once), ours fills during the task; their first task trains with a plain cross-entropy "
        "and no replay, ours with the masked term and replay from the reservoir"),
    "icarl": Mapping(
        f"ICaRL(memory_size={MEMORY_SIZE}, replay_ratio=M/D, selection='herding')",
        f"ICaRL(memory_size={MEMORY_SIZE}, fixed_memory=True, feature_extractor=mlp[:-1], classifier=mlp[-1])",
        "the same network split at its head (features: the last hidden layer's output); the same loss "
        "(the mean binary cross-entropy, the teacher's sigmoid as the old classes' targets), herding on "
        "normalized features, classes split the memory evenly; replay_ratio = M/D (1,000 of a task's "
        "12,000 samples: 11 exemplars per batch of 128) is the exemplars' share of their batches; both "
        "measured by the nearest mean of exemplars",
        "they shuffle the exemplars into the task's data (about 118 new and 10 remembered samples per "
        "batch, 102 steps a task after the first), we append ours to each batch of 128 new samples (94 "
        "steps); their "
        "herding stops after 1,000 iterations per class (a class may keep fewer), and keeps ceil(M/classes) "
        "per class where ours keeps floor or ceil to sum to M"),
    "bic": Mapping(
        f"BiC(memory_size={BIC_MEMORY}, held_out=1/11, replay_ratio={REPLAY_RATIO:g}, selection='random', "
        f"temperature={TEMPERATURE:g})",
        f"BiCPlugin(mem_size={MEMORY_SIZE}, batch_size_mem={replay_count()}, val_percentage={BIC_HELD_OUT_SHARE:g}, "
        f"T={TEMPERATURE:g})",
        f"{MEMORY_SIZE} exemplars replayed and {round(BIC_HELD_OUT_SHARE * MEMORY_SIZE)} held out for the bias fit on "
        f"both sides (theirs beside mem_size, ours inside memory_size); {replay_count()} exemplars per batch of "
        f"{DEFAULT.batch_size}; λ = old classes / classes seen; both measured by their corrected logits",
        "their distillation's soft targets are a softmax over the batch (dim=0), not over the classes, "
        "at a temperature fixed at 2; their cross-entropy runs over every output unit, ours over the classes "
        "learned; their held-out samples are taken out of the task's training data, ours chosen from it at "
        "its end; they fit (α, β) by 200 epochs of SGD with 0.1·β²/2, we by Newton's method with "
        "0.001/2·((α−1)²+β²); they correct only the last task's classes (the teacher's and at prediction), "
        "we keep every task's correction"),
    "gdumb": Mapping(
        f"GDumb(memory_size={MEMORY_SIZE})",
        f"GDumbPlugin(mem_size={MEMORY_SIZE})",
        "a class-balanced memory of the stream; at each task the initial weights, then the task's epochs "
        "on the memory alone with a fresh Adam",
        "nothing in the method: each class keeps a uniform random sample of its stream on both sides "
        "(their reservoir per class, ours)"),
}


def make_method(method: str, net: nn.Module, seed: int, task_size: float = 12_000) -> list[Any]:
    """Our callback for ``method`` with the hyper-parameters above (none for ``naive``); ``task_size``,
    the tasks' mean number of training samples, sets iCaRL's ratio (:func:`icarl_replay_ratio`)."""
    if method == "naive":
        return []
    if method == "ewc":
        return [EWC(net, importance=EWC_IMPORTANCE, fisher_sample_size=FISHER_SAMPLES, seed=seed)]
    if method == "si":
        return [SynapticIntelligence(net, importance=SI_IMPORTANCE, xi=SI_XI)]
    if method == "lwf":
        return [KnowledgeDistillation(net, temperature=TEMPERATURE, alpha=DISTILLATION_ALPHA, units="seen")]
    if method == "replay":
        return [ExperienceReplay(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=seed, selection="random")]
    if method == "mas":
        return [MAS(net, importance=MAS_IMPORTANCE, sample_size=MAS_SAMPLES, seed=seed)]
    if method == "rwalk":
        return [RWalk(net, importance=RWALK_IMPORTANCE, alpha=RWALK_ALPHA, interval=RWALK_INTERVAL)]
    if method == "gem":
        return [GEM(net, memory_size=MEMORY_SIZE, margin=GEM_MARGIN, seed=seed)]
    if method == "agem":
        return [AGEM(net, memory_size=MEMORY_SIZE, reference_size=AGEM_REFERENCE_SIZE, seed=seed)]
    if method in ("der", "derpp"):
        beta = DERPP_BETA if method == "derpp" else 0.0
        return [DarkExperienceReplay(net, memory_size=MEMORY_SIZE, alpha=DER_ALPHA, beta=beta, replay_ratio=REPLAY_RATIO,
                                     seed=seed, selection="random")]
    if method == "er_ace":
        return [ERACE(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=seed)]
    if method == "icarl":  # features: the last hidden layer's output (the head's input), herding
        return [ICaRL(net, memory_size=MEMORY_SIZE, replay_ratio=icarl_replay_ratio(task_size), seed=seed)]
    if method == "bic":
        return [BiC(net, memory_size=BIC_MEMORY, replay_ratio=REPLAY_RATIO, seed=seed, selection="random",
                    held_out=BIC_HELD_OUT, temperature=TEMPERATURE)]
    if method == "gdumb":
        return [GDumb(net, memory_size=MEMORY_SIZE, seed=seed)]
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    benchmark: Any  # the TaskSequence our Lightning path trains on
    train: list[tuple[Tensor, Tensor]]  # every task's samples as the model receives them
    test: list[tuple[Tensor, Tensor]]
    inputs: int
    classes: int


def load_data(setup: Setup) -> Data:
    benchmark = split_benchmark(setup.data, NUM_TASKS, root=setup.root, scenario="class", seed=setup.seed)
    train = [task[:] for task in benchmark.train]
    test = [task[:] for task in benchmark.test]
    return Data(benchmark, train, test, benchmark.input_shape[0], benchmark.num_classes)


def expected_steps(setup: Setup, data: Data, method: str = "naive") -> int:
    """Optimizer steps of a whole sequence: every batch of every epoch of every task (GDumb: of its
    memory, which it trains on instead of the task's data)."""
    if method == "gdumb":
        return setup.epochs * sum(-(-size // setup.batch_size) for size in class_balanced_sizes(data.train, MEMORY_SIZE))
    return setup.epochs * sum(-(-len(y) // setup.batch_size) for _, y in data.train)


def peer_minimum_steps(setup: Setup, data: Data, method: str) -> int:
    """The fewest steps Avalanche's sequence of ``method`` may make: as ours, except BiC's, which
    takes its held-out set (up to 10% of ``mem_size`` per task) out of each task's training data."""
    if method == "bic":
        held_out = round(BIC_HELD_OUT_SHARE * MEMORY_SIZE)
        return setup.epochs * sum(-(-max(len(y) - held_out, 0) // setup.batch_size) for _, y in data.train)
    return expected_steps(setup, data, method)


def class_balanced_sizes(tasks: Sequence[tuple[Tensor, Tensor]], capacity: int) -> list[int]:
    """How many samples a class-balanced memory of ``capacity`` holds after each task: each class seen
    keeps up to ``floor(M/G)`` or ``ceil`` (the first ``M mod G`` classes in order of arrival, taken
    here as ascending within a task) of its samples."""
    counts: dict[int, int] = {}
    sizes = []
    for _, y in tasks:
        for label, count in zip(*(v.tolist() for v in torch.unique(y, return_counts=True))):
            counts[label] = counts.get(label, 0) + count
        share, remainder = divmod(capacity, len(counts))
        sizes.append(sum(min(count, share + int(k < remainder)) for k, count in enumerate(counts.values())))
    return sizes


def initial_net(setup: Setup, data: Data, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_mlp(data.inputs, setup.hidden, data.classes)


# ---------------------------------------------------------------------------- our variants
def trainer(setup: Setup, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", **overhead.TRAINER_OPTIONS, **kwargs)


def run_loop(setup: Setup, data: Data, net: nn.Module, seed: int) -> Outcome:
    """The plain PyTorch loop: shuffled index batches of the in-memory tensors, a new Adam per task."""
    return plain_loop(net, data.train, setup.batch_size, setup.epochs, setup.learning_rate, seed), None


def run_plain_lightning(setup: Setup, data: Data, net: nn.Module, seed: int) -> Outcome:
    """Plain Lightning: one fit per task on a stock DataLoader over a TensorDataset."""
    module = overhead.Classifier(net)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    for x, y in data.train:
        loader = DataLoader(TensorDataset(x, y), batch_size=setup.batch_size, shuffle=True, generator=generator)
        task_trainer = trainer(setup, max_epochs=setup.epochs)
        task_trainer.fit(module, train_dataloaders=loader)
        steps += task_trainer.global_step
    return steps, None


def run_ours(method: str) -> Callable[[Setup, Data, nn.Module, int], Outcome]:
    """Our Lightning path with ``method``'s callback."""

    def run(setup: Setup, data: Data, net: nn.Module, seed: int) -> Outcome:
        module = overhead.ContinualClassifier(net) if method in NEEDS_MIXIN else overhead.Classifier(net)
        datamodule = TaskSequenceDataModule.from_benchmark(data.benchmark, batch_size=setup.batch_size, seed=seed)
        callbacks = make_method(method, net, seed, statistics.fmean(len(y) for _, y in data.train))
        sequence_trainer = trainer(setup, callbacks=callbacks)
        fit_sequence(sequence_trainer, module, datamodule, epochs_per_task=setup.epochs)
        return sequence_trainer.global_step, predictor_of(callbacks)

    return run


def predictor_of(callbacks: Sequence[Any]) -> Optional[Predictor]:
    """How the method predicts, where not by the network's outputs: iCaRL's nearest mean of exemplars,
    BiC's corrected logits (their ``classifier``); ``None``: the network's outputs."""
    classifiers = [callback.classifier for callback in callbacks if hasattr(callback, "classifier")]
    return classifiers[0] if classifiers else None


def our_variant(setup: Setup, data: Data, runner: Callable[[Setup, Data, nn.Module, int], Outcome],
                accuracies: list, method: str = "naive") -> Callable[[], overhead.Timing]:
    """A run of ``runner`` for ``overhead.interleaved``; round ``r`` (its ``r``-th call) uses seed ``seed + r``.

    Each call appends the run's per-task accuracies to ``accuracies``; a run must make the steps
    ``method`` makes (:func:`expected_steps`).
    """

    def run() -> overhead.Timing:
        seed = setup.seed + len(accuracies)
        net = initial_net(setup, data, seed)
        start = overhead.clock()
        steps, predictor = runner(setup, data, net, seed)
        seconds = overhead.since(start)
        if steps != expected_steps(setup, data, method):
            raise RuntimeError(f"a sequence of {method} made {steps} steps, not {expected_steps(setup, data, method)}")
        accuracies.append(task_accuracies(net, data.test, predictor=predictor))
        return seconds

    return run


# ---------------------------------------------------------------------------- the peer
class PeerWorker:
    """``versus_peers_avalanche.py`` under ``python``, kept running for the whole benchmark."""

    def __init__(self, python: str, data_path: Path, threads: int, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [python, str(WORKER), "--data", str(data_path), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.versions = self._reply(f"the Avalanche worker under {python} did not start")

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._reply(f"the Avalanche worker stopped during {request}")
        if "error" in reply:
            raise RuntimeError(f"the Avalanche worker failed on {request}: {reply['error']}")
        return reply

    def _reply(self, failure: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"{failure}; its last output:\n{_tail(self.log_path)}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self._log.close()


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_peer_data(path: Path, setup: Setup, data: Data) -> None:
    """The tensors, the settings and each round's initial weights, for the worker to load."""
    weights = {setup.seed + r: initial_net(setup, data, setup.seed + r).state_dict() for r in range(setup.rounds)}
    torch.save({"train": data.train, "test": data.test, "inputs": data.inputs, "classes": data.classes,
                "setup": {"hidden": list(setup.hidden), "batch_size": setup.batch_size, "epochs": setup.epochs,
                          "learning_rate": setup.learning_rate},
                "initial_weights": weights}, path)


def peer_variant(setup: Setup, data: Data, worker: PeerWorker, method: str, accuracies: list) -> Callable[[], overhead.Timing]:
    """A run of ``method`` in the worker, seeded as :func:`our_variant` seeds ours."""

    def run() -> overhead.Timing:
        seed = setup.seed + len(accuracies)
        reply = worker.run({"method": method, "plugin": peer_settings(method), "seed": seed})
        fewest = peer_minimum_steps(setup, data, method)  # their replay's last batches, iCaRL's exemplars add some
        if reply["iterations"] < fewest:
            raise RuntimeError(f"avalanche/{method} made {reply['iterations']} steps, fewer than {fewest}")
        accuracies.append(reply["accuracies"])
        return overhead.Timing(reply["wall_s"], reply["cpu_s"])

    return run


# ---------------------------------------------------------------------------- measuring and reporting
def peer_methods(setup: Setup) -> list[str]:
    """What the worker runs: our plain loop in its environment, each method, the checks of those measured."""
    return ["loop", *setup.methods, *(check for check, method in PEER_CHECKS.items() if method in setup.methods)]


def round_order(setup: Setup) -> list[str]:
    """A round's variants: the baselines, then each method ours and Avalanche's side by side."""
    order = ["loop", "avalanche/loop", "lightning"]
    for method in setup.methods:
        order += [f"ours/{method}", f"avalanche/{method}"]
        order += [f"avalanche/{check}" for check, checked in PEER_CHECKS.items() if checked == method]
    return order


def variants(setup: Setup, data: Data, worker: Optional[PeerWorker]) -> tuple[dict[str, Callable[[], overhead.Timing]], dict[str, list]]:
    """Every variant's run, in the order of a round, and the list where each keeps its rounds' accuracies."""
    runners: dict[str, Callable[[Setup, Data, nn.Module, int], Outcome]] = {"loop": run_loop, "lightning": run_plain_lightning}
    runners.update({f"ours/{method}": run_ours(method) for method in setup.methods})
    accuracies: dict[str, list] = {name: [] for name in runners}
    runs = {name: our_variant(setup, data, runner, accuracies[name], name.removeprefix("ours/"))
            for name, runner in runners.items()}
    if worker is None:
        return runs, accuracies
    for method in peer_methods(setup):
        accuracies[f"avalanche/{method}"] = []
        runs[f"avalanche/{method}"] = peer_variant(setup, data, worker, method, accuracies[f"avalanche/{method}"])
    return {name: runs[name] for name in round_order(setup)}, accuracies


def summarize(times: dict[str, list[overhead.Timing]], accuracies: dict[str, list]) -> dict[str, Any]:
    """Per variant: the rounds' times, medians, ratios to the loop, and the accuracies."""
    result = {}
    for name, measured in times.items():
        entry = overhead.summary(measured, times["loop"])
        averages = [statistics.fmean(round_) for round_ in accuracies[name]]
        entry.update(task_accuracies=accuracies[name], average_accuracies=averages,
                     average_accuracy=statistics.median(averages))
        result[name] = entry
    return result


def table(report: dict[str, Any]) -> str:
    """The markdown table: per method, ours against Avalanche, each against the plain loop."""
    m = report["measurements"]
    peer = any(name.startswith("avalanche/") for name in m)
    lines = [
        "| variant | ours s (x loop) | Avalanche s (x loop) | ours / Avalanche | accuracy ours | accuracy Avalanche |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(name: str) -> str:
        return f"{m[name]['median_s']:.2f} ({m[name]['ratio']:.2f}x)" if name in m else "-"

    def accuracy(name: str) -> str:
        if name not in m:
            return "-"
        averages = m[name]["average_accuracies"]
        spread = f" ({min(averages):.3f}-{max(averages):.3f})" if len(averages) > 1 else ""
        return f"{m[name]['average_accuracy']:.3f}{spread}"

    loop_versus = f"{m['loop']['median_s'] / m['avalanche/loop']['median_s']:.2f}" if peer else "-"
    lines.append(f"| plain PyTorch loop | {cell('loop')} | {cell('avalanche/loop')} | {loop_versus} | "
                 f"{accuracy('loop')} | {accuracy('avalanche/loop')} |")
    lines.append(f"| plain Lightning, stock DataLoader | {cell('lightning')} | - | - | {accuracy('lightning')} | - |")
    for method in report["setup"]["methods"]:
        ours, theirs = f"ours/{method}", f"avalanche/{method}"
        versus = f"{m[ours]['median_s'] / m[theirs]['median_s']:.2f}" if peer else "-"
        lines.append(f"| {method} | {cell(ours)} | {cell(theirs)} | {versus} | {accuracy(ours)} | {accuracy(theirs)} |")
        for check in (check for check, checked in PEER_CHECKS.items() if checked == method and f"avalanche/{check}" in m):
            label = f"{method}, their λ × {report['setup']['batch_size']} (check)"
            lines.append(f"| {label} | - | {cell('avalanche/' + check)} | - | - | {accuracy('avalanche/' + check)} |")
    return "\n".join(lines)


def mapping_table(methods: Sequence[str]) -> str:
    """The markdown table of what each method is on both sides (``MAPPINGS``)."""
    lines = ["| method | ours | Avalanche 0.6.0 | mapped | differs by definition |", "| --- | --- | --- | --- | --- |"]
    for method in methods:
        entry = MAPPINGS[method]
        lines.append(f"| {method} | `{entry.ours}` | `{entry.avalanche}` | {entry.mapped} | {entry.differs} |")
    return "\n".join(lines)


def parse_setup(argv: Optional[Sequence[str]]) -> tuple[Setup, Optional[str], Optional[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", help="a Python with avalanche-lib 0.6.0 (its own virtual environment); without it only our side runs")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds, one seed each (default {DEFAULT.rounds})")
    parser.add_argument("--epochs", type=int, help=f"epochs per task (default {DEFAULT.epochs})")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads, on both sides (default {DEFAULT.threads})")
    parser.add_argument("--data", choices=("fashion_mnist", "mnist", "digits"), help="the source (default fashion_mnist)")
    parser.add_argument("--root", help=f"the folder of the IDX files (default {overhead.FASHION_MNIST})")
    parser.add_argument("--methods", help=f"comma-separated, of {','.join(METHODS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: digits, a 16-16 MLP, one round (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    setup = replace(DEFAULT, **QUICK) if args.quick else DEFAULT
    overrides = {"rounds": args.rounds, "epochs": args.epochs, "threads": args.threads, "data": args.data, "root": args.root}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if setup.data == "digits":
        setup = replace(setup, root=None)
    for name in ("rounds", "epochs", "threads"):
        if getattr(setup, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(setup, name)}")
    if args.methods is not None:
        methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
        unknown = [name for name in methods if name not in METHODS]
        if unknown or not methods:
            parser.error(f"--methods must list some of {','.join(METHODS)}, got {args.methods!r}")
        setup = replace(setup, methods=methods)
    if args.peer_python is not None and not os.access(args.peer_python, os.X_OK):
        parser.error(f"--peer-python must be an executable Python, got {args.peer_python!r}")
    return setup, args.peer_python, args.json


@contextlib.contextmanager
def peer_worker(python: Optional[str], setup: Setup, data: Data) -> Iterator[Optional[PeerWorker]]:
    if python is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="versus-peers-") as folder:
        path = Path(folder) / "data.pt"
        write_peer_data(path, setup, data)
        worker = PeerWorker(python, path, setup.threads, Path(folder) / "worker.log")
        try:
            yield worker
        finally:
            worker.close()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    setup, peer_python, json_path = parse_setup(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        with overhead.quiet_lightning():
            data = load_data(setup)
            with peer_worker(peer_python, setup, data) as worker:
                load_start = overhead._load_average()
                started = time.perf_counter()
                runs, accuracies = variants(setup, data, worker)
                times = overhead.interleaved({name: overhead.reported(name, run, started) for name, run in runs.items()}, setup.rounds)
                elapsed = time.perf_counter() - started
                load_end = overhead._load_average()
                peer = worker.versions if worker is not None else None
    finally:
        torch.set_num_threads(threads)
    report = {
        "benchmark": "versus_peers",
        "setup": asdict(setup),
        "steps_per_sequence": expected_steps(setup, data),
        "machine": {**overhead.machine(), "load_average_start": load_start, "load_average_end": load_end},
        "peer": peer,
        "commit": overhead.git_commit(),
        "command": " ".join(["python", "benchmarks/versus_peers.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_time_s": elapsed,
        "mapping": {method: {**asdict(MAPPINGS[method]), "settings": peer_settings(method)}
                    for method in (*setup.methods, *(c for c, m in PEER_CHECKS.items() if m in setup.methods))},
        "measurements": summarize(times, accuracies),
    }
    report["table"] = table(report)
    report["mapping_table"] = mapping_table(list(report["mapping"]))
    print(f"\n{setup.data}, {NUM_TASKS} tasks class-incremental, {setup.epochs} epoch(s) per task, MLP "
          f"{data.inputs}-{'-'.join(map(str, setup.hidden))}-{data.classes}, batch {setup.batch_size}, "
          f"{setup.threads} threads, medians of {setup.rounds} interleaved rounds (seeds {setup.seed}..{setup.seed + setup.rounds - 1}); "
          f"load average {load_start} -> {load_end}; whole run {elapsed:.0f} s\n")
    print(report["table"])
    print(f"\n{report['mapping_table']}")
    if json_path:
        with open(json_path, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
