"""funczero.config.jsonc: DeepSpeed's relaxed JSON, with bounds that keep hostile text cheap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from funczero.config import Config, ConfigError
from funczero.config.jsonc import MAX_CHARS, MAX_DIGITS, loads, strip_comments


def test_comment_markers_inside_strings_are_kept() -> None:
    text = '{"a": "http://x/*y*/ # z", "b": "\\"//", // c\n "c": [1, 2,], /* d */ }'
    assert loads(text) == {"a": "http://x/*y*/ # z", "b": '"//', "c": [1, 2]}


def test_stripping_keeps_every_line_and_column() -> None:
    text = '{\n  /* a\n  b */ "x": 1, # c\n  "y": [1,\n  ],\n}'
    out = strip_comments(text)
    assert len(out) == len(text) and out.count("\n") == text.count("\n")
    assert loads(text) == {"x": 1, "y": [1]}


def test_duplicate_keys_are_named_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 1, "stage": 2}}')
    with pytest.raises(ConfigError, match=r"duplicate key 'zero_optimization\.stage'"):
        Config.load(path, world_size=1)


def test_json_syntax_error_points_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  // fine\n  "train_batch_size": 8\n  "fp16": {}\n}')
    with pytest.raises(ConfigError, match=r"line 4, column 3") as info:
        Config.load(path, world_size=1)
    assert '"fp16": {}' in str(info.value)


def test_a_syntax_error_on_a_long_line_shows_only_its_surroundings() -> None:
    with pytest.raises(ConfigError, match="column") as info:
        loads('{"a": [' + "1, " * 5000 + "x]}")
    assert len(str(info.value)) < 400


def test_unterminated_block_comment_names_its_line() -> None:
    with pytest.raises(ConfigError, match="unterminated /\\* comment starting at line 2"):
        loads('{\n /* open\n "a": 1}')


def test_nesting_hundreds_deep_is_a_config_error() -> None:
    for text in ('{"a":' * 10_000, "[" * 10**5 + "]" * 10**5):
        with pytest.raises(ConfigError, match="nest hundreds of levels deep"):
            loads(text)


def test_integers_longer_than_the_bound_are_rejected() -> None:
    assert loads("[" + "9" * MAX_DIGITS + "]") == [int("9" * MAX_DIGITS)]
    with pytest.raises(ConfigError, match=f"an integer of {MAX_DIGITS + 1} digits"):
        loads('{"train_batch_size": -' + "1" * (MAX_DIGITS + 1) + "}")


def test_documents_longer_than_the_bound_are_rejected() -> None:
    with pytest.raises(ConfigError, match=f"{MAX_CHARS + 1} characters; a config is at most"):
        loads(" " * (MAX_CHARS + 1))


@pytest.mark.parametrize(
    "text",
    [
        "[" + "0," * (MAX_CHARS // 2 - 2) + "]",        # many tokens
        "[" + '"",' * (MAX_CHARS // 3 - 2) + "] //",    # many strings, and a comment
        "[" + '"",' * (MAX_CHARS // 3 - 2) + ",]",      # many strings, and a trailing comma
        '["' + "\\" * (MAX_CHARS // 2 - 2),           # an unterminated string of escapes
        "/*" + " " * (MAX_CHARS - 2),                   # an unterminated comment
        ",/*" * (MAX_CHARS // 3),                       # many unterminated comments
        "{" + '"a": 1, ' * (MAX_CHARS // 8 - 1) + "}",  # duplicate keys galore
        "1" * MAX_CHARS,                                # one huge number
    ],
    ids=["tokens", "strings-comment", "strings-comma", "escapes", "comment", "comments",
         "duplicates", "number"],
)
def test_hostile_text_is_rejected_quickly(text: str) -> None:
    start = time.perf_counter()
    try:
        loads(text)
    except ConfigError:
        pass
    assert time.perf_counter() - start < 1.0
