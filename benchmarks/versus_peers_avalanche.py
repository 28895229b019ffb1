"""The Avalanche side of ``benchmarks/versus_peers.py``, run in Avalanche's own virtual environment.

``versus_peers.py`` starts this file with ``--peer-python`` (an interpreter that has
``avalanche-lib`` 0.6.0 and its torch) and talks to it over stdin/stdout, one JSON object a line:

    request   {"method": "ewc", "plugin": {"ewc_lambda": 500.0}, "seed": 0}
    reply     {"wall_s": ..., "cpu_s": ..., "accuracies": [...], "iterations": 470}

The data file (``torch.save``) holds every task's inputs and labels exactly as our side trains on
them, the training settings, and the initial weights of each seed, so both sides start from the
same network. Avalanche is imported only inside :func:`serve`: the model and the accuracy helpers
here are shared with ``versus_peers.py``, whose environment has no Avalanche.

A method is Avalanche's ``Naive`` strategy with the method's plugin (``PLUGINS``), or the strategy
Avalanche has for it (``STRATEGIES``: DER, ER_ACE, ICaRL); ``plugin`` in a request holds the
plugin's or the strategy's keyword arguments. GEM needs ``quadprog`` in that environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

#: Each method's Avalanche plugin, run by the ``Naive`` strategy (its strategy wrappers are
#: ``SupervisedTemplate`` plus the plugin; ``Replay``'s wrapper cannot set the memory batch size or
#: the storage policy, so the plugin it is).
PLUGINS = {
    "naive": None,
    "ewc": "EWCPlugin",
    "ewc_batch": "EWCPlugin",  # a check of what the EWC gap comes from (versus_peers.PEER_CHECKS)
    "si": "SynapticIntelligencePlugin",
    "lwf": "LwFPlugin",
    "replay": "ReplayPlugin",
    "mas": "MASPlugin",
    "rwalk": "RWalkPlugin",
    "gem": "GEMPlugin",  # needs quadprog (through qpsolvers), which avalanche-lib does not install
    "agem": "AGEMPlugin",
    "bic": "BiCPlugin",
    "gdumb": "GDumbPlugin",
}
#: The methods Avalanche has as strategies of their own (a training loop, not a plugin): their
#: settings are the strategy's keyword arguments.
STRATEGIES = {"der": "DER", "derpp": "DER", "er_ace": "ER_ACE", "icarl": "ICaRL"}

def build_mlp(inputs: int, hidden: Sequence[int], classes: int) -> nn.Sequential:
    """The benchmark's MLP (Linear-ReLU blocks, then the head); both sides load the same weights into it."""
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, classes))


@torch.no_grad()
def task_accuracies(net: nn.Module, tests: Sequence[tuple[Tensor, Tensor]], batch_size: int = 1000,
                    predictor: Optional[Callable[[Tensor], Tensor]] = None) -> list[float]:
    """Each task's test accuracy over the whole head (class-incremental: no task id), in eval mode.

    ``predictor`` (default: ``net`` itself) gives the scores whose arg max is the prediction: a
    method that predicts otherwise than through the network's head (iCaRL's nearest mean of
    exemplars, BiC's corrected logits) is measured by its own prediction, ``net`` in eval mode.
    """
    was_training = net.training
    net.eval()
    scores = net if predictor is None else predictor
    accuracies = []
    for x, y in tests:
        batches = zip(x.split(batch_size), y.split(batch_size))
        accuracies.append(sum(int((scores(inputs).argmax(1) == labels).sum()) for inputs, labels in batches) / len(y))
    net.train(was_training)
    return accuracies

