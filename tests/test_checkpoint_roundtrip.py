"""Save and load hand-built states: every (world size, stage) to every other, tags, retention.

Saving at world size 1 needs no process group, and ``load`` communicates nothing, so one
process can load any rank's view of a checkpoint: these tests cover the resharding math
exhaustively without spawning ranks (multi-rank *saves* are in test_checkpoint_distributed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from funczero import checkpoint
from funczero.testing.states import toy_state
from funczero.tree import leaves_with_path


def assert_state_equal(got, want, *, rounded_from: torch.dtype | None = None) -> None:
    """Leaf-by-leaf bitwise equality (rng excluded), dtypes and shapes included."""
    a, b = leaves_with_path(got), leaves_with_path(want)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        if path == "rng":
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if rounded_from is not None and path == "params/frozen" and y.dtype != rounded_from:
            y = y.to(rounded_from).to(y.dtype)
        assert torch.equal(x, y), path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("src_stage", [0, 1, 2, 3])
def test_world1_checkpoint_loads_into_every_world_size_and_stage(
    tmp_path: Path, precision: str, src_stage: int
) -> None:
    saved = toy_state(stage=src_stage, precision=precision)
    checkpoint.save(tmp_path, saved)
    for stage in range(4):
        for world in (1, 2, 3, 4):
            for rank in range(world):
                like = toy_state(
                    world_size=world, rank=rank, stage=stage, precision=precision, seed=7
                )
                got, _ = checkpoint.load(tmp_path, like=like)
                want = toy_state(world_size=world, rank=rank, stage=stage, precision=precision)
                # Frozen parameters exist only in the compute dtype at stages 0-2, so a bf16
                # checkpoint of them read into a stage-3 fp32 shard is the bf16-rounded value.
                assert_state_equal(got, want, rounded_from=saved.params["frozen"].dtype)


def test_load_restores_aliasing_of_params_and_master_as_in_like(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(stage=1))
    s0, _ = checkpoint.load(tmp_path, like=toy_state(stage=0))
    assert all(s0.params[n] is s0.master[n] for n in s0.master)
    s3, _ = checkpoint.load(
        tmp_path, like=toy_state(stage=3, world_size=2, rank=1, persistent=["b"])
    )
    assert s3.params["w"] is s3.master["w"] and s3.params["b"] is not s3.master["b"]
    s1, _ = checkpoint.load(tmp_path, like=toy_state(stage=1, world_size=2))
    assert all(s1.params[n] is not s1.master[n] for n in s1.master)


def test_aliased_tensor_is_stored_once_and_recorded_in_the_index(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state(stage=0))
    index = json.loads((path / "index.json").read_text())
    assert index["tensors"]["params/w"]["alias_of"] == "master/w"
    assert "chunks" not in index["tensors"]["params/w"]
    with safe_open(path / "model-shard-00000-of-00001.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "master/w" in keys and "params/w" not in keys


def test_rng_and_client_state_round_trip_exactly_at_the_same_world_size(tmp_path: Path) -> None:
    saved = toy_state(seed=3)
    checkpoint.save(
        tmp_path, saved, client_state={"loader": {"epoch": 2, "index": [1, 2]}}, config={"lr": 0.1}
    )
    got, client = checkpoint.load(tmp_path, like=toy_state(seed=4))
    assert torch.equal(got.rng, saved.rng)
    assert client == {"loader": {"epoch": 2, "index": [1, 2]}}
    assert checkpoint.read_index(tmp_path / "3").raw["config"] == {"lr": 0.1}


def test_rng_is_rederived_deterministically_per_rank_at_a_new_world_size(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state())
    rngs = [
        checkpoint.load(tmp_path, like=toy_state(world_size=2, rank=r, stage=2))[0].rng
        for r in (0, 1)
    ]
    again = checkpoint.load(tmp_path, like=toy_state(world_size=2, rank=1, stage=2))[0].rng
    assert not torch.equal(rngs[0], rngs[1]) and torch.equal(rngs[1], again)
    torch.Generator().set_state(rngs[0])  # a valid generator state


def test_every_optimizer_state_is_matched_by_path_not_only_adam(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(optimizer="sgd"))
    got, _ = checkpoint.load(
        tmp_path, like=toy_state(optimizer="sgd", world_size=3, rank=2, stage=2, seed=1)
    )
    assert_state_equal(got, toy_state(optimizer="sgd", world_size=3, rank=2, stage=2))
    index = checkpoint.read_index(tmp_path / "3")
    assert index.tensors["opt_state/0/trace/w"].kind == "moment"


def test_leaf_paths_name_namedtuple_fields(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    tensors = checkpoint.read_index(path).tensors
    assert {"opt_state/0/count", "opt_state/0/mu/emb", "opt_state/0/nu/w", "params/emb"} <= set(
        tensors
    )


def test_model_weights_and_optimizer_state_are_in_separate_files(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    with safe_open(path / "model-shard-00000-of-00001.safetensors", "pt") as f:
        model_keys = set(f.keys())
    with safe_open(path / "optim-shard-00000-of-00001.safetensors", "pt") as f:
        optim_keys = set(f.keys())
    assert all(k.startswith(("params/", "master/", "buffers/")) for k in model_keys)
    assert any(k.startswith("opt_state/0/mu/") for k in optim_keys)
    assert not any(k.startswith(("params/", "master/")) for k in optim_keys)


def test_shard_files_are_standard_safetensors_with_chunk_ranges_in_the_index(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    path = checkpoint.save(tmp_path, toy_state())
    tensors = load_file(path / "model-shard-00000-of-00001.safetensors")
    entry = checkpoint.read_index(path).tensors["master/emb"]
    assert entry.shape == (5, 3) and [(c.start, c.stop) for c in entry.chunks] == [(0, 15)]
    assert torch.equal(tensors["master/emb"], toy_state().master["emb"].reshape(-1))


def test_tag_defaults_to_the_step_and_latest_points_to_the_newest_save(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(step=5))
    checkpoint.save(tmp_path, toy_state(step=9), tag="step-9")
    assert checkpoint.list_tags(tmp_path) == ["5", "step-9"]
    assert checkpoint.latest_tag(tmp_path) == "step-9"
    assert (tmp_path / "latest").read_text() == "step-9\n"
    got, _ = checkpoint.load(tmp_path, like=toy_state(step=0), tag="5")
    assert int(got.step) == 5


def test_keep_last_deletes_the_oldest_but_never_the_one_latest_points_to(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, toy_state(step=step), keep_last=2)
    assert checkpoint.list_tags(tmp_path) == ["2", "3"]
    checkpoint.save(tmp_path, toy_state(step=4), keep_last=1)
    assert checkpoint.list_tags(tmp_path) == ["4"] and checkpoint.latest_tag(tmp_path) == "4"
    # latest pointed back at an old tag (a rollback by hand) is protected though it is oldest
    checkpoint.save(tmp_path, toy_state(step=5))
    (tmp_path / "latest").write_text("4\n")
    checkpoint.save(tmp_path, toy_state(step=6), tag="6", keep_last=1)
    assert checkpoint.list_tags(tmp_path) == ["6"]
    from funczero.checkpoint.tags import apply_retention

    checkpoint.save(tmp_path, toy_state(step=7))
    (tmp_path / "latest").write_text("6\n")
    assert apply_retention(tmp_path, keep_last=1, protect=[]) == []
    assert checkpoint.list_tags(tmp_path) == ["6", "7"]


def test_saving_an_existing_tag_other_than_latest_replaces_it(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(step=1), tag="a")
    checkpoint.save(tmp_path, toy_state(step=2), tag="b")
    checkpoint.save(tmp_path, toy_state(step=7, seed=2), tag="a")
    got, _ = checkpoint.load(tmp_path, like=toy_state(), tag="a")
    assert int(got.step) == 7 and checkpoint.verify(tmp_path, tag="a").ok


def test_saving_over_the_tag_latest_points_to_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(step=1))
    with pytest.raises(checkpoint.CheckpointExistsError, match="latest"):
        checkpoint.save(tmp_path, toy_state(step=1, seed=5))
    assert checkpoint.verify(tmp_path).ok


def test_load_accepts_a_tag_directory_directly(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state(step=4))
    got, _ = checkpoint.load(path, like=toy_state())
    assert int(got.step) == 4


def test_inspect_reports_layout_counts_and_bytes_by_group(tmp_path: Path) -> None:
    from funczero.testing.states import SHAPES

    path = checkpoint.save(tmp_path, toy_state(stage=0, precision="bf16"))
    s = checkpoint.inspect(path)
    assert (s.step, s.world_size, s.stage, s.precision) == (3, 1, 0, "bf16")
    assert s.optimizer == "ScaleByAdamState"
    assert s.param_count == sum(torch.Size(v).numel() for v in SHAPES.values())
    assert s.bytes_by_group["master"] == 4 * (s.trainable_count)
    assert s.bytes_by_group["moments"] == 2 * 4 * s.trainable_count
    assert s.bytes_by_group["params"] == 2 * s.param_count
    assert len(s.files) == 2


def test_diff_reports_equal_for_a_reshard_and_max_differences_otherwise(tmp_path: Path) -> None:
    a = checkpoint.save(tmp_path / "a", toy_state())
    b = checkpoint.reshard(a, tmp_path / "b", world_size=3, stage=2)
    diffs = {d.path: d for d in checkpoint.diff(a, b)}
    assert all(d.status == "equal" for p, d in diffs.items() if p != "rng")
    c = checkpoint.save(tmp_path / "c", toy_state(seed=1))
    d = {d.path: d for d in checkpoint.diff(a, c)}["master/w"]
    want = (toy_state().master["w"] - toy_state(seed=1).master["w"]).abs().max()
    assert d.status == "different" and d.max_abs == pytest.approx(float(want))


def test_keep_last_ignores_a_sibling_whose_index_cannot_be_parsed(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(step=1))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    for step in (2, 3):
        checkpoint.save(tmp_path, toy_state(step=step), keep_last=1)
    assert checkpoint.list_tags(tmp_path) == ["3"] and checkpoint.latest_tag(tmp_path) == "3"
    assert (tmp_path / "odd" / "index.json").exists()  # not ours: never deleted


def test_keep_last_failing_after_the_commit_warns_and_the_save_succeeds(
    tmp_path: Path, monkeypatch
) -> None:
    from funczero.checkpoint import tags

    checkpoint.save(tmp_path, toy_state(step=1))

    def fail(path: Path) -> None:
        raise RuntimeError(f"cannot delete {path.name}")

    monkeypatch.setattr(tags, "remove_tree", fail)
    with pytest.warns(UserWarning, match="keep_last=1: .*cannot delete 1.*'2' is saved"):
        path = checkpoint.save(tmp_path, toy_state(step=2), keep_last=1)
    assert path == tmp_path / "2" and checkpoint.latest_tag(tmp_path) == "2"
    assert checkpoint.list_tags(tmp_path) == ["1", "2"] and checkpoint.verify(tmp_path).ok


def test_a_latest_that_is_a_directory_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    checkpoint.save(tmp_path, toy_state(step=1))
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "mine.txt").write_text("keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(checkpoint.CheckpointExistsError, match="latest is a directory, not the"):
        checkpoint.save(tmp_path, toy_state(step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "latest" / "mine.txt").read_text() == "keep"


def test_a_failure_to_move_latest_after_the_commit_says_what_was_committed(
    tmp_path: Path, monkeypatch
) -> None:
    from funczero.checkpoint import saving

    checkpoint.save(tmp_path, toy_state(step=1))

    def fail(root: Path, tag: str) -> None:
        raise OSError(f"cannot replace {root}/latest")

    monkeypatch.setattr(saving, "write_latest", fail)
    with pytest.raises(
        checkpoint.SaveError,
        match=r"checkpoint .*/2 is committed and complete, but 'latest' still names '1'; "
        r"load it with tag='2'",
    ):
        checkpoint.save(tmp_path, toy_state(step=2))
    assert checkpoint.latest_tag(tmp_path) == "1"
    assert checkpoint.verify(tmp_path, tag="2").ok
