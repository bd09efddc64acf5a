"""funczero.config.reference: docs/config.md lists every key as the table says; its code runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from funczero.config import KEYS, OPTIMIZER_PARAMS
from funczero.config.keys import SCHEDULER_PARAMS
from funczero.config.reference import render

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "config.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def test_docs_list_every_key_and_are_regenerated() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for path in KEYS:
        assert f"`{path}`" in text, path
    for params in OPTIMIZER_PARAMS.values():
        for name in params:
            assert f"`optimizer.params.{name}`" in text, name
    for name in SCHEDULER_PARAMS:
        assert f"`scheduler.params.{name}`" in text, name
    assert render() in text, "docs/config.md is stale: run python -m funczero.config docs/config.md"


def test_docs_show_every_default() -> None:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)`[^|]*\| ([^|]+) \|",
                                                        render(), re.M)}
    assert rows["gradient_clipping"] == "`0.0`"
    assert rows["zero_optimization.stage3_prefetch_bucket_size"] == "`5e7`"
    assert rows["fp16.initial_scale_power"] == "`16`"


def test_docs_mark_keys_without_effect_as_ignored() -> None:
    status = {m.group(1): m.group(2) for m in re.finditer(
        r"^\| `([^`]+)`[^|]*\|[^|]*\|[^|]*\| ([^|]+) \|", render(), re.M)}
    for path in ("bf16.check_grad_overflow",
                 "prescale_gradients", "gradient_predivide_factor", "fp16.auto_cast",
                 "zero_allow_untested_optimizer"):
        assert status[path] == "ignored", path
    for path in ("steps_per_print", "wall_clock_breakdown"):  # read by MetricsLogger / the step
        assert status[path] == "used", path


def test_config_doc_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [body for info, body in FENCE.findall(DOCS.read_text(encoding="utf-8"))
              if info.strip() == "python"]
    assert blocks
    monkeypatch.chdir(tmp_path)  # as tests/test_docs.py runs the other docs: files go there
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    namespace: dict[str, object] = {"__name__": "docs_config"}
    with torch.random.fork_rng():
        for i, code in enumerate(blocks, start=1):
            compiled = compile(code, f"docs/config.md (python block {i})", "exec")
            exec(compiled, namespace)  # noqa: S102
