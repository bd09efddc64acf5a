"""Format versions: version 2 shard files record their chunks; version 1 checkpoints still read;
what save refuses to write because readers would refuse to read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from funczero import checkpoint, tree
from funczero.checkpoint.chunks import parse_records
from funczero.checkpoint.format import FORMAT_VERSION
from funczero.checkpoint.tensorfile import TensorFile, TensorFileWriter
from funczero.testing.states import toy_state


def as_format_v1(tag_dir: Path) -> None:
    """Rewrite a checkpoint byte for byte as format version 1 wrote it.

    Version 1 differs only in ``format_version`` and in the shard files' ``__metadata__``,
    which lacked the chunk records (``tensors``); checked against checkpoints of the version 1
    writer when version 2 was introduced: equal but for the random ids and times.
    """
    raw = json.loads((tag_dir / "index.json").read_text())
    for name, f in raw["files"].items():
        path = tag_dir / name
        with TensorFile(path) as src:
            meta = {k: v for k, v in src.metadata.items() if k != "tensors"}
            meta["format_version"] = "1"
            entries = sorted(src.entries.items(), key=lambda kv: kv[1].begin)
            values = [src.read(k) for k, _ in entries]
        path.unlink()
        writer = TensorFileWriter(path, [(k, i.dtype, i.shape) for k, i in entries], meta)
        for v in values:
            writer.append(v)
        record = writer.finish()
        f.update(bytes=record.bytes, sha256=record.sha256)
    raw["format_version"] = 1
    (tag_dir / "index.json").write_text(json.dumps(raw, indent=1) + "\n")


def test_shard_files_record_each_chunk_as_the_index_describes_it(tmp_path: Path) -> None:
    src = checkpoint.save(tmp_path / "a", toy_state(stage=3))
    path = checkpoint.reshard(src, tmp_path / "b", world_size=3)
    index = checkpoint.read_index(path)
    assert index.format_version == FORMAT_VERSION == 2
    for name in index.files:
        with TensorFile(path / name) as f:
            records = parse_records(f.metadata)
        assert records == {c.key: (e.shape, c.start, c.stop) for e, c in index.chunks_in(name)}, (
            name
        )


@pytest.mark.parametrize("stage", [0, 3])
def test_version_1_checkpoints_load_verify_inspect_reshard_consolidate_and_diff(
    tmp_path: Path, stage: int
) -> None:
    v2 = checkpoint.save(tmp_path / "v2", toy_state(stage=stage), aliases={"head.weight": "emb"})
    v1 = checkpoint.save(tmp_path / "v1", toy_state(stage=stage), aliases={"head.weight": "emb"})
    as_format_v1(v1)
    assert checkpoint.read_index(v1).format_version == 1
    assert checkpoint.verify(v1).ok
    assert checkpoint.inspect(v1).versions["format"] == "1"
    for world, rank, to_stage in [(1, 0, stage), (2, 1, 1), (3, 2, 3)]:
        got, _ = checkpoint.load(v1, like=toy_state(world_size=world, rank=rank, stage=to_stage))
        want = toy_state(world_size=world, rank=rank, stage=to_stage)
        for (p, x), (_, y) in zip(tree.leaves_with_path(got), tree.leaves_with_path(want)):
            assert p == "rng" or torch.equal(x, y), p
    assert all(d.status == "equal" for d in checkpoint.diff(v1, v2) if d.path != "rng")
    out = checkpoint.reshard(v1, tmp_path / "w2", world_size=2)
    assert checkpoint.read_index(out).format_version == 2 and checkpoint.verify(out).ok
    assert all(d.status != "different" for d in checkpoint.diff(v1, out, resharded=True))
    hf1 = load_file(checkpoint.consolidate(v1, tmp_path / "hf1")[0])
    hf2 = load_file(checkpoint.consolidate(v2, tmp_path / "hf2")[0])
    assert hf1.keys() == hf2.keys() and all(torch.equal(hf1[k], hf2[k]) for k in hf1)


def test_version_1_checkpoints_load_in_place(tmp_path: Path) -> None:
    v1 = checkpoint.save(tmp_path, toy_state(stage=1))
    as_format_v1(v1)
    for world, rank, stage in [(1, 0, 0), (2, 1, 3)]:
        want, _ = checkpoint.load(v1, like=toy_state(world_size=world, rank=rank, stage=stage))
        like = toy_state(world_size=world, rank=rank, stage=stage, seed=5)
        got, _ = checkpoint.load(v1, like=like, donate=True)
        assert like.donated
        for (p, x), (_, y) in zip(tree.leaves_with_path(got), tree.leaves_with_path(want)):
            assert torch.equal(x, y), p


def test_a_reshaped_parameter_in_a_version_1_index_is_still_refused(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    as_format_v1(path)
    raw = json.loads((path / "index.json").read_text())
    raw["tensors"]["master/w"]["shape"] = [2, 8]
    (path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="parameter 'w' has shape"):
        checkpoint.read_index(path)


def test_a_version_2_file_without_chunk_records_is_damaged(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    v1 = checkpoint.save(tmp_path / "old", toy_state())
    as_format_v1(v1)  # files without records, under an index that says version 2
    raw = json.loads((v1 / "index.json").read_text())
    raw["format_version"] = 2
    (v1 / "index.json").write_text(json.dumps(raw))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="no __metadata__\\['tensors'\\]"):
        checkpoint.load(v1, like=toy_state())
    assert not checkpoint.verify(v1).ok and checkpoint.verify(path).ok


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_save_refuses_client_state_that_load_would_refuse(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(), client_state={"ok": _nested(60)})
    looped: dict[str, Any] = {}
    looped["self"] = looped
    for bad, message in [
        ({"x": _nested(70)}, "nested more than 64 levels"),
        (looped, "nested more than 64 levels deep \\(or contains itself\\)"),
        ({"n": 10**5000}, "integer of over 4,000 digits"),
    ]:
        with pytest.raises(checkpoint.ClientStateError, match=message):
            checkpoint.save(tmp_path, toy_state(step=4), client_state=bad)
    assert checkpoint.list_tags(tmp_path) == ["3"]
    assert checkpoint.load(tmp_path, like=toy_state())[1] == {"ok": _nested(60)}
