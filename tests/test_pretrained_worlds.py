"""Third-party models at every world size and stage: meta init, HF weights in, train, export.

Tiny random-config ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` are built on the meta device and
initialised by funczero at ZeRO stages 0-3 on 1, 2 and 4 gloo ranks (one spawned world per world
size, looping over the stages inside the ranks), loaded from a directory written by
``save_pretrained``, trained 2 steps, exported and reopened with ``from_pretrained``. Checked:

* the meta-device initial weights are the same bit for bit at every stage and world size;
* every rank's loaded master weights equal the checkpoint bit for bit;
* the exported model's logits equal the funczero state's exactly, and equal the one-rank run's
  to float rounding (every rank sees the same batch, so the mean gradient is the same);
* a load that fails on one rank raises on every rank (none hangs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_pretrained import (
    INIT_SEED,
    KINDS,
    STAGES,
    causal_lm_loss,
    ds_config,
    make_hf_model,
    round_trip,
    write_hf_dirs,
)

import funczero
from funczero.module import materialize, module_spec
from funczero.pretrained import load_pretrained

Reports = list[dict[str, torch.Tensor]]
WORLDS = (1, 2, 4)


def meta_round_trips(rank: int, world_size: int, root: str) -> dict[str, torch.Tensor]:
    """Every kind and stage on this world (collective), then one rank's failing load."""
    report: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        for stage in STAGES:
            out = Path(root) / f"{kind}-{stage}-w{world_size}"
            got = round_trip(kind, stage, Path(root) / kind, out, meta=True)
            report.update({f"{kind}/{stage}/{k}": v for k, v in got.items()})
    if world_size > 1:
        report["failure_agreed"] = torch.tensor(_one_rank_fails(rank, Path(root) / "gpt2"))
    return report


def _one_rank_fails(rank: int, hf_dir: Path) -> bool:
    """Rank 1's load fails (its name_map raises); every rank must raise, none may hang."""

    def name_map(key: str) -> str:
        if rank == 1:
            raise OSError("simulated read failure on rank 1")
        return key

    run = funczero.initialize(make_hf_model("gpt2", 1), ds_config(3), causal_lm_loss)
    try:
        load_pretrained(run.state, hf_dir, plan=run.plan, name_map=name_map)
    except OSError as e:
        return rank == 1 and "simulated" in str(e)
    except RuntimeError as e:
        return rank != 1 and "failed on 1 other rank" in str(e)
    return False


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_dirs(tmp_path_factory.mktemp("hf-worlds"))


@pytest.fixture(scope="module")
def world_reports(root: Path, gloo_world: Any) -> dict[int, Reports]:
    """Each world size's per-rank reports; world 1 runs in this process."""
    reports = {1: [meta_round_trips(0, 1, str(root))]}
    for world in WORLDS[1:]:
        reports[world] = gloo_world(meta_round_trips, world, str(root), timeout=420.0)
    return reports


@pytest.mark.parametrize("world", WORLDS)
def test_meta_init_gives_the_same_weights_at_every_stage_and_world_size(
    world: int, world_reports: dict[int, Reports]
) -> None:
    for kind in KINDS:
        expected = _prefixed(world_reports[1][0], f"{kind}/0/init/")
        assert len(expected) > 10
        for rank, report in enumerate(world_reports[world]):
            for stage in STAGES:
                got = _prefixed(report, f"{kind}/{stage}/init/")
                assert got.keys() == expected.keys()
                for name, value in got.items():
                    assert torch.equal(value, expected[name]), f"{kind} stage {stage} rank {rank}: {name}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_hf_round_trip_from_a_meta_model(kind: str, stage: int, world: int, world_reports: dict[int, Reports]) -> None:
    for rank, report in enumerate(world_reports[world]):
        assert bool(report[f"{kind}/{stage}/loaded_equal"]), f"rank {rank} loaded other values"
        assert int(report[f"{kind}/{stage}/loaded_count"]) > 10
    rank0 = world_reports[world][0]
    assert bool(rank0[f"{kind}/{stage}/trained"])
    assert float(rank0[f"{kind}/{stage}/logits_max_diff"]) == 0.0  # export == state, exactly
    one_rank = world_reports[1][0][f"{kind}/0/logits"]
    torch.testing.assert_close(rank0[f"{kind}/{stage}/logits"], one_rank, rtol=0, atol=1e-5)


@pytest.mark.parametrize("world", WORLDS[1:])
def test_a_failure_on_one_rank_raises_on_every_rank(world: int, world_reports: dict[int, Reports]) -> None:
    assert [bool(r["failure_agreed"]) for r in world_reports[world]] == [True] * world


def test_meta_init_of_llama_is_its_own_initialiser() -> None:
    """``_init_weights`` run on each module, as ``model.apply(model._init_weights)`` does.

    Except the tied embedding: ``apply`` initialises it twice (as ``embed_tokens``, then again
    as ``lm_head``, a Linear: no zeroed padding row); funczero creates a tied weight once.
    """
    eager = make_hf_model("llama", seed=1)
    torch.manual_seed(INIT_SEED)
    with torch.no_grad():
        eager.apply(eager._init_weights)
    expected = dict(eager.named_parameters())
    with torch.device("meta"):
        model = make_hf_model("llama", seed=1)
    torch.manual_seed(INIT_SEED)
    created = dict(materialize(model, module_spec(model)))
    tied = "model.embed_tokens.weight"
    assert set(created) == set(expected) | set(dict(eager.named_buffers()))
    for name, value in expected.items():
        if name != tied:
            assert torch.equal(created[name], value), name
    assert torch.equal(created[tied][0], torch.zeros(16))  # the padding row, as nn.Embedding's init


def test_meta_init_of_gpt2_applies_its_scaled_residual_init() -> None:
    config = transformers.GPT2Config(vocab_size=61, n_embd=64, n_layer=8, n_head=4, n_positions=32)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(INIT_SEED)
    created = dict(materialize(model, module_spec(model)))
    expected_std = config.initializer_range / (2 * config.n_layer) ** 0.5  # 0.005
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
        assert abs(float(created[name].std()) - expected_std) < 0.2 * expected_std, name


def _prefixed(report: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in report.items() if k.startswith(prefix)}
