"""The Avalanche side of ``benchmarks/versus_peers.py``, run in Avalanche's own virtual environment.

``versus_peers.py`` starts this file with ``--peer-python`` (an interpreter that has
``avalanche-lib`` 0.6.0 and its torch) and talks to it over stdin/stdout, one JSON object a line:

    request   {"method": "ewc", "plugin": {"ewc_lambda": 500.0}, "seed": 0}
    reply     {"wall_s": ..., "cpu_s": ..., "accuracies": [...], "iterations": 470}

The data file (``torch.save``) holds every task's inputs and labels exactly as our side trains on
them, the training settings, and the initial weights of each seed, so both sides start from the
same network. Avalanche is imported only inside :func:`serve`: the model and the accuracy helpers
here are shared with ``versus_peers.py``, whose environment has no Avalanche.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn

#: Each method's Avalanche plugin (its strategy wrappers are ``SupervisedTemplate`` plus the plugin;
#: ``Replay``'s wrapper cannot set the memory batch size or the storage policy, so the plugin it is).
PLUGINS = {
    "naive": None,
    "ewc": "EWCPlugin",
    "ewc_batch": "EWCPlugin",  # a check of what the EWC gap comes from (versus_peers.PEER_CHECKS)
    "si": "SynapticIntelligencePlugin",
    "lwf": "LwFPlugin",
    "replay": "ReplayPlugin",
    "mas": "MASPlugin",
    "rwalk": "RWalkPlugin",
}


def build_mlp(inputs: int, hidden: Sequence[int], classes: int) -> nn.Sequential:
    """The benchmark's MLP (Linear-ReLU blocks, then the head); both sides load the same weights into it."""
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, classes))


@torch.no_grad()
def task_accuracies(net: nn.Module, tests: Sequence[tuple[Tensor, Tensor]], batch_size: int = 1000) -> list[float]:
    """Each task's test accuracy over the whole head (class-incremental: no task id), in eval mode."""
    was_training = net.training
    net.eval()
    accuracies = []
    for x, y in tests:
        batches = zip(x.split(batch_size), y.split(batch_size))
        accuracies.append(sum(int((net(inputs).argmax(1) == labels).sum()) for inputs, labels in batches) / len(y))
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
    from avalanche.training import plugins, storage_policy

    settings = dict(settings)
    if "storage" in settings:  # replay's memory: a buffer class of Avalanche's, sized as the memory
        buffer = getattr(storage_policy, settings.pop("storage"))
        settings["storage_policy"] = buffer(max_size=settings["mem_size"], adaptive_size=True)
    return getattr(plugins, PLUGINS[name])(**settings)


def run_sequence(request: dict[str, Any], data: dict[str, Any], scenario: Any) -> dict[str, Any]:
    """One whole sequence of one method (``loop``: the plain loop, no Avalanche); timed."""
    setup, seed = data["setup"], int(request["seed"])
    net = build_mlp(data["inputs"], setup["hidden"], data["classes"])
    net.load_state_dict(data["initial_weights"][seed])
    if request["method"] == "loop":
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        steps = plain_loop(net, data["train"], setup["batch_size"], setup["epochs"], setup["learning_rate"], seed)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        return {"wall_s": wall, "cpu_s": cpu, "accuracies": task_accuracies(net, data["test"]), "iterations": steps}
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    RNGManager.set_random_seeds(seed)  # the loaders' shuffling and the buffers' sampling
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    plugins = [] if PLUGINS[request["method"]] is None else [_plugin(request["method"], request["plugin"])]
    strategy = Naive(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=setup["learning_rate"]),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=setup["batch_size"],
        train_epochs=setup["epochs"],
        eval_mb_size=setup["batch_size"],
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),  # no metrics, no progress bars: as our runs log nothing
    )
    for experience in scenario.train_stream:
        # A fresh Adam state per task, as each of our fits builds its optimizer anew.
        strategy.train(experience, eval_streams=[], reset_optimizer_state=True)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    return {"wall_s": wall, "cpu_s": cpu, "accuracies": task_accuracies(net, data["test"]),
            "iterations": int(strategy.clock.train_iterations)}


def serve(data_path: str, threads: int) -> None:
    """Answer requests from stdin until it closes; every reply is one JSON line on stdout."""
    from avalanche.benchmarks import tensors_benchmark

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # anything Avalanche prints must not mix with the replies
    torch.set_num_threads(threads)
    data = torch.load(data_path)
    scenario = tensors_benchmark(train_tensors=data["train"], test_tensors=data["test"],
                                 task_labels=[0] * len(data["train"]))
    replies.write(json.dumps({"ready": True, "torch": torch.__version__, "avalanche": _avalanche_version()}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = run_sequence(request, data, scenario)
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
