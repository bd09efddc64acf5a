"""Regional compilation inside the functional step (funczero.parallel.compile).

Each unit's forward is compiled once per unit type: 2 identical blocks share one graph, and a
second and third step compile nothing new. Losses match the eager step: ``aot_eager`` runs the
same ATen ops as eager (tolerance 1e-6 for fp32 on CPU); inductor fuses and reorders
floating-point arithmetic (tolerance 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import funczero
from funczero import optim
from funczero.models.gpt import cross_entropy_loss
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.compile import CompileOptions, compile_unit_forwards, resolve_compile
from funczero.parallel.plan import build_plan
from funczero.train.step import init_state, make_train_step

from conftest import make_tiny_batch, make_tiny_gpt

STEPS = 3


def _train(stage: int, compile: Any, *, remat: bool = False, precision: str = "fp32",
           world_size: int | None = None) -> tuple[list[float], torch.Tensor]:  # fmt: skip
    model = make_tiny_gpt()
    plan = build_plan(model, stage=stage, precision=precision, remat=remat, world_size=world_size)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-2)
    state = init_state(plan, opt, params, buffers)
    step = make_train_step(cross_entropy_loss, opt, plan, compile=compile)
    batch = make_tiny_batch(seed=1 + plan.rank)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, torch.cat([v.flatten() for v in state.master.values()])


def _fresh_counts() -> None:
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _recompiles() -> int:
    return int(sum(counters["recompiles"].values()))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_compiled_step_has_one_graph_per_block_type_and_matches_eager(stage: int) -> None:
    eager, eager_master = _train(stage, None)
    _fresh_counts()
    compiled, compiled_master = _train(stage, CompileOptions(backend="aot_eager"))
    assert _graphs() == 1, dict(counters["stats"])  # 2 blocks, one type, one graph
    assert _recompiles() == 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled_master, eager_master, rtol=0, atol=1e-6)


def test_compiled_step_with_activation_checkpointing_matches_eager() -> None:
    eager, _ = _train(3, None, remat=True)
    _fresh_counts()
    compiled, _ = _train(3, CompileOptions(backend="aot_eager"), remat=True)
    assert _recompiles() == 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_inductor_compiled_stage3_bf16_step_compiles_once_and_tracks_eager() -> None:
    eager, _ = _train(3, None, precision="bf16")
    _fresh_counts()
    compiled, _ = _train(3, True, precision="bf16")
    assert _graphs() == 1 and _recompiles() == 0, dict(counters["stats"])
    # bf16 compute: inductor keeps some intermediates in fp32 where eager rounds to bf16.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-2)


def _compiled_and_eager_world(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for stage in (0, 3):
        _fresh_counts()
        losses, master = _train(stage, CompileOptions(backend="aot_eager"))
        out[f"z{stage}/compiled/losses"], out[f"z{stage}/compiled/master"] = torch.tensor(losses), master
        out[f"z{stage}/graphs"] = torch.tensor(_graphs())
        out[f"z{stage}/recompiles"] = torch.tensor(_recompiles())
        losses, master = _train(stage, None)
        out[f"z{stage}/eager/losses"], out[f"z{stage}/eager/master"] = torch.tensor(losses), master
    return out


def test_compiled_step_on_2_ranks_matches_eager_without_recompiles(gloo_world: Any) -> None:
    for report in gloo_world(_compiled_and_eager_world, 2):
        for stage in (0, 3):
            assert int(report[f"z{stage}/graphs"]) == 1 and int(report[f"z{stage}/recompiles"]) == 0
            for what in ("losses", "master"):
                torch.testing.assert_close(
                    report[f"z{stage}/compiled/{what}"], report[f"z{stage}/eager/{what}"], rtol=0, atol=1e-6
                )


def test_compile_unit_forwards_shares_one_compiled_function_per_class() -> None:
    model = make_tiny_gpt()
    fwd = compile_unit_forwards(model, ("blocks.0", "blocks.1"), CompileOptions(backend="eager"))
    assert fwd["blocks.0"].func is fwd["blocks.1"].func  # type: ignore[attr-defined]
    assert compile_unit_forwards(model, ("blocks.0",), None) == {}


def test_compile_options_from_deepspeed_block() -> None:
    opts = CompileOptions.from_config(
        {"enabled": True, "backend": "aot_eager", "kwargs": {"fullgraph": True, "dynamic": False}}
    )
    assert opts == CompileOptions(backend="aot_eager", fullgraph=True, dynamic=False)
    assert CompileOptions.from_config({"enabled": False, "backend": "inductor"}) is None
    assert resolve_compile(True) == CompileOptions()
    assert resolve_compile(False) is None


def test_compile_options_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="backend='inductr' is not a torch.compile backend"):
        CompileOptions(backend="inductr")
    with pytest.raises(ValueError, match=r"compile.kwargs has \['fulgraph'\]"):
        CompileOptions.from_config({"enabled": True, "kwargs": {"fulgraph": True}})
    with pytest.raises(ValueError, match="both given"):
        CompileOptions(mode="max-autotune", options={"triton.cudagraphs": False})
    with pytest.raises(TypeError, match="must be a bool or a CompileOptions"):
        resolve_compile("inductor")  # type: ignore[arg-type]


def test_deepspeed_compile_block_turns_on_regional_compilation(tmp_path: Path) -> None:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "compile": {"enabled": True, "backend": "aot_eager"},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    _fresh_counts()
    run = funczero.initialize(make_tiny_gpt(), str(path), cross_entropy_loss)
    state = run.state
    for _ in range(2):
        state, _ = run.train_step(state, make_tiny_batch())
    assert _graphs() == 1 and _recompiles() == 0


def test_compiling_a_model_with_a_kv_cache_in_training_warns() -> None:
    model = make_tiny_gpt()
    model.config = type("Config", (), {"use_cache": True})()  # what a Hugging Face model has
    with pytest.warns(UserWarning, match="use_cache = False"):
        compile_unit_forwards(model, ("blocks.0",), CompileOptions(backend="eager"))
