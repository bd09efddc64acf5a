"""The Python blocks of the user docs (every ``docs/**/*.md`` and the README) run as written.

Every fenced block whose info string is exactly ``python`` is executed, in order, in one
namespace per document (later blocks may use earlier ones' names), on one process, in an empty
working directory. A Python block that cannot run here says so in its info string, with the
reason: ``python notest: needs 2 GPUs``, ``python notest: DeepSpeed's API, for comparison``.
Any other Python info string (``py``, ``python3``, ``python deepspeed``, ``python notest`` with
no reason) is an error, so a block is never skipped silently. Fences may be indented (inside a
list item); their bodies are dedented.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("**/*.md")) + [ROOT / "README.md"]

OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
PYTHON_WORDS = {"python", "py", "python3"}
NOT_RUN = re.compile(r"^python notest: \S.*$")


@dataclass(frozen=True)
class Block:
    info: str
    code: str
    line: int  # 1-based line of the opening fence


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block (CommonMark backtick or tilde fences, possibly indented)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [ln[indent:] if not ln[:indent].strip() else ln for ln in lines[i + 1 : end]]
        code = textwrap.dedent("\n".join(body) + "\n")
        blocks.append(Block(opening["info"].strip(), code, i + 1))
        i = end + 1
    return blocks


def is_python(info: str) -> bool:
    return info.split(maxsplit=1)[0].lower() in PYTHON_WORDS if info else False


def runnable(doc: Path) -> list[Block]:
    return [b for b in fenced_blocks(doc.read_text(encoding="utf-8")) if b.info == "python"]


def rel(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def test_block_extraction_runs_only_plain_python_fences() -> None:
    text = (
        "```python\na = 1\n```\n"
        "```python notest: needs 2 GPUs\nb = 2\n```\n"
        "```bash\nls\n```\n"
        "* a list item:\n\n  ```python\n  if a:\n      c = 3\n  ```\n"
        "~~~~python\nd = '```'\n~~~~\n"
    )
    blocks = fenced_blocks(text)
    assert [b.info for b in blocks] == ["python", "python notest: needs 2 GPUs", "bash", "python",
                                        "python"]
    assert [b.code for b in blocks if b.info == "python"] == [
        "a = 1\n", "if a:\n    c = 3\n", "d = '```'\n"
    ]
    assert [b.line for b in blocks] == [1, 4, 7, 12, 16]


def test_docs_with_runnable_blocks_are_found() -> None:
    found = {rel(doc) for doc in DOCS if runnable(doc)}
    assert {"README.md", "docs/getting-started.md", "docs/migrating-from-deepspeed.md"} <= found


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_python_block_runs_or_says_why_not(doc: Path) -> None:
    unclear = [
        f"{rel(doc)}:{b.line}: ```{b.info}"
        for b in fenced_blocks(doc.read_text(encoding="utf-8"))
        if is_python(b.info) and b.info != "python" and not NOT_RUN.match(b.info)
    ]
    assert not unclear, (
        "Python blocks must be ```python (run by this test) or ```python notest: <why it cannot "
        "run here>; fix: " + "; ".join(unclear)
    )


@pytest.mark.parametrize("doc", [doc for doc in DOCS if runnable(doc)], ids=rel)
def test_doc_python_blocks_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)  # the blocks describe a one-process run
    namespace: dict[str, object] = {"__name__": "docs_" + re.sub(r"\W", "_", rel(doc))}
    threads = torch.get_num_threads()
    # One thread: on a shared CI machine more threads than free cores run several times slower.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            for block in runnable(doc):
                # Leading blank lines keep the traceback's line numbers those of the Markdown file.
                code = "\n" * block.line + block.code
                exec(compile(code, rel(doc), "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)


def _commands() -> dict[str, list[str]]:
    """``funczero``'s sub-commands, each with its own sub-commands (empty for a leaf)."""
    import typer

    from funczero.cli.app import app

    root = typer.main.get_command(app)  # a click group (typer may vendor its own click)
    return {name: sorted(getattr(cmd, "commands", {})) for name, cmd in root.commands.items()}


def test_cli_doc_and_readme_name_every_command() -> None:
    cli_doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = _commands()
    assert {"launch", "ckpt"} <= set(commands)
    missing = [
        f"docs/cli.md: funczero {name}" for name in commands if f"`funczero {name}" not in cli_doc
    ]
    missing += [
        f"docs/cli.md: funczero {name} {sub}"
        for name, subs in commands.items()
        for sub in subs
        if not re.search(rf"funczero {name} +{sub}\b|`funczero {name} [^`]*\b{sub}\b", cli_doc)
    ]
    missing += [f"README.md: funczero {name}" for name in commands if f"`{name}`" not in readme]
    assert not missing, "commands the docs do not list: " + ", ".join(missing)


def test_getting_started_documents_every_initialize_argument_and_field() -> None:
    import inspect

    import funczero

    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    section = text[text.index("## `initialize()` in full") :]
    names = list(inspect.signature(funczero.initialize).parameters)
    rows = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert [n for n in names if n not in rows] == [], "initialize() arguments without a row"
    assert [f for f in funczero.Initialized._fields if f not in rows] == [], "fields without a row"
    signature = re.sub(r"\s+", " ", section[section.index("funczero.initialize(") :])
    assert all(f"{n}" in signature[: signature.index("->")] for n in names)


def test_readme_lists_every_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = [rel(doc) for doc in DOCS if doc.parent == ROOT / "docs"]
    unlisted = [doc for doc in docs if f"`{doc}`" not in readme]
    assert not unlisted, f"README's Documentation section does not list {unlisted}"
