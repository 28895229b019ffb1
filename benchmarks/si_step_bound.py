"""What bounds SI's per-step cost on a CPU: moving its state through memory, not its arithmetic.

Trains the reference MLP of ``continual_overhead.py`` (784-400-400-10, batch 128, Adam) and times,
inside real training steps (after ``backward``, before ``optimizer.step()``, where the methods
do their work), the kernels of:

- ``ewc``: EWC's closed-form penalty gradient (``functional.add_quadratic_penalty_grad_``);
- ``si``: SI's path integral and its penalty gradient (``functional.si_step_``, then the same
  penalty kernel), as ``SynapticIntelligence`` runs them;
- ``si-fused``: the same SI work written as one loop over each tensor's elements and compiled
  (``torch.compile``), which reads and writes each array once: the fewest passes any kernel could
  make. Its results are checked equal to ``si``'s before it is timed.

Each is also timed "hot": run back to back on state that is already in the cache. A ``none``
variant (no kernels) gives the plain step. The variants train in blocks of steps, taking turns
(A B C, C B A, ...), so that machine drift hits all alike; the report gives medians, the kernels'
share of the plain step, the method's state bytes each kernel set reads or writes per step, and
the bandwidth that implies.

    python benchmarks/si_step_bound.py [--threads 2] [--blocks 40] [--steps 10] [--no-compile]
        [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from neurenix.continual import functional as CF

#: SI's penalty scale (2·importance) and a weight scale; values do not change the timings.
SCALE = 2.0


@dataclass
class State:
    """One variant's method state, shaped like the model's parameters."""

    anchor: list[Tensor]
    weight: list[Tensor]
    workspace: list[Tensor]
    omega: list[Tensor] = field(default_factory=list)
    pending_grads: list[Tensor] = field(default_factory=list)
    pending_params: list[Tensor] = field(default_factory=list)
    pending_storage: Optional[Tensor] = None

    def clone(self) -> "State":
        def copy(tensors: list[Tensor]) -> list[Tensor]:
            return [t.clone() for t in tensors]

        return State(copy(self.anchor), copy(self.weight), copy(self.workspace), copy(self.omega),
                     copy(self.pending_grads), copy(self.pending_params))


def make_state(params: Sequence[Tensor], *, with_path: bool, seed: int) -> State:
    generator = torch.Generator().manual_seed(seed)

    def noise(p: Tensor, scale: float) -> Tensor:
        return scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)

    state = State(
        anchor=[p.detach() + noise(p, 0.01) for p in params],
        weight=[noise(p, 1.0).abs() for p in params],
        workspace=[torch.empty_like(p) for p in params],
    )
    if with_path:
        state.omega = [noise(p, 1e-3) for p in params]
        state.pending_storage, views = CF.packed({str(i): noise(p, 1e-2) for i, p in enumerate(params)})
        state.pending_grads = list(views.values())
        state.pending_params = [p.detach() + noise(p, 1e-3) for p in params]
    return state


# ------------------------------------------------------------------------------------ the kernels
def ewc_kernels(state: State, params: Sequence[Tensor]) -> None:
    CF.add_quadratic_penalty_grad_([p.grad for p in params], params, state.anchor, state.weight, SCALE, state.workspace)


def si_kernels(state: State, params: Sequence[Tensor]) -> None:
    grads = [p.grad for p in params]
    CF.si_step_(state.omega, state.pending_grads, state.pending_params, grads, params, True, state.pending_storage)
    CF.add_quadratic_penalty_grad_(grads, params, state.anchor, state.weight, SCALE, state.workspace)


def si_fused_reference(omega, pending_grads, pending_params, params, grads, anchors, weights) -> None:
    """SI's step as element-wise expressions, for a compiler to fuse into one loop per tensor."""
    for om, pending_grad, pending_param, p, g, anchor, weight in zip(
        omega, pending_grads, pending_params, params, grads, anchors, weights
    ):
        om.add_(pending_grad * (pending_param - p))
        pending_grad.copy_(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
        pending_param.copy_(p)
        g.add_(SCALE * weight * (p - anchor))


def fused_kernels(fused: Callable) -> Callable[[State, Sequence[Tensor]], None]:
    def run(state: State, params: Sequence[Tensor]) -> None:
        fused(state.omega, state.pending_grads, state.pending_params, [p.detach() for p in params],
              [p.grad for p in params], state.anchor, state.weight)

    return run


def no_kernels(state: State, params: Sequence[Tensor]) -> None:
    return None


def check_same_work(fused: Callable, params: Sequence[Tensor], state: State) -> float:
    """Run ``si`` and ``fused`` on copies of one state and gradient; the largest difference.

    Raises:
        AssertionError: the two differ beyond float32 rounding.
    """
    grads = [torch.randn_like(p) for p in params]
    grads[0].view(-1)[0] = float("inf")  # the non-finite entry a skipped step leaves
    worst = 0.0
    results = []
    for kernels in (si_kernels, fused_kernels(fused)):
        copy = state.clone()
        copy.pending_storage, views = CF.packed({str(i): t for i, t in enumerate(copy.pending_grads)})
        copy.pending_grads = list(views.values())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with torch.no_grad():
            kernels(copy, params)
        results.append(copy.omega + copy.pending_grads + copy.pending_params + [p.grad.clone() for p in params])
    for ours, theirs in zip(*results):
        if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"the fused SI step differs from si_step_: {(ours - theirs).abs().max().item():.3g}")
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------ the run
def reference_mlp(quick: bool) -> nn.Module:
    torch.manual_seed(0)
    sizes = (64, 32, 32, 10) if quick else (784, 400, 400, 10)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def median_us(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e6


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = reference_mlp(args.quick)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 128, params[0].shape[1], generator=generator)
    targets = torch.randint(0, 10, (8, 128), generator=generator)

    variants: dict[str, tuple[Callable, State, int]] = {
        # name: (kernels, state, method-state arrays read or written per step)
        "none": (no_kernels, make_state(params, with_path=False, seed=2), 0),
        # anchor and weight read, workspace written
        "ewc": (ewc_kernels, make_state(params, with_path=False, seed=3), 3),
        # ω, pending gradient and pending parameters read and written, anchor and Ω read,
        # workspace written
        "si": (si_kernels, make_state(params, with_path=True, seed=4), 9),
    }
    report: dict = {"compile": None}
    if not args.no_compile:
        try:
            fused = torch.compile(si_fused_reference, dynamic=False)
            state = make_state(params, with_path=True, seed=5)
            started = time.perf_counter()
            report["fused_max_difference"] = check_same_work(fused, params, state)
            report["compile"] = {"seconds": time.perf_counter() - started}
            variants["si-fused"] = (fused_kernels(fused), state, 8)  # as si, without the workspace
        except AssertionError:
            raise
        except Exception as error:  # no C++ compiler, an unsupported platform: say so, time the rest
            report["compile"] = {"skipped": f"{type(error).__name__}: {error}"[:300]}

    in_step: dict[str, list[float]] = {name: [] for name in variants}
    step: dict[str, list[float]] = {name: [] for name in variants}
    batch = 0
    names = list(variants)
    for block in range(args.blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            kernels, state, _ = variants[name]
            for index in range(args.steps):
                x, y = inputs[batch % 8], targets[batch % 8]
                batch += 1
                started = time.perf_counter()
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                with torch.no_grad():
                    before = time.perf_counter()
                    kernels(state, params)
                    after = time.perf_counter()
                optimizer.step()
                if index >= 2:  # the first steps after another variant refill the caches
                    in_step[name].append(after - before)
                    step[name].append(time.perf_counter() - started)

    hot: dict[str, float] = {}
    for name, (kernels, state, _) in variants.items():
        times = []
        with torch.no_grad():
            for _ in range(args.hot):
                before = time.perf_counter()
                kernels(state, params)
                times.append(time.perf_counter() - before)
        hot[name] = median_us(times[2:])

    plain_step = median_us(step["none"])
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    rows = {}
    for name, (_, _, arrays) in variants.items():
        kernels_us = median_us(in_step[name])
        moved = arrays * parameter_bytes
        rows[name] = {
            "kernels_in_step_us": kernels_us,
            "kernels_hot_us": hot[name],
            "step_us": median_us(step[name]),
            "kernels_share_of_plain_step": kernels_us / plain_step,
            "state_arrays_moved": arrays,
            "state_bytes_moved": moved,
            "implied_gb_per_s": moved / (kernels_us * 1e-6) / 1e9 if arrays and kernels_us > 0 else None,
        }
    report.update(
        rows=rows,
        plain_step_us=plain_step,
        parameter_bytes=parameter_bytes,
        setup={"threads": args.threads, "blocks": args.blocks, "steps": args.steps, "hot": args.hot, "quick": args.quick},
        machine={"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "python": platform.python_version(), "load": list(os.getloadavg())},
    )
    return report


def print_report(report: dict) -> None:
    print(f"plain step {report['plain_step_us']:.0f} us; parameters {report['parameter_bytes'] / 2**20:.2f} MiB")
    print(f"{'':10s} {'in step us':>10s} {'hot us':>8s} {'of step':>8s} {'state MiB':>10s} {'GB/s':>6s}")
    for name, row in report["rows"].items():
        if name == "none":
            continue
        rate = row["implied_gb_per_s"]
        print(f"{name:10s} {row['kernels_in_step_us']:10.0f} {row['kernels_hot_us']:8.0f} "
              f"{row['kernels_share_of_plain_step']:8.1%} {row['state_bytes_moved'] / 2**20:10.1f} "
              f"{'' if rate is None else f'{rate:6.0f}'}")
    if report["compile"] is None:
        print("si-fused: not run (--no-compile)")
    elif "skipped" in report["compile"]:
        print(f"si-fused: skipped, {report['compile']['skipped']}")
    else:
        print(f"si-fused equals si to {report['fused_max_difference']:.1e} (compiled in {report['compile']['seconds']:.0f} s)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--blocks", type=int, default=40, help="blocks of steps per variant, taking turns (default 40)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block, the first two untimed (default 10)")
    parser.add_argument("--hot", type=int, default=200, help="back-to-back runs of each variant's kernels (default 200)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled si-fused variant")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps: a smoke run, timings mean nothing")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)
    for name in ("threads", "blocks", "hot"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (the first two are not timed), got {args.steps}")
    if args.quick:
        args.blocks, args.steps, args.hot = min(args.blocks, 2), min(args.steps, 3), min(args.hot, 3)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads)
    print_report(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
