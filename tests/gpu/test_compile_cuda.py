"""torch.compile on a CUDA device with inductor (Triton kernels): every method trains a compiled
model, standalone and under a Trainer, as it trains the eager one on the same device.

Marked ``gpu`` and skipped without CUDA; run them on a GPU machine with
``python -m pytest -q -m gpu tests/gpu``. The CPU tests (tests/continual/test_compile.py) use
the ``aot_eager`` backend; these run inductor's generated kernels. The models are float64:
fused kernels reorder sums, which in float64 moves results by ~1e-15 relative per operation,
so compiled and eager agree to 1e-8 after a few steps (float32 would need ~1e-4 and hide less).
"""

from __future__ import annotations

import pytest
import torch

from tests.continual.test_compile import (
    METHODS,
    assert_close_state,
    lightning_run,
    parameters_of,
    standalone_run,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA_TOLERANCE = dict(rtol=0.0, atol=1e-8)


@pytest.mark.parametrize("name", list(METHODS))
def test_train_step_on_a_model_compiled_by_inductor_equals_the_eager_one_on_cuda(name):
    eager_net, _ = standalone_run(name, compiled=False, device="cuda")
    compiled_net, _ = standalone_run(name, compiled=True, backend="inductor", device="cuda")
    assert next(compiled_net.parameters()).is_cuda
    torch.testing.assert_close(parameters_of(compiled_net), parameters_of(eager_net), **CUDA_TOLERANCE)


@pytest.mark.parametrize("name", ["EWC", "SI", "distillation", "replay", "DER++", "A-GEM", "GDumb"])
def test_a_lightning_module_compiled_by_inductor_trains_as_the_eager_one_on_cuda(name):
    options = dict(accelerator="gpu", devices=1)
    eager_net, _, eager = lightning_run(name, compiled=False, **options)
    compiled_net, _, compiled = lightning_run(name, compiled=True, backend="inductor", **options)
    assert next(compiled_net.parameters()).is_cuda
    torch.testing.assert_close(parameters_of(compiled_net), parameters_of(eager_net), **CUDA_TOLERANCE)
    assert_close_state(compiled.state_dict(), eager.state_dict(), tolerance=CUDA_TOLERANCE)
