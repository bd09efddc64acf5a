"""docs/monitoring.md: its python blocks run as written (tests/test_docs.py's rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def test_monitoring_doc_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [body for info, body in FENCE.findall(DOC.read_text(encoding="utf-8"))
              if info.strip() == "python"]
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FUNCZERO_PROGRESS", "plain")
    namespace: dict[str, object] = {"__name__": "docs_monitoring"}
    with torch.random.fork_rng():
        for i, code in enumerate(blocks, start=1):
            exec(compile(code, f"docs/monitoring.md (python block {i})", "exec"), namespace)  # noqa: S102


def test_monitoring_doc_shows_a_plot() -> None:
    image = DOC.parent / "images" / "monitoring-runs.png"
    assert "](images/monitoring-runs.png)" in DOC.read_text(encoding="utf-8")
    assert image.read_bytes()[:4] == b"\x89PNG"
