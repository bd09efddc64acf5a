"""Bad input gets a clear error naming the file, tensor or path, and nothing on disk is lost."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tokenize
from pathlib import Path

import pytest
import torch

import funczero
from funczero import checkpoint
from funczero.checkpoint.tensorfile import TensorFile, TensorFileWriter
from funczero.testing.states import toy_state

MODEL = "model-shard-00000-of-00001.safetensors"
OPTIM = "optim-shard-00000-of-00001.safetensors"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A root with two checkpoints, '1' and latest '2'."""
    checkpoint.save(tmp_path, toy_state(step=1))
    checkpoint.save(tmp_path, toy_state(step=2, seed=1))
    return tmp_path


def _offset(path: Path, key: str) -> int:
    with TensorFile(path) as f:
        return f.data_start + f.entries[key].begin


def _edit_index(tag_dir: Path, edit) -> None:
    raw = json.loads((tag_dir / "index.json").read_text())
    edit(raw)
    (tag_dir / "index.json").write_text(json.dumps(raw))


def test_missing_directory_is_an_error_for_load_verify_and_inspect(tmp_path: Path) -> None:
    for fn in (
        lambda d: checkpoint.load(d, like=toy_state()),
        checkpoint.verify,
        checkpoint.inspect,
    ):
        with pytest.raises(checkpoint.CheckpointNotFoundError, match="does not exist"):
            fn(tmp_path / "nope")


def test_root_without_latest_is_an_error_never_a_silent_fresh_start(saved: Path) -> None:
    (saved / "latest").unlink()
    with pytest.raises(
        checkpoint.CheckpointNotFoundError, match=r"no 'latest'.*tags present: 1, 2"
    ):
        checkpoint.load(saved, like=toy_state())
    (saved / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="holds no checkpoints"):
        checkpoint.load(saved / "empty", like=toy_state())


def test_missing_tag_and_dangling_latest_are_errors(saved: Path) -> None:
    with pytest.raises(
        checkpoint.CheckpointNotFoundError, match=r"tag '7' not found: .*tags present: 1, 2"
    ):
        checkpoint.load(saved, like=toy_state(), tag="7")
    (saved / "latest").write_text("9\n")
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="latest points to tag '9'"):
        checkpoint.load(saved, like=toy_state())


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x..y", "latest", ".hidden", "-x", "a\\b", "t\n"])
def test_invalid_tags_are_refused_with_the_reason(tmp_path: Path, bad: str) -> None:
    with pytest.raises(checkpoint.InvalidTagError, match="invalid checkpoint tag"):
        checkpoint.save(tmp_path, toy_state(), tag=bad)
    assert not any(tmp_path.iterdir()) or not (tmp_path / "latest").exists()


def test_latest_naming_a_path_outside_the_root_is_refused(saved: Path) -> None:
    (saved / "latest").write_text("../../etc\n")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="does not hold a valid tag"):
        checkpoint.load(saved, like=toy_state())


def test_truncated_file_names_the_file_on_load_and_in_verify(saved: Path) -> None:
    path = saved / "2" / OPTIM
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=rf"{OPTIM}: truncated"):
        checkpoint.load(saved, like=toy_state())
    report = checkpoint.verify(saved)
    assert not report.ok
    assert any(p.where == OPTIM and "truncated" in p.message for p in report.problems)
    assert any(p.where == "opt_state/0/mu/w" for p in report.problems)
    assert checkpoint.verify(saved, tag="1").ok


def test_flipped_bytes_name_the_tensor_on_load_and_in_verify(saved: Path) -> None:
    path = saved / "2" / MODEL
    off = _offset(path, "master/w") + 5
    data = bytearray(path.read_bytes())
    data[off] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(
        checkpoint.CorruptCheckpointError, match=r"tensor master/w: .*fail their checksum"
    ):
        checkpoint.load(saved, like=toy_state())
    report = checkpoint.verify(saved)
    wheres = {p.where for p in report.problems}
    assert wheres == {"master/w", MODEL}, report.problems


def test_missing_shard_is_reported_by_name(saved: Path) -> None:
    (saved / "2" / OPTIM).unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match=rf"{OPTIM} is missing"):
        checkpoint.load(saved, like=toy_state())
    report = checkpoint.verify(saved)
    assert any(p.where == OPTIM and "missing" in p.message for p in report.problems)


def test_shard_from_another_checkpoint_is_detected(saved: Path) -> None:
    (saved / "2" / MODEL).write_bytes((saved / "1" / MODEL).read_bytes())
    with pytest.raises(checkpoint.CorruptCheckpointError, match="belongs to another checkpoint"):
        checkpoint.load(saved, like=toy_state())
    report = checkpoint.verify(saved)
    assert any(p.where == MODEL and "another checkpoint" in p.message for p in report.problems)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.pop("world_size"), "required key 'world_size' is missing"),
        (lambda raw: raw.update(format_version=99), "newer than this funczero"),
        (lambda raw: raw["tensors"]["master/w"].update(dtype="complex32"), "dtype='complex32'"),
        (
            lambda raw: raw["tensors"]["master/w"]["chunks"][0].update(stop=3),
            r"chunks cover \[0, 3\)",
        ),
        (lambda raw: raw["tensors"]["params/w"].update(alias_of="master/nothing"), "alias of"),
        (lambda raw: raw.update(stage="3"), "stage must be int"),
    ],
)
def test_malformed_index_is_refused_with_the_key(saved: Path, edit, message: str) -> None:
    _edit_index(saved / "2", edit)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=message):
        checkpoint.load(saved, like=toy_state())
    assert not checkpoint.verify(saved).ok


