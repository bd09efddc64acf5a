"""funczero estimate: the meta-device estimate equals memory_breakdown on real states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from funczero.cli.app import app
from funczero.cli.estimate import ModelFacts, estimate_stage, load_model, model_facts
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.testing.distributed import run_distributed

CFG = GPTConfig(vocab_size=37, seq_len=16, d_model=24, n_layers=2, n_heads=2)


def tiny_gpt() -> GPT:
    """The factory the CLI tests name as tests.test_cli_estimate:tiny_gpt."""
    return GPT(CFG)


def measured(stage: int, precision: str, grad_accum: int = 1, threshold: int = 100_000
             ) -> dict[str, int]:
    """memory_breakdown of a real state after one step (this process's world size)."""
    import funczero
    from funczero.train.memory import memory_breakdown

    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": grad_accum,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage,
                                    "stage3_param_persistence_threshold": threshold}}
    if precision != "fp32":
        config[precision] = {"enabled": True}
    run = funczero.initialize(GPT(CFG), config, cross_entropy_loss)
    ids = torch.randint(0, CFG.vocab_size, (2 * grad_accum, CFG.seq_len))
    state, _ = run.train_step(run.state, (ids, ids))
    return memory_breakdown(state, run.plan, grad_accum=grad_accum)


def check(stage: int, precision: str, world_size: int, grad_accum: int = 1,
          threshold: int = 100_000) -> None:
    real = measured(stage, precision, grad_accum, threshold)
    facts = model_facts(GPT(CFG, device="meta"))
    est = estimate_stage(facts, stage=stage, world_size=world_size, precision=precision,
                         grad_accum=grad_accum, persistence_threshold=threshold)
    where = f"stage {stage} {precision} world {world_size} accum {grad_accum} threshold {threshold}"
    for key in ("params", "grads", "master", "opt_state", "buffers"):
        assert getattr(est, key) == real[key], f"{where}: {key} {getattr(est, key)} != {real[key]}"
    assert real["other"] < 16 * 1024  # step, loss scale, RNG: not estimated


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_matches_memory_breakdown_on_one_rank(stage: int, precision: str) -> None:
    check(stage, precision, 1)


def test_estimate_matches_memory_breakdown_with_accumulation_and_persistence() -> None:
    check(1, "bf16", 1, grad_accum=2)
    check(3, "bf16", 1, threshold=1000)  # the small parameters stay replicated


def _ranks(rank: int, world_size: int) -> None:
    check(1, "bf16", world_size)  # reduced in backward: the same program as stage 2
    check(1, "bf16", world_size, grad_accum=2)  # the full accumulator stays until the update
    check(3, "bf16", world_size, threshold=1000)  # sharded and persistent parameters


@pytest.mark.slow
def test_estimate_matches_memory_breakdown_on_two_ranks() -> None:
    run_distributed(_ranks, 2, timeout=180.0)


def test_model_states_approach_deepspeeds_figures_for_a_large_model() -> None:
    # 1B parameters in 100 tensors: padding is negligible, so funczero's and DeepSpeed's
    # formulas differ only where docs/zero.md says they do.
    facts = ModelFacts(trainable=(10_000_000,) * 100, frozen=(), buffer_bytes=0,
                       largest_layer=10_000_000)
    psi = 1e9
    for w in (1, 8, 64):
        s3 = estimate_stage(facts, stage=3, world_size=w, persistence_threshold=0)
        assert s3.deepspeed == 16 * psi / w
        assert s3.total == pytest.approx(16 * psi / w, rel=1e-6)  # the same 16Ψ/N
    s2 = estimate_stage(facts, stage=2, world_size=8)
    assert s2.deepspeed == 2 * psi + 14 * psi / 8  # fp16 gradient shards, 2 bytes
    assert s2.total == pytest.approx(2 * psi + 16 * psi / 8, rel=1e-6)  # fp32 gradient shards
    s0 = estimate_stage(facts, stage=0, world_size=8)
    assert s0.deepspeed == 16 * psi and s0.total == pytest.approx(18 * psi, rel=1e-6)


def test_activations_shrink_with_checkpointing() -> None:
    facts = model_facts(GPT(CFG, device="meta"), micro_batch=4, seq_len=CFG.seq_len)
    assert facts.activations is not None and facts.activations_checkpointed is not None
    assert 0 < facts.activations_checkpointed < facts.activations
    longer = model_facts(GPT(CFG, device="meta"), micro_batch=8, seq_len=CFG.seq_len)
    assert longer.activations == pytest.approx(2 * facts.activations, rel=0.02)


def test_cli_table_and_json() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "tests.test_cli_estimate:tiny_gpt", "-w", "1,2",
                                 "-s", "2,3", "--seq-len", "16", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["trainable_params"] == sum(p.numel() for p in GPT(CFG).parameters())
    assert [(r["world_size"], r["stage"]) for r in out["rows"]] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    result = runner.invoke(app, ["estimate", "tests.test_cli_estimate:tiny_gpt", "--nodes", "1,2",
                                 "--gpus-per-node", "4", "-s", "3"])
    assert result.exit_code == 0, result.output
    assert "8 (2x4)" in result.output and "DeepSpeed" in result.output


def test_cli_errors_name_the_problem() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "no_such_module_xyz:fn"])
    assert result.exit_code == 2 and "no_such_module_xyz" in result.output
    result = runner.invoke(app, ["estimate", "tests.test_cli_estimate:tiny_gpt", "-s", "5"])
    assert result.exit_code == 2 and "stage=5 must be 0, 1, 2 or 3" in result.output
    with pytest.raises(ValueError, match="not both"):
        load_model("a:b", "c.json")


def test_hf_config_is_built_on_meta(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    config.save_pretrained(tmp_path)
    model = load_model(hf_config=str(tmp_path / "config.json"))
    assert next(model.parameters()).device.type == "meta"
    facts = model_facts(model, seq_len=16)
    assert facts.n_trainable == sum(p.numel() for p in model.parameters())
    assert facts.activations_checkpointed is not None and facts.activations is not None


def test_hybrid_sharding_holds_per_rank_what_a_world_of_its_shard_size_holds() -> None:
    facts = model_facts(GPT(CFG))
    for stage in (1, 2, 3):
        hybrid = estimate_stage(facts, stage=stage, world_size=8, shard_size=2, persistence_threshold=0)
        flat = estimate_stage(facts, stage=stage, world_size=2, persistence_threshold=0)
        assert hybrid.world_size == 8
        assert (hybrid.params, hybrid.grads, hybrid.master, hybrid.opt_state) == (
            flat.params, flat.grads, flat.master, flat.opt_state)
    # Stage 0 replicates everything: a shard size changes nothing.
    assert estimate_stage(facts, stage=0, world_size=8, shard_size=2).total == estimate_stage(
        facts, stage=0, world_size=8).total
    result = CliRunner().invoke(app, ["estimate", "tests.test_cli_estimate:tiny_gpt", "-w", "8",
                                      "-s", "3", "--shard-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="shard_size=0 must be >= 1"):
        estimate_stage(facts, stage=3, world_size=8, shard_size=0)


def test_an_hf_config_path_that_is_no_config_is_a_clean_error(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = CliRunner().invoke(app, ["estimate", "--hf-config", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "missing.json" in result.output
