"""Offline tools: consolidate (Hugging Face-style, tied weights), reshard, ``funczero ckpt``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import funczero
from funczero import checkpoint, optim
from funczero.checkpoint import reader as reader_module
from funczero.cli.app import app
from funczero.models.gpt import GPT, GPTConfig
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.testing.states import toy_state
from funczero.train.step import init_state
from funczero.tree import leaves_with_path

CFG = GPTConfig(vocab_size=61, seq_len=12, d_model=30, n_layers=2, n_heads=3, batch_norm=True)
runner = CliRunner()


def gpt_checkpoint(root: Path, *, stage: int, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Save the initial state of a tied-embedding GPT; return the module's own state_dict."""
    torch.manual_seed(0)
    model = GPT(CFG)
    model.wpe.weight.requires_grad_(False)  # frozen parameters come from params, not master
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = build_plan(model, stage=stage, precision=precision, param_persistence_threshold=40)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    checkpoint.save(root, init_state(plan, optim.adamw(1e-3), params, buffers), module=model)
    return reference


@pytest.mark.parametrize("stage", [0, 3])
def test_consolidated_gpt_with_tied_head_loads_with_strict_load_state_dict(
    tmp_path: Path, stage: int
) -> None:
    reference = gpt_checkpoint(tmp_path / "ckpt", stage=stage)
    files = checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "hf")
    assert [f.name for f in files] == ["model.safetensors"]
    state_dict = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(state_dict) == set(reference)  # head.weight (tied to wte.weight) and BN buffers too
    fresh = GPT(CFG)
    fresh.load_state_dict(state_dict, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert fresh.head.weight.data_ptr() == fresh.wte.weight.data_ptr()  # still tied after loading


def test_consolidate_with_max_shard_size_writes_hf_index_and_casts_only_floating_weights(
    tmp_path: Path,
) -> None:
    reference = gpt_checkpoint(tmp_path / "ckpt", stage=1, precision="bf16")
    files = checkpoint.consolidate(
        tmp_path / "ckpt", tmp_path / "hf", dtype="bf16", max_shard_size="10KB"
    )
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert [f.name for f in files] == shards + ["model.safetensors.index.json"]
    merged: dict[str, torch.Tensor] = {}
    for name in shards:
        merged.update(load_file(tmp_path / "hf" / name))
    assert set(merged) == set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )
    assert merged["blocks.0.fc.weight"].dtype == torch.bfloat16
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(merged["head.weight"], reference["wte.weight"].bfloat16())
    GPT(CFG).load_state_dict(merged, strict=True)


def test_consolidate_refuses_to_overwrite_existing_output(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ckpt", toy_state())
    checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(checkpoint.CheckpointExistsError, match="overwrite"):
        checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "hf")
    checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"]


def test_consolidate_writes_tied_aliases_given_to_save(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ckpt", toy_state(), aliases={"head.weight": "emb"})
    sd = load_file(checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "hf")[0])
    assert torch.equal(sd["head.weight"], sd["emb"]) and "master/emb" not in sd


@pytest.mark.parametrize("world, stage", [(4, 3), (2, 1), (3, 0)])
def test_offline_reshard_then_load_equals_direct_layout(
    tmp_path: Path, world: int, stage: int
) -> None:
    checkpoint.save(tmp_path / "src", toy_state(stage=2))
    out = checkpoint.reshard(tmp_path / "src", tmp_path / "dst", world_size=world, stage=stage)
    assert checkpoint.verify(out).ok
    index = checkpoint.read_index(out)
    assert (index.world_size, index.stage) == (world, stage)
    assert len(index.files) == 2 * world
    for rank in range(world):
        got, _ = checkpoint.load(
            tmp_path / "dst", like=toy_state(world_size=world, rank=rank, stage=stage, seed=3)
        )
        want = toy_state(world_size=world, rank=rank, stage=stage)
        for (path, x), (_, y) in zip(leaves_with_path(got), leaves_with_path(want)):
            assert path == "rng" or torch.equal(x, y), path


def test_reshard_round_trip_back_to_the_original_world_size_is_identical(tmp_path: Path) -> None:
    src = checkpoint.save(tmp_path / "a", toy_state(stage=3))
    mid = checkpoint.reshard(src, tmp_path / "b", world_size=4)
    back = checkpoint.reshard(mid, tmp_path / "c", world_size=1)
    assert all(d.status == "equal" for d in checkpoint.diff(src, back) if d.path != "rng")
    with pytest.raises(checkpoint.CheckpointExistsError):
        checkpoint.reshard(mid, tmp_path / "c", world_size=1)