def plain_loop(net: nn.Module, train: Sequence[tuple[Tensor, Tensor]], batch_size: int, epochs: int,
               learning_rate: float, seed: int) -> int:
    """The plain PyTorch loop over the tasks' tensors, a new Adam per task; returns its steps.

    Both sides run this same code, so the loop in Avalanche's environment tells what its torch
    alone changes.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    for x, y in train:
        optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
        for _ in range(epochs):
            for index in torch.randperm(len(y), generator=generator).split(batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x[index]), y[index]).backward()
                optimizer.step()
                steps += 1
    return steps


def _plugin(name: str, settings: dict[str, Any]) -> Any:
    """The Avalanche plugin of ``name`` built from our mapped ``settings`` (``storage`` names a buffer)."""
    if name == "gem":
        _require_quadprog()
    if name == "bic":
        _scheduler_without_verbose()
    from avalanche.training import plugins, storage_policy

    settings = dict(settings)
    if "storage" in settings:  # replay's memory: a buffer class of Avalanche's, sized as the memory
        buffer = getattr(storage_policy, settings.pop("storage"))
        settings["storage_policy"] = buffer(max_size=settings["mem_size"], adaptive_size=True)
    return getattr(plugins, PLUGINS[name])(**settings)


def _require_quadprog() -> None:
    """GEM's plugin solves its quadratic program with ``qpsolvers``' ``quadprog`` solver, which
    installing avalanche-lib does not bring: say so before a run fails halfway."""
    try:
        import quadprog  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"Avalanche's GEMPlugin needs the quadprog package, missing under {sys.executable}: "
            f"{sys.executable} -m pip install quadprog (neurenix's peers extra lists it)"
        ) from None


def _scheduler_without_verbose() -> None:
    """Let Avalanche 0.6.0's BiCPlugin build its stage-2 scheduler under a torch without ``verbose``.

    It calls ``MultiStepLR(..., verbose=False)``, an argument torch has since removed (a TypeError
    at the end of the second task); ``verbose=False`` only kept messages off, so the class its
    module uses is given one that drops it. Nothing else of the plugin changes.
    """
    import inspect

    from avalanche.training.plugins import bic

    if "verbose" in inspect.signature(torch.optim.lr_scheduler.MultiStepLR).parameters:
        return

    class MultiStepLR(torch.optim.lr_scheduler.MultiStepLR):
        def __init__(self, *args: Any, verbose: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    bic.MultiStepLR = MultiStepLR


def build_strategy(method: str, settings: dict[str, Any], net: nn.Sequential, setup: dict[str, Any]) -> Any:
    """Avalanche's strategy of ``method`` with our mapped ``settings``, training ``net`` itself (its
    weights, not a copy) with Adam and the benchmark's batch size and epochs."""
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin

    common = {
        "optimizer": torch.optim.Adam(net.parameters(), lr=setup["learning_rate"]),
        "train_mb_size": setup["batch_size"],
        "train_epochs": setup["epochs"],
        "eval_mb_size": setup["batch_size"],
        "evaluator": EvaluationPlugin(loggers=[]),  # no metrics, no progress bars: as our runs log nothing
    }
    if method == "icarl":  # the same MLP split at its head: features are the last hidden layer's output
        return supervised.ICaRL(feature_extractor=net[:-1], classifier=net[-1], buffer_transform=None,
                                fixed_memory=True, **settings, **common)
    if method in STRATEGIES:
        return getattr(supervised, STRATEGIES[method])(model=net, criterion=nn.CrossEntropyLoss(), **settings, **common)
    plugins = [] if PLUGINS[method] is None else [_plugin(method, settings)]
    return supervised.Naive(model=net, criterion=nn.CrossEntropyLoss(), plugins=plugins, **common)


def trained_predictor(method: str, strategy: Any) -> tuple[nn.Module, Optional[Callable[[Tensor], Tensor]]]:
    """The network the strategy ends with, and how the method predicts with it (``None``: its outputs).

    GDumb replaces the strategy's model by a copy of the initial one at every experience; iCaRL's
    model predicts by the nearest mean of exemplars in eval mode; BiC corrects the logits with its
    last bias layer (what its ``after_eval_forward`` does in Avalanche's evaluation).
    """
    if method == "bic":
        bic = next(plugin for plugin in strategy.plugins if type(plugin).__name__ == "BiCPlugin")
        return strategy.model, lambda inputs: bic.bias_forward(strategy.model(inputs))
    return strategy.model, None


