"""Damaged and hostile Hugging Face checkpoints: each refused with an error naming the file (and
the tensor where there is one), before any value is read; nothing written anywhere.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from funczero import optim
from funczero.parallel.plan import build_plan
from funczero.pretrained import (
    WeightsFormatError,
    WeightsMismatchError,
    export_pretrained,
    load_pretrained,
)
from funczero.train.state import TrainState, init_state


def linear_state(stage: int = 3) -> tuple[TrainState, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    plan = build_plan(model, stage=stage)
    return init_state(plan, optim.sgd(0.1), dict(model.named_parameters()), {}), plan


def write_raw(path: Path, header: dict[str, object] | bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file by hand: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def good_header() -> dict[str, object]:
    return {
        "weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]},
    }


def test_a_hand_written_file_loads(tmp_path: Path) -> None:
    # The baseline the hostile variants below start from.
    state, plan = linear_state()
    values = torch.arange(15, dtype=torch.float32)
    write_raw(tmp_path / "model.safetensors", good_header(), values.numpy().tobytes())
    loaded = load_pretrained(state, tmp_path, plan=plan)
    assert torch.equal(loaded.master["weight"], values[:12])


@pytest.mark.parametrize(
    ("case", "header", "data", "length"),
    [
        ("header length past the end", good_header(), bytes(60), 1 << 62),
        ("header not JSON", b"{not json" + b" " * 7, bytes(60), None),
        ("data past the end", good_header(), bytes(40), None),
        ("offsets disagree with shape", {**good_header(), "bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 56]}}, bytes(60), None),
        ("overlapping tensors", {**good_header(), "bias": {"dtype": "F32", "shape": [3], "data_offsets": [36, 48]}}, bytes(60), None),
        ("unknown dtype", {**good_header(), "bias": {"dtype": "Q7", "shape": [3], "data_offsets": [48, 60]}}, bytes(60), None),
    ],
)  # fmt: skip
def test_hostile_safetensors_headers_are_refused_naming_the_file(
    tmp_path: Path, case: str, header: dict[str, object] | bytes, data: bytes, length: int | None
) -> None:
    state, plan = linear_state()
    write_raw(tmp_path / "model.safetensors", header, data, length)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(WeightsFormatError, match="model.safetensors") as info:
        load_pretrained(state, tmp_path, plan=plan)
    assert str(tmp_path) in str(info.value), case
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_truncated_shard_of_a_sharded_checkpoint_is_named(tmp_path: Path) -> None:
    state, plan = linear_state()
    save_file({"weight": torch.ones(3, 4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"bias": torch.ones(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    load_pretrained(state, tmp_path, plan=plan)  # intact: loads
    second = tmp_path / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-4])
    with pytest.raises(WeightsFormatError, match="model-00002-of-00002.safetensors"):
        load_pretrained(state, tmp_path, plan=plan)


def test_an_index_that_places_a_tensor_in_the_wrong_file_names_both(tmp_path: Path) -> None:
    state, plan = linear_state()
    save_file({"weight": torch.ones(3, 4), "bias": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"other": torch.ones(1)}, tmp_path / "b.safetensors")
    index = {"weight_map": {"weight": "a.safetensors", "bias": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsFormatError, match=r"b.safetensors has no tensor 'bias'"):
        load_pretrained(state, tmp_path, plan=plan)


def test_a_wrong_shape_names_the_tensor_both_shapes_and_the_file(tmp_path: Path) -> None:
    state, plan = linear_state(stage=0)
    save_file({"weight": torch.ones(4, 3), "bias": torch.ones(3)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(state, tmp_path, plan=plan)
    message = str(info.value)
    assert "weight: shape [4, 3]" in message and "[3, 4] in the model" in message
    assert str(tmp_path) in message


def test_export_without_a_readable_config_writes_nothing_anywhere(tmp_path: Path) -> None:
    state, plan = linear_state()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    for config in (tmp_path / "missing.json", tmp_path / "cfg"):
        with pytest.raises((FileNotFoundError, ValueError), match=str(config.name)):
            export_pretrained(state, tmp_path / "out", config_json=config, plan=plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg"]  # no out/, no temporary files
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == ["config.json"]