def test_index_that_is_not_json_is_refused(saved: Path) -> None:
    (saved / "2" / "index.json").write_text('{"format": "funczero.checkpoint", "step": NaN}')
    with pytest.raises(checkpoint.CorruptCheckpointError, match="not valid JSON"):
        checkpoint.load(saved, like=toy_state())


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", ".hidden"])
def test_file_path_in_the_index_that_escapes_the_directory_is_refused(
    saved: Path, name: str
) -> None:
    def edit(raw: dict) -> None:
        raw["files"][name] = raw["files"].pop(MODEL)
        for t in raw["tensors"].values():
            for c in t.get("chunks", []):
                if c["file"] == MODEL:
                    c["file"] = name

    _edit_index(saved / "2", edit)
    with pytest.raises(checkpoint.UnsafePathError, match="not a plain file name"):
        checkpoint.load(saved, like=toy_state())


def test_symlinked_shard_pointing_outside_the_checkpoint_is_refused(
    saved: Path, tmp_path_factory
) -> None:
    outside = tmp_path_factory.mktemp("outside") / MODEL
    outside.write_bytes((saved / "2" / MODEL).read_bytes())
    (saved / "2" / MODEL).unlink()
    (saved / "2" / MODEL).symlink_to(outside)
    with pytest.raises(checkpoint.UnsafePathError, match="outside the checkpoint directory"):
        checkpoint.load(saved, like=toy_state())


def test_state_that_does_not_match_lists_every_problem_by_path(saved: Path) -> None:
    shapes = {"emb": (5, 3), "w": (4, 5), "extra": (2,), "frozen": (3,)}  # no "b"
    like = toy_state(shapes=shapes, precision="fp32")
    with pytest.raises(checkpoint.StateMismatchError) as info:
        checkpoint.load(saved, like=like)
    e = info.value
    assert "params/extra" in e.missing and "opt_state/0/mu/extra" in e.missing
    assert "params/b" in e.unexpected and "opt_state/0/nu/b" in e.unexpected
    assert any(
        re.match(r"master/w: shape \[4, 4\] in the checkpoint, \[4, 5\]", m) for m in e.mismatched
    )
    assert "missing from the checkpoint: params/extra" in str(e)


def test_precision_and_dtype_mismatches_are_named(saved: Path) -> None:
    with pytest.raises(
        checkpoint.StateMismatchError, match="precision: the checkpoint is fp32, the state bf16"
    ):
        checkpoint.load(saved, like=toy_state(precision="bf16"))
    like = toy_state()
    like.buffers["running_mean"] = like.buffers["running_mean"].double()
    with pytest.raises(
        checkpoint.StateMismatchError,
        match="buffers/running_mean: dtype float32 in the checkpoint, torch.float64",
    ):
        checkpoint.load(saved, like=like)


def test_disk_full_during_save_keeps_previous_checkpoint_and_latest_and_removes_temp(
    saved: Path, monkeypatch
) -> None:
    before = {p: p.read_bytes() for p in (saved / "2").iterdir()}
    calls = {"n": 0}
    real = TensorFileWriter.append

    def append(self, part: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real(self, part)

    monkeypatch.setattr(TensorFileWriter, "append", append)
    with pytest.raises(
        checkpoint.SaveError,
        match="No space left on device.*previous checkpoint and 'latest' are untouched",
    ) as info:
        checkpoint.save(saved, toy_state(step=3, seed=2))
    assert isinstance(info.value.__cause__, OSError)
    assert checkpoint.latest_tag(saved) == "2"
    assert sorted(p.name for p in saved.iterdir()) == ["1", "2", "latest"]
    assert {p: p.read_bytes() for p in (saved / "2").iterdir()} == before
    assert checkpoint.verify(saved).ok
    monkeypatch.undo()
    checkpoint.save(saved, toy_state(step=3))
    assert checkpoint.latest_tag(saved) == "3"


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointExistsError, match="not a funczero checkpoint"):
        checkpoint.save(tmp_path, toy_state(step=5))
    assert (tmp_path / "5" / "notes.txt").read_text() == "mine"


def test_client_state_that_is_not_json_names_the_entry(tmp_path: Path) -> None:
    with pytest.raises(
        checkpoint.ClientStateError, match=r"client_state\['loader'\]\['pos'\] is a Tensor"
    ):
        checkpoint.save(tmp_path, toy_state(), client_state={"loader": {"pos": torch.tensor(3)}})
    with pytest.raises(checkpoint.ClientStateError, match="not finite"):
        checkpoint.save(tmp_path, toy_state(), client_state={"x": float("nan")})
    assert not (tmp_path / "latest").exists()


def _code_only(source: str) -> str:
    """``source`` without comments and string literals (docstrings may *mention* pickle)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING) and tok.type != getattr(
            tokenize, "FSTRING_MIDDLE", -1
        ):
            out.append(tok.string)
    return " ".join(out)


def test_no_pickle_in_any_load_path_of_the_package() -> None:
    root = Path(funczero.__file__).parent
    banned = re.compile(
        r"torch \. load\b|\b_?c?[pP]ickle\b|\bdill\b|weights_only = False|"
        r"\b(all_gather|gather|broadcast|scatter)_object(_list)?\b|\bbroadcast_object_list\b"
    )
    hits = [
        f"{path.relative_to(root)}: {m.group(0)}"
        for path in sorted(root.rglob("*.py"))
        for m in banned.finditer(_code_only(path.read_text(encoding="utf-8")))
    ]
    assert not hits, "pickle-based (de)serialisation found:\n" + "\n".join(hits)
    # the scan itself finds what it looks for
    assert banned.search(_code_only("import pickle\nx = torch.load(f, weights_only=False)"))
