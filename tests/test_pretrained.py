"""Hugging Face weights in and out: load_pretrained, export_pretrained, their errors.

Tiny random-config ``LlamaForCausalLM`` (tied embeddings) and ``GPT2LMHeadModel`` are written
with ``save_pretrained`` (no downloads), loaded into funczero states at every stage on one rank,
checked bit for bit, trained, exported and opened again with ``from_pretrained``, whose logits
must equal the funczero state's. The same round trip from a meta-device model on 1, 2 and 4
gloo ranks is in ``test_pretrained_worlds.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import funczero
from funczero import checkpoint
from funczero.module import apply_module
from funczero.parallel.stages import gather_full
from funczero.pretrained import (
    WeightsFormatError,
    WeightsMismatchError,
    export_pretrained,
    load_pretrained,
)

KINDS = ("llama", "gpt2")
STAGES = (0, 1, 2, 3)
VOCAB = 61  # odd sizes, so shards need padding at world sizes 2 and 4
INIT_SEED = 11  # the global seed a meta-device model is created with


def make_hf_model(kind: str, seed: int) -> torch.nn.Module:
    """A tiny random causal LM (Llama ties its embeddings; GPT-2 always does)."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    # No dropout: every rank then computes the same gradients from the same batch, so training
    # at any world size follows the one-rank run (test_pretrained_worlds compares them).
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def causal_lm_loss(model: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, targets = batch
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def ds_config(stage: int, precision: str = "fp32") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        # Threshold 0: every parameter of these tiny models is sharded at stage 3.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def save_hf(kind: str, directory: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Save a seed-0 model with ``save_pretrained``; return its state dict."""
    model = make_hf_model(kind, seed=0)
    model.save_pretrained(directory, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def round_trip(
    kind: str, stage: int, hf_dir: Path, out_dir: Path, *, meta: bool = False
) -> dict[str, torch.Tensor]:
    """Load, check, train 2 steps, export, reopen with from_pretrained; report the results.

    Runs on every rank of the current world (collective); rank 0 opens the export. With
    ``meta`` the model is built on the meta device (seeded with :data:`INIT_SEED`) and the
    report holds the initial weights as ``init/<name>``, before the checkpoint replaces them.
    """
    reference = _reference(hf_dir)
    if meta:
        with torch.device("meta"):
            model = make_hf_model(kind, seed=1)
        torch.manual_seed(INIT_SEED)
    else:
        model = make_hf_model(kind, seed=1)
    run = funczero.initialize(model, ds_config(stage), causal_lm_loss)
    report: dict[str, torch.Tensor] = {}
    if meta:
        initial = gather_full(run.plan, run.state.master, sharded=run.plan.master_sharded)
        report.update({f"init/{n}": t.clone() for n, t in initial.items()})
    state = load_pretrained(run.state, hf_dir, plan=run.plan, donate=meta)
    master = gather_full(run.plan, state.master, sharded=run.plan.master_sharded)
    report["loaded_equal"] = torch.tensor(all(torch.equal(master[n], reference[n]) for n in master))
    report["loaded_count"] = torch.tensor(len(master))
    for _ in range(2):
        state, _metrics = run.train_step(state, batch())
    export_pretrained(state, out_dir, config_json=hf_dir, dtype="fp32", max_shard_size="8KB", plan=run.plan)
    params = gather_full(run.plan, state.params, sharded=run.plan.policy.params_at_rest == "shard")
    if run.plan.rank == 0:
        run.plan.module.eval()  # from_pretrained returns a model in eval mode (no dropout)
        ids, _ = batch(seed=4)
        ours, _ = apply_module(run.plan.module, run.plan.spec, params, state.buffers, input_ids=ids)
        exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
        report["logits"] = ours.logits.detach()
        report["logits_max_diff"] = (ours.logits - exported(input_ids=ids).logits).abs().max().detach()
        report["trained"] = torch.tensor(not torch.equal(exported.lm_head.weight, reference["lm_head.weight"]))
    return report


def _reference(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    if "lm_head.weight" not in out:  # save_pretrained writes a tied weight once
        out["lm_head.weight"] = out.get("model.embed_tokens.weight", out.get("transformer.wte.weight")).clone()
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/llama`` (sharded: index plus files) and ``<root>/gpt2`` (one file)."""
    return write_hf_dirs(tmp_path_factory.mktemp("hf"))


def write_hf_dirs(root: Path) -> Path:
    """Write ``<root>/llama`` (sharded: index plus files) and ``<root>/gpt2`` (one file)."""
    save_hf("llama", root / "llama", max_shard_size="4KB")
    save_hf("gpt2", root / "gpt2")
    return root


def test_saved_fixtures_cover_both_hugging_face_layouts(hf_dirs: Path) -> None:
    assert (hf_dirs / "llama" / "model.safetensors.index.json").is_file()
    assert len(list((hf_dirs / "llama").glob("model-*-of-*.safetensors"))) > 1
    assert (hf_dirs / "gpt2" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_one_rank_is_bit_exact(kind: str, stage: int, hf_dirs: Path, tmp_path: Path) -> None:
    report = round_trip(kind, stage, hf_dirs / kind, tmp_path / "out")
    assert bool(report["loaded_equal"]) and int(report["loaded_count"]) > 10
    assert bool(report["trained"])
    assert float(report["logits_max_diff"]) == 0.0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # 8KB shards


def test_bf16_state_gets_exact_master_and_rounded_params(hf_dirs: Path) -> None:
    reference = _reference(hf_dirs / "gpt2")
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(2, "bf16"), causal_lm_loss)
    state = load_pretrained(run.state, hf_dirs / "gpt2", plan=run.plan)
    for name, value in gather_full(run.plan, state.master, sharded=True).items():
        assert torch.equal(value, reference[name]), name
    for name, value in state.params.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[name].to(torch.bfloat16)), name


def test_load_leaves_the_input_state_untouched_and_shares_nothing(hf_dirs: Path) -> None:
    run = funczero.initialize(make_hf_model("llama", 1), ds_config(3), causal_lm_loss)
    before = {n: t.clone() for n, t in run.state.master.items()}
    state = load_pretrained(run.state, hf_dirs / "llama", plan=run.plan)
    assert all(torch.equal(run.state.master[n], before[n]) for n in before)
    old = {t.data_ptr() for t in funczero.tree.leaves(run.state) if t.numel()}
    assert not old & {t.data_ptr() for t in funczero.tree.leaves(state) if t.numel()}
    # Stage 3 fp32: the parameter shard is the master shard, in the new state as in the old.
    assert all(state.params[n] is state.master[n] for n in state.master)
    assert all(run.state.params[n] is run.state.master[n] for n in state.master)
    state, _ = run.train_step(state, batch())  # donating the new state leaves the old intact
    assert all(torch.equal(run.state.master[n], before[n]) for n in before)


def test_donated_load_writes_in_place_and_invalidates_the_input(hf_dirs: Path) -> None:
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(1), causal_lm_loss)
    master = dict(run.state.master)
    state = load_pretrained(run.state, hf_dirs / "gpt2", plan=run.plan, donate=True)
    assert all(state.master[n] is master[n] for n in master)
    expected = _reference(hf_dirs / "gpt2")["transformer.wte.weight"]
    assert torch.equal(state.master["transformer.wte.weight"], expected.reshape(-1))  # a 1-rank shard
    with pytest.raises(funczero.DonatedStateError):
        _ = run.state.params


def test_missing_unexpected_and_wrong_shape_keys_are_one_error(hf_dirs: Path, tmp_path: Path) -> None:
    tensors = load_file(hf_dirs / "gpt2" / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    del tensors["transformer.ln_f.weight"]
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)
    tensors["transformer.wpe.weight"] = torch.zeros(16, 16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(0), causal_lm_loss)
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(run.state, tmp_path, plan=run.plan)
    e = info.value
    assert e.missing == ["transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight"]
    assert e.unexpected == ["transformer.h.0.extra.weight"]
    assert len(e.mismatched) == 1 and "transformer.wpe.weight: shape [16, 16]" in e.mismatched[0]
    assert "[32, 16] in the model" in str(e) and "4 problems" in str(e)


def test_non_strict_keeps_missing_initial_values_but_never_accepts_wrong_shapes(
    hf_dirs: Path, tmp_path: Path
) -> None:
    tensors = load_file(hf_dirs / "gpt2" / "model.safetensors")
    del tensors["transformer.ln_f.weight"]
    tensors["unrelated.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(2), causal_lm_loss)
    initial = gather_full(run.plan, run.state.master, sharded=True)["transformer.ln_f.weight"]
    state = load_pretrained(run.state, tmp_path, plan=run.plan, strict=False)
    master = gather_full(run.plan, state.master, sharded=True)
    assert torch.equal(master["transformer.ln_f.weight"], initial)
    assert torch.equal(master["transformer.wte.weight"], tensors["transformer.wte.weight"])
    tensors["transformer.wte.weight"] = torch.zeros(VOCAB + 1, 16)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match="transformer.wte.weight: shape"):
        load_pretrained(run.state, tmp_path, plan=run.plan, strict=False)


def test_prefix_is_detected_and_name_map_drops_keys(hf_dirs: Path, tmp_path: Path) -> None:
    # A bare LlamaModel sees the causal LM checkpoint's "model." prefix; lm_head is extra.
    reference = _reference(hf_dirs / "llama")  # with lm_head.weight, as an untied save has it
    save_file(reference, tmp_path / "model.safetensors")
    body = make_hf_model("llama", 1).model
    run = funczero.initialize(body, ds_config(3), lambda m, b: m(input_ids=b[0]).last_hidden_state.sum())
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(run.state, tmp_path, plan=run.plan)
    assert info.value.unexpected == ["lm_head.weight"] and not info.value.missing
    assert "strip 'model.'" in str(info.value)
    state = load_pretrained(run.state, tmp_path, plan=run.plan, name_map={"lm_head.weight": None})
    master = gather_full(run.plan, state.master, sharded=True)
    assert torch.equal(master["embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert torch.equal(master["norm.weight"], reference["model.norm.weight"])
    with pytest.raises(WeightsMismatchError) as info:  # prefix="" turns detection off
        load_pretrained(run.state, tmp_path, plan=run.plan, prefix="")
    assert "embed_tokens.weight" in info.value.missing


def test_tied_weight_stored_twice_must_agree(hf_dirs: Path, tmp_path: Path) -> None:
    tensors = load_file(hf_dirs / "gpt2" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(3), causal_lm_loss)
    load_pretrained(run.state, tmp_path, plan=run.plan)  # equal copies: fine
    tensors["lm_head.weight"][3, 4] += 1.0
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match="untied checkpoint"):
        load_pretrained(run.state, tmp_path, plan=run.plan)


def test_loads_a_funczero_checkpoint_and_its_consolidated_output(hf_dirs: Path, tmp_path: Path) -> None:
    run = funczero.initialize(make_hf_model("llama", 1), ds_config(3), causal_lm_loss)
    trained, _ = run.train_step(load_pretrained(run.state, hf_dirs / "llama", plan=run.plan), batch())
    expected = gather_full(run.plan, trained.master, sharded=True)
    checkpoint.save(tmp_path / "ckpt", trained)
    checkpoint.consolidate(tmp_path / "ckpt", tmp_path / "consolidated")
    fresh = funczero.initialize(make_hf_model("llama", 2), ds_config(0), causal_lm_loss)
    for source in (tmp_path / "ckpt", tmp_path / "consolidated"):
        state = load_pretrained(fresh.state, source, plan=fresh.plan)
        assert all(torch.equal(state.master[n], expected[n]) for n in expected), source
        assert int(state.step) == 0  # weights only: the optimizer state stays as initialised


def test_paths_that_are_not_weights_get_clear_errors(hf_dirs: Path, tmp_path: Path) -> None:
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(0), causal_lm_loss)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(run.state, tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hi")
    with pytest.raises(WeightsFormatError, match="neither a Hugging Face .* nor a funczero checkpoint"):
        load_pretrained(run.state, tmp_path / "notes")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsFormatError, match="never unpickles"):
        load_pretrained(run.state, tmp_path / "pickled")
    (tmp_path / "cut").mkdir()
    data = (hf_dirs / "gpt2" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsFormatError, match="model.safetensors is not a readable safetensors"):
        load_pretrained(run.state, tmp_path / "cut")
    (tmp_path / "escape").mkdir()
    index = {"weight_map": {"transformer.wte.weight": "../gpt2/model.safetensors"}}
    (tmp_path / "escape" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsFormatError, match="not a plain file name"):
        load_pretrained(run.state, tmp_path / "escape")


def test_a_damaged_funczero_checkpoint_is_refused(hf_dirs: Path, tmp_path: Path) -> None:
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(0), causal_lm_loss)
    checkpoint.save(tmp_path / "ckpt", run.state)
    shard = next((tmp_path / "ckpt" / "0").glob("model-shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor's values
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="checksum"):
        load_pretrained(run.state, tmp_path / "ckpt", plan=run.plan)


def test_export_refuses_to_overwrite_and_needs_a_config_it_can_read(hf_dirs: Path, tmp_path: Path) -> None:
    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(2), causal_lm_loss)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        export_pretrained(run.state, tmp_path / "out", config_json=tmp_path, plan=run.plan)
    assert not (tmp_path / "out").exists()  # nothing written
    export_pretrained(run.state, tmp_path / "out", config_json=hf_dirs / "gpt2", dtype="fp32", max_shard_size="8KB", plan=run.plan)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with pytest.raises(checkpoint.CheckpointExistsError, match="overwrite=True"):
        export_pretrained(run.state, tmp_path / "out", plan=run.plan)
    files = export_pretrained(run.state, tmp_path / "out", config_json=hf_dirs / "gpt2", plan=run.plan, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]  # no stale shards
    assert files[0].name == "model.safetensors"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["lm_head.weight"].dtype == torch.bfloat16  # the tie written under both names
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


def test_export_from_a_checkpoint_directory_opens_with_from_pretrained(hf_dirs: Path, tmp_path: Path) -> None:
    run = funczero.initialize(make_hf_model("llama", 1), ds_config(1), causal_lm_loss)
    state = load_pretrained(run.state, hf_dirs / "llama", plan=run.plan)
    checkpoint.save(tmp_path / "ckpt", state, module=run.plan.module)
    export_pretrained(tmp_path / "ckpt", tmp_path / "out", config_json=hf_dirs / "llama", dtype="fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = _reference(hf_dirs / "llama")
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_fine_tuning_doc_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    blocks = [b for info, b in re.findall(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.MULTILINE | re.DOTALL) if info.strip() == "python"]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    namespace: dict[str, object] = {"__name__": "docs_fine_tuning"}
    for i, code in enumerate(blocks, start=1):
        exec(compile(code, f"docs/fine-tuning.md (python block {i})", "exec"), namespace)  # noqa: S102


def test_finetune_example_trains_and_exports_a_tiny_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_hf.py"
    spec = importlib.util.spec_from_file_location("finetune_hf", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "zero_optimization": {"stage": 2},
    }))  # fmt: skip
    out = example.main([
        "--model", str(tmp_path / "tiny"), "--make-tiny", "--config", str(config),
        "--steps", "3", "--seq-len", "16", "--log-every", "1", "--dtype", "fp32",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "loaded 0." in printed and "step    2 | loss" in printed
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = load_file(tmp_path / "tiny" / "model.safetensors")
    assert not torch.equal(tuned.model.norm.weight, base["model.norm.weight"])  # it trained


class _Net(torch.nn.Module):
    """A linear layer with a frozen bias and a BatchNorm (persistent and non-persistent buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 3)
        self.fc.bias.requires_grad_(False)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def test_frozen_parameters_and_persistent_buffers_load_and_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _Net()
    source.norm.running_mean.uniform_()
    save_file(dict(source.state_dict()), tmp_path / "model.safetensors")
    plan_model = _Net()
    from funczero import optim
    from funczero.parallel.plan import build_plan
    from funczero.train.state import init_state

    plan = build_plan(plan_model, stage=2, precision="bf16")
    params = dict(plan_model.named_parameters())
    state = init_state(plan, optim.sgd(0.1), params, dict(plan_model.named_buffers()))
    loaded = load_pretrained(state, tmp_path, plan=plan)
    assert torch.equal(loaded.params["fc.bias"], source.fc.bias.detach().to(torch.bfloat16))  # frozen: no master
    assert "fc.bias" not in loaded.master
    assert torch.equal(loaded.buffers["norm.running_mean"], source.norm.running_mean)
    export_pretrained(loaded, tmp_path / "out", dtype="fp32", plan=plan)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert "scratch" not in exported and "norm.num_batches_tracked" in exported  # as state_dict() has them
    assert torch.equal(exported["fc.weight"], source.fc.weight.detach())  # from the fp32 master
    del exported["norm.running_mean"]
    save_file(exported, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(state, tmp_path, plan=plan)
    assert info.value.missing == ["norm.running_mean"]


def test_a_prefix_the_model_has_and_the_checkpoint_lacks_is_added() -> None:
    from funczero.pretrained.names import match_names
    from funczero.pretrained.sources import SourceTensor

    f32 = SourceTensor((2,), torch.float32)
    shapes = {"lm.model.w": (2,), "lm.head.w": (2,)}
    match = match_names({"model.w": f32, "head.w": f32}, shapes=shapes)
    assert match.rename == "add 'lm.'" and match.params == {"lm.model.w": "model.w", "lm.head.w": "head.w"}
    exact = match_names({"model.w": f32, "head.w": f32}, shapes=shapes, prefix="")
    assert exact.missing == ["lm.model.w", "lm.head.w"] and exact.unexpected == ["model.w", "head.w"]
    renamed = match_names({"a": f32, "b": f32}, shapes=shapes, name_map=lambda k: {"a": "lm.model.w"}.get(k))
    assert renamed.params == {"lm.model.w": "a"} and renamed.missing == ["lm.head.w"] and not renamed.unexpected
