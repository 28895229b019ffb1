"""benchmarks/device_data.py end to end in its smoke mode (``--quick``: digits, a 16-16 MLP).

Nothing here looks at how fast anything is: the tests check that one run measures every variant
once per round against the loop of the same run, that the data kept on the device gives the
weights of the CPU loader (bit for bit on the CPU), and that bad options are refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_benchmarks_smoke import SCRIPT, load_script

DEVICE_SCRIPT = SCRIPT.parent / "device_data.py"


@pytest.fixture(scope="module")
def device_data():
    return load_script(DEVICE_SCRIPT)


@pytest.fixture(scope="module")
def device_run(device_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("device_data") / "device.json"
    returned = device_data.main(["--quick", "--threads", "1", "--rounds", "2", "--methods", "naive,ewc,replay", "--json", str(path)])
    return returned, json.loads(path.read_text())


def test_device_data_measures_each_variant_once_per_round_against_the_loop(device_run):
    returned, written = device_run
    assert written == json.loads(json.dumps(returned))
    m = written["measurements"]
    assert list(m) == ["loop", "device/naive", "host/naive", "device/ewc", "host/ewc", "device/replay", "host/replay"]
    assert m["loop"]["ratio"] == 1.0
    for name, entry in m.items():
        assert len(entry["times_s"]) == 2 and all(t > 0 for t in entry["times_s"]), name
        assert entry["ratio"] == pytest.approx(entry["median_s"] / m["loop"]["median_s"]), name
    for method in ("naive", "ewc", "replay"):
        device, host = m[f"device/{method}"], m[f"host/{method}"]
        assert device["versus_host"] == pytest.approx(device["median_s"] / host["median_s"])
        assert device["weight_difference_to_host"] == 0.0  # on the CPU: the same batches, bit for bit
    assert written["steps_per_sequence"] == 15  # digits: 5 tasks of 2 or 3 batches of 128
    assert written["setup"]["accelerator"] == "cpu" and written["machine"]["load_average_start"] is not None
    assert "| ewc |" in written["table"] and written["command"].startswith("python benchmarks/device_data.py --quick")


def test_device_data_without_a_method_trains_the_loop_s_model(device_data):
    """The loop and our path with no callback start from the same weights and draw their batches from
    the same seeded permutations: the same final weights (to float tolerance: Lightning's step is
    the same maths through other code)."""
    setup, _ = device_data.parse_setup(["--quick", "--methods", "naive"])
    data = device_data.load_data(setup)
    finals: dict = {}
    runs = device_data.variants(setup, data, finals)
    for name in ("loop", "device/naive"):
        runs[name]()
    for ours, loop in zip(finals["device/naive"], finals["loop"]):
        torch.testing.assert_close(ours, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--methods", "ewc,lwf"], "--methods must list some of naive,ewc,l2,si,replay,distillation, got 'ewc,lwf'"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ],
)
def test_device_data_refuses_bad_options(device_data, capsys, argv, says):
    with pytest.raises(SystemExit):
        device_data.parse_setup(argv)
    assert says in capsys.readouterr().err
