"""The README's Lightning example runs as written and learns with both methods attached."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_lightning_example_runs_and_consolidates_every_task(tmp_path, monkeypatch):
    (example,) = [block for block in _python_blocks() if "L.Trainer" in block]
    monkeypatch.chdir(tmp_path)  # the example's Trainer writes lightning_logs/ where it runs
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    ewc, replay = namespace["methods"]
    assert ewc.finished_tasks == replay.finished_tasks == [0, 1, 2]
    assert len(replay.memory) == 500  # 3 tasks x 256 samples offered, reservoir of 500
    assert float(ewc.get_ewc_loss()) > 0  # task 2's parameters moved away from tasks 0 and 1
