"""The README's Lightning examples run as written, one after the other, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _lightning_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "L.Trainer" in block]


def test_the_lightning_examples_run_and_consolidate_every_task(tmp_path, monkeypatch):
    first, sequence = _lightning_blocks()
    monkeypatch.chdir(tmp_path)  # the examples' Trainers write lightning_logs/ where they run
    namespace: dict = {}
    exec(compile(first, str(README), "exec"), namespace)
    ewc, replay = namespace["methods"]
    assert ewc.finished_tasks == replay.finished_tasks == [0, 1, 2]
    assert len(replay.memory) == 500  # 3 tasks x 256 samples offered, reservoir of 500
    assert float(ewc.get_ewc_loss()) > 0  # task 2's parameters moved away from tasks 0 and 1

    # The sequence block reuses the first one's Classifier on five digits tasks.
    exec(compile(sequence, str(README), "exec"), namespace)
    assert namespace["datamodule"].current_task == 4
    assert namespace["trainer"].global_step == sum(2 * -(-len(task) // 32) for task in namespace["benchmark"].train)
    (curves,) = [c for c in namespace["trainer"].callbacks if type(c).__name__ == "ForgettingCurves"]
    assert curves.matrix.accuracies().shape == (5, 5)
    assert namespace["methods"][0].finished_tasks == [0, 1, 2, 3, 4]
