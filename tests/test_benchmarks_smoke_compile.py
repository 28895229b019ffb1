"""benchmarks/continual_overhead.py ``--compile`` in its smoke mode (``--quick``, tiny sizes, digits).

Section 6 alone (``--compile-only``), with the ``aot_eager`` backend: it traces and recompiles as
inductor does, without generating C++ (inductor's first compilation takes ~17 s here, and every
variant compiles). Nothing here looks at how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_benchmarks_smoke import METHODS, load_script, numbers


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def compiled_run(script, tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "compiled.json"
    argv = ["--quick", "--data", "digits", "--threads", "1", "--compile", "--compile-backend", "aot_eager", "--compile-only", "--json", str(path)]
    returned = script.main(argv)
    return returned, json.loads(path.read_text())


def test_compile_measures_every_method_in_both_doors_against_the_compiled_plain_step(compiled_run):
    returned, report = compiled_run
    assert report == json.loads(json.dumps(returned))
    assert report["setup"]["compile_backend"] == "aot_eager"
    assert list(report["measurements"]) == ["compiled"]  # --compile-only: section 6 alone
    compiled, repeats = report["measurements"]["compiled"], report["setup"]["repeats"]
    assert compiled["backend"] == "aot_eager"
    for door, reference in (("lightning", "plain"), ("standalone", "handwritten")):
        assert list(compiled[door]) == [reference, *METHODS]
        assert compiled[door][reference]["ratio"] == compiled[door][reference]["cpu_ratio"] == 1.0
        for row, entry in compiled[door].items():
            assert len(entry["times_s"]) == len(entry["cpu_times_s"]) == repeats, (door, row)
            assert entry["ratio"] == pytest.approx(entry["median_s"] / compiled[door][reference]["median_s"])
    found = dict(numbers(report["measurements"]))
    bad = {path: value for path, value in found.items() if not (math.isfinite(value) and value > 0)}
    assert len(found) > 100 and not bad


def test_the_compiled_lightning_run_leaves_one_compiled_layer(script):
    # Lightning compiles forward and training_step in place at every fit, over what the last fit
    # compiled: the run puts them back after each fit.
    setup, _, _ = script.parse_setup(["--quick", "--data", "digits", "--compile", "--compile-backend", "eager"])
    module = script.Classifier(torch.nn.Sequential(torch.nn.Linear(64, 10)))
    data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    run = script.compiled_lightning_run(module, [], torch.utils.data.DataLoader(data, batch_size=8), setup)
    for _ in range(2):
        assert run().wall > 0
        assert module._compiler_ctx is None  # the methods are the class's again, not compiled ones
        assert module.forward.__func__ is script.Classifier.forward
        assert module.training_step.__func__ is script.Classifier.training_step


def test_compile_options(script, capsys):
    setup, _, only = script.parse_setup(["--compile"])
    assert setup.compile_backend == "inductor" and only is False  # inductor by default
    assert script.parse_setup([])[0].compile_backend is None  # no section 6 unless asked
    with pytest.raises(SystemExit):
        script.parse_setup(["--compile-only"])
    assert "--compile-only needs --compile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_setup(["--compile", "--compile-backend", "tvm"])
    assert "invalid choice: 'tvm'" in capsys.readouterr().err
