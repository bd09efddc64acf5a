"""The Python snippets of the user docs run as written.

Every fenced block whose info string is exactly ``python`` is executed, in order, in one
namespace per document (later blocks may use earlier ones' names), on one process. Blocks that
show other code (DeepSpeed's API, shell commands) use another info string, such as
``python deepspeed`` or ``bash``, and are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["getting-started.md", "concepts.md", "zero.md", "migrating-from-deepspeed.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks tagged exactly ``python``."""
    return [body for info, body in FENCE.findall(text) if info.strip() == "python"]


def test_block_extraction_runs_only_plain_python_fences() -> None:
    text = "```python\na = 1\n```\n```python deepspeed\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == ["a = 1\n"]


@pytest.mark.parametrize("doc", DOCS)
def test_doc_python_snippets_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks((ROOT / "docs" / doc).read_text(encoding="utf-8"))
    assert blocks, f"docs/{doc} has no python snippets"
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)  # the snippets describe a one-process run
    namespace: dict[str, object] = {"__name__": f"docs_{doc.replace('-', '_')}"}
    with torch.random.fork_rng():
        for i, code in enumerate(blocks, start=1):
            exec(compile(code, f"docs/{doc} (python block {i})", "exec"), namespace)  # noqa: S102