def test_cli_inspect_json_and_tensors_table(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(stage=0), client_state={"loader": 1})
    res = runner.invoke(app, ["ckpt", "inspect", str(tmp_path), "--json", "--tensors"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["step"], out["world_size"], out["stage"], out["precision"]) == (3, 1, 0, "fp32")
    assert out["client_state_keys"] == ["loader"]
    assert any(t["path"] == "params/w" and t["alias_of"] == "master/w" for t in out["tensors"])
    res = runner.invoke(app, ["ckpt", "inspect", str(tmp_path), "--tensors"])
    assert res.exit_code == 0 and "opt_state/0/mu/w" in res.output and "moments" in res.output


def test_cli_verify_exit_codes_name_the_bad_file_and_tensor(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    res = runner.invoke(app, ["ckpt", "verify", str(tmp_path)])
    assert res.exit_code == 0 and "OK" in res.output
    f = path / "optim-shard-00000-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    res = runner.invoke(app, ["ckpt", "verify", str(tmp_path), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.output)
    assert not report["ok"] and {p["where"] for p in report["problems"]} == {f.name, "skipped"}
    res = runner.invoke(app, ["ckpt", "verify", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_cli_reshard_consolidate_and_diff(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "a", toy_state(stage=1))
    res = runner.invoke(
        app,
        [
            "ckpt",
            "reshard",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--world-size",
            "2",
            "--stage",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ckpt", "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    diffs = {d["path"]: d for d in json.loads(res.output)["tensors"]}
    assert res.exit_code == 1 and [p for p, d in diffs.items() if d["status"] != "equal"] == ["rng"]
    res = runner.invoke(app, ["ckpt", "diff", str(tmp_path / "a"), str(tmp_path / "a")])
    assert res.exit_code == 0 and "0 of" in res.output
    res = runner.invoke(
        app, ["ckpt", "consolidate", str(tmp_path / "b"), str(tmp_path / "hf"), "--dtype", "fp16"]
    )
    assert res.exit_code == 0, res.output
    assert load_file(tmp_path / "hf" / "model.safetensors")["w"].dtype == torch.float16
    res = runner.invoke(app, ["ckpt", "list", str(tmp_path / "b")])
    assert res.exit_code == 0 and "3  <- latest" in res.output


def test_weights_only_reads_never_open_the_optimizer_files(tmp_path: Path, monkeypatch) -> None:
    path = checkpoint.save(tmp_path, toy_state(stage=2))
    opened: list[str] = []
    real = reader_module.TensorFile.__init__

    def spy(self, p: Path, **kw) -> None:
        opened.append(p.name)
        real(self, p, **kw)

    monkeypatch.setattr(reader_module.TensorFile, "__init__", spy)
    checkpoint.consolidate(path, tmp_path / "hf")
    assert opened and all(name.startswith("model-") for name in opened)


def test_cli_usage_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ckpt", "reshard", str(tmp_path), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "funczero ckpt reshard: error: Missing option '--world-size'" in res.output
    res = runner.invoke(
        app, ["ckpt", "consolidate", str(tmp_path), str(tmp_path / "o"), "--dtype", "fp8"]
    )
    assert res.exit_code == 2 and "error:" in res.output


def test_diff_resharded_compares_what_a_reshard_preserves(tmp_path: Path) -> None:
    a = checkpoint.save(tmp_path / "a", toy_state(stage=1))
    b = checkpoint.reshard(a, tmp_path / "b", world_size=3, stage=3)
    diffs = {d.path: d.status for d in checkpoint.diff(a, b, resharded=True)}
    assert diffs.pop("rng") == "ignored" and set(diffs.values()) == {"equal"}
    same_world = checkpoint.reshard(a, tmp_path / "c", world_size=1, stage=0)
    diffs = {d.path: d.status for d in checkpoint.diff(a, same_world, resharded=True)}
    assert set(diffs.values()) == {"equal"}  # the RNG is copied, so it is compared
    c = checkpoint.save(tmp_path / "d", toy_state(stage=1, seed=1))
    diffs = {d.path: d.status for d in checkpoint.diff(a, c, resharded=True)}
    assert diffs["master/w"] == "different"
    ignored = checkpoint.diff(a, c, ignore=["opt_state/*", "master/*"])
    assert {d.status for d in ignored if d.path.startswith(("opt_state/", "master/"))} == {
        "ignored"
    }


def test_cli_diff_after_a_reshard_exits_0_with_resharded_or_ignore(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "a", toy_state())
    checkpoint.reshard(tmp_path / "a", tmp_path / "b", world_size=2)
    args = ["ckpt", "diff", str(tmp_path / "a"), str(tmp_path / "b")]
    assert runner.invoke(app, args).exit_code == 1
    res = runner.invoke(app, [*args, "--resharded"])
    assert res.exit_code == 0 and "0 of 21 tensors differ (1 ignored)" in res.output, res.output
    res = runner.invoke(app, [*args, "--ignore", "rng", "--json"])
    out = json.loads(res.output)
    assert res.exit_code == 0 and out["equal"]
    assert [t["path"] for t in out["tensors"] if t["status"] == "ignored"] == ["rng"]


def test_cli_exit_codes_tell_damaged_from_unusable_from_crashed(
    tmp_path: Path, monkeypatch
) -> None:
    import os

    checkpoint.save(tmp_path, toy_state())
    (tmp_path / "latest").unlink()
    os.mkfifo(tmp_path / "latest")
    res = runner.invoke(app, ["ckpt", "verify", str(tmp_path)])
    assert res.exit_code == 1 and "latest" in res.output and "FIFO" in res.output  # damaged
    res = runner.invoke(app, ["ckpt", "inspect", str(tmp_path), "--json"])
    assert res.exit_code == 2 and json.loads(res.output)["type"] == "CorruptCheckpointError"

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(checkpoint, "inspect", crash)
    res = runner.invoke(app, ["ckpt", "inspect", str(tmp_path / "3")])
    assert res.exit_code == 3, res.output
    assert "internal error (a bug in funczero" in res.output and "Traceback" in res.output

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "inspect", interrupt)
    res = runner.invoke(app, ["ckpt", "inspect", str(tmp_path / "3")])
    assert res.exit_code == 130 and "interrupted" in res.output


def test_cli_inspect_escapes_control_characters_from_the_index(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    raw = json.loads((path / "index.json").read_text())
    evil = "opt_state/0/\x1b]0;owned\x07\x1b[2Jcount"
    raw["tensors"][evil] = raw["tensors"].pop("opt_state/0/count")
    raw["tensors"][evil]["chunks"][0]["key"] = evil
    raw["optimizer"] = "Adam\x1b[31m\u202e"
    (path / "index.json").write_text(json.dumps(raw))
    for args in (["inspect", "--tensors"], ["verify"]):
        res = runner.invoke(app, ["ckpt", *args, str(tmp_path)])
        assert "\x1b" not in res.output and "\x07" not in res.output, args
        assert "\u202e" not in res.output
    res = runner.invoke(app, ["ckpt", "inspect", "--tensors", str(tmp_path)])
    assert res.exit_code == 0 and "opt_state/0/\\x1b]0;o" in res.output  # cut to the column
    assert "Adam\\x1b[31m\\u202e" in res.output
    res = runner.invoke(app, ["ckpt", "verify", str(tmp_path)])
    assert res.exit_code == 1 and "opt_state/0/\\x1b]0;owned\\x07\\x1b[2Jcount" in res.output


def test_ckpt_export_writes_a_directory_from_pretrained_opens(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "src")
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    run = funczero.initialize(
        model, {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
        lambda m, b: m(input_ids=b, labels=b).loss, init_from=tmp_path / "src", device="cpu",
    )  # fmt: skip
    checkpoint.save(tmp_path / "ckpt", run.state)
    result = CliRunner().invoke(
        app, ["ckpt", "export", str(tmp_path / "ckpt"), str(tmp_path / "out"),
              "--config-json", str(tmp_path / "src" / "config.json"), "--dtype", "fp32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_inspect_says_when_stage_3_shards_nothing(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "kept", toy_state(stage=3, persistent=("emb", "w", "b", "frozen")))
    checkpoint.save(tmp_path / "sharded", toy_state(stage=3))
    kept = CliRunner().invoke(app, ["ckpt", "inspect", str(tmp_path / "kept")])
    sharded = CliRunner().invoke(app, ["ckpt", "inspect", str(tmp_path / "sharded")])
    assert kept.exit_code == 0 and sharded.exit_code == 0, kept.output + sharded.output
    assert "none: all below stage3_param_persistence_threshold" in kept.output
    assert "4 parameter tensors sharded at rest" in sharded.output
    assert checkpoint.inspect(tmp_path / "sharded").sharded_params == 4
