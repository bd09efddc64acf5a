"""funczero.module: binding tensors to a module, and creating a meta-device model's weights.

Reference for sharded initialisation: the same model built on the CPU and initialised in one
process with the same seed; every stage and world size must reproduce it bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import funczero
from funczero import optim
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.module import ModuleBinding, is_meta, materialize, module_spec, tensor_slots
from funczero.parallel.plan import build_plan
from funczero.parallel.stages import gather_full
from funczero.testing.distributed import run_distributed

CFG = GPTConfig(vocab_size=40, seq_len=8, d_model=16, n_layers=3, n_heads=2, batch_norm=True)


def reference_weights(cfg: GPTConfig = CFG, seed: int = 7) -> dict[str, torch.Tensor]:
    model = GPT(cfg)
    torch.manual_seed(seed)
    model.reset_parameters()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_materialize_reproduces_the_models_own_initialisation() -> None:
    for cfg in (CFG, GPTConfig(vocab_size=40, seq_len=8, d_model=16, n_layers=2, n_heads=2,
                               tie_weights=False, bias=False)):  # fmt: skip
        ref = reference_weights(cfg)
        with torch.device("meta"):
            model = GPT(cfg)
        torch.manual_seed(7)
        created = dict(materialize(model, module_spec(model)))
        assert set(ref) - set(created) <= {"head.weight"}  # the tied alias is created once
        for name, tensor in created.items():
            assert torch.equal(tensor, ref[name]), name
        assert is_meta(model)  # nothing stays behind in the module


def test_materialize_holds_one_block_at_a_time() -> None:
    # A block is created whole (its parents may re-initialise their children's tensors, as
    # model.apply(_init_weights) does); other modules one at a time; never the whole model.
    with torch.device("meta"):
        model = GPT(CFG)
    own = max(len([*m.parameters(recurse=False), *m.buffers(recurse=False)]) for m in model.modules())
    block = max(len([*b.parameters(), *b.buffers()]) for b in model.blocks)
    live_max = 0
    for _ in materialize(model, module_spec(model)):
        live = sum(1 for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")
        live_max = max(live_max, live)
    assert 0 < live_max <= max(own, block) < len([*model.parameters(), *model.buffers()])


def test_materialize_uses_a_given_init_fn() -> None:
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 2)
    out = dict(materialize(lin, module_spec(lin), lambda m: [torch.nn.init.constant_(p, 0.5) for p in m.parameters(recurse=False)]))
    assert torch.equal(out["weight"], torch.full((2, 3), 0.5))


def test_module_binding_restores_the_module_even_on_error() -> None:
    lin = torch.nn.Linear(2, 1)
    spec = module_spec(lin)
    before = lin.weight
    with pytest.raises(RuntimeError, match="boom"):
        with ModuleBinding(*tensor_slots(lin, spec)) as binding:
            binding.bind({"weight": torch.zeros(1, 2)}, {})
            assert torch.equal(lin.weight, torch.zeros(1, 2))
            raise RuntimeError("boom")
    assert lin.weight is before


def _meta_init_worker(rank: int, world: int, out: str) -> None:
    res = {}
    for stage in (0, 1, 2, 3):
        with torch.device("meta"):
            model = GPT(CFG)
        plan = build_plan(model, stage=stage, param_persistence_threshold=20)
        torch.manual_seed(7)
        state = funczero.init_state(plan, optim.adamw(1e-3), seed=1)
        for n, t in gather_full(plan, state.params, sharded=plan.policy.params_at_rest == "shard").items():
            if plan.is_sharded(n) or plan.policy.params_at_rest == "replicated":
                res[f"s{stage}/{n}"] = t.contiguous()
        for n, t in state.buffers.items():
            res[f"s{stage}/{n}"] = t.contiguous()
    if rank == 0:
        save_file(res, out)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_meta_init_gives_the_one_process_weights_at_every_stage_and_world_size(world: int) -> None:
    ref = reference_weights()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "w.safetensors")
        if world == 1:
            _meta_init_worker(0, 1, out)
        else:
            run_distributed(_meta_init_worker, world, out, timeout=300)
        got = load_file(out)
    assert len(got) > 4 * 20
    for key, tensor in got.items():
        name = key.split("/", 1)[1]
        assert torch.equal(tensor, ref[name]), key


def test_initialize_trains_a_meta_device_model_at_stage_3() -> None:
    # The reproducer: "Cannot copy out of meta tensor; no data!" before.
    with torch.device("meta"):
        model = GPT(CFG)
    torch.manual_seed(7)
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}  # fmt: skip
    run = funczero.initialize(model, config, cross_entropy_loss, device="cpu")
    x = torch.randint(0, 40, (2, 8))
    state, metrics = run.train_step(run.state, (x, x))
    assert torch.isfinite(metrics["loss"])
    full = gather_full(run.plan, state.master, sharded=True)
    assert set(full) == set(run.plan.trainable)