def class_incremental_scenario(train: Sequence[tuple[Tensor, Tensor]], test: Sequence[tuple[Tensor, Tensor]]) -> Any:
    """The same tasks as Avalanche's class-incremental benchmark (``nc_benchmark``), which iCaRL needs
    (it reads ``n_classes_per_exp`` and ``classes_order``): each experience holds the same samples as
    the task, grouped by class (the training loader shuffles them)."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    order = [int(c) for _, y in train for c in torch.unique(y).tolist()]
    if len(set(order)) != len(order):
        raise ValueError("iCaRL's scenario needs tasks of disjoint classes (class-incremental)")

    def joined(tasks: Sequence[tuple[Tensor, Tensor]]) -> Any:
        return tensor_dataset(torch.cat([x for x, _ in tasks]), torch.cat([y for _, y in tasks]))

    return nc_benchmark(joined(train), joined(test), n_experiences=len(train), task_labels=False,
                        fixed_class_order=order, shuffle=False)


def run_sequence(request: dict[str, Any], data: dict[str, Any], scenarios: dict[str, Any]) -> dict[str, Any]:
    """One whole sequence of one method (``loop``: the plain loop, no Avalanche); timed."""
    setup, seed, method = data["setup"], int(request["seed"]), request["method"]
    net = build_mlp(data["inputs"], setup["hidden"], data["classes"])
    net.load_state_dict(data["initial_weights"][seed])
    if method == "loop":
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        steps = plain_loop(net, data["train"], setup["batch_size"], setup["epochs"], setup["learning_rate"], seed)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        return {"wall_s": wall, "cpu_s": cpu, "accuracies": task_accuracies(net, data["test"]), "iterations": steps}
    from avalanche.training.determinism.rng_manager import RNGManager

    if method not in PLUGINS and method not in STRATEGIES:
        raise ValueError(f"method must be one of {', '.join(['loop', *PLUGINS, *STRATEGIES])}, got {method!r}")
    scenario = scenarios["class_incremental" if method == "icarl" else "tensors"]()
    RNGManager.set_random_seeds(seed)  # the loaders' shuffling and the buffers' sampling
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    strategy = build_strategy(method, request["plugin"], net, setup)
    for experience in scenario.train_stream:
        # A fresh Adam state per task, as each of our fits builds its optimizer anew.
        strategy.train(experience, eval_streams=[], reset_optimizer_state=True)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    trained, predictor = trained_predictor(method, strategy)
    return {"wall_s": wall, "cpu_s": cpu, "accuracies": task_accuracies(trained, data["test"], predictor=predictor),
            "iterations": int(strategy.clock.train_iterations)}


def _once(build: Callable[[], Any]) -> Callable[[], Any]:
    """``build``, called at the first request only (a scenario is built once, when first needed)."""
    built: list[Any] = []

    def get() -> Any:
        if not built:
            built.append(build())
        return built[0]

    return get


def serve(data_path: str, threads: int) -> None:
    """Answer requests from stdin until it closes; every reply is one JSON line on stdout."""
    from avalanche.benchmarks import tensors_benchmark

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # anything Avalanche prints must not mix with the replies
    torch.set_num_threads(threads)
    data = torch.load(data_path)
    scenarios = {
        "tensors": _once(lambda: tensors_benchmark(train_tensors=data["train"], test_tensors=data["test"],
                                                   task_labels=[0] * len(data["train"]))),
        "class_incremental": _once(lambda: class_incremental_scenario(data["train"], data["test"])),
    }
    scenarios["tensors"]()  # built before the first timing, as before
    replies.write(json.dumps({"ready": True, "torch": torch.__version__, "avalanche": _avalanche_version()}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = run_sequence(request, data, scenarios)
        except Exception as error:  # the caller stops the run and shows this
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _avalanche_version() -> str:
    from importlib.metadata import version

    return version("avalanche-lib")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the data file versus_peers.py wrote")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (as on our side)")
    args = parser.parse_args(argv)
    serve(args.data, args.threads)


if __name__ == "__main__":
    main()
