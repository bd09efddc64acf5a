"""funczero.initialize: what it tells a user whose config does not do what it says."""

from __future__ import annotations

import warnings

import pytest
import torch

import funczero

CONFIG = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _loss(model, batch):
    return model(batch).pow(2).mean()


def test_stage_3_that_shards_nothing_says_so() -> None:
    config = {**CONFIG, "zero_optimization": {"stage": 3}}  # default threshold 1e5: all kept
    with pytest.warns(UserWarning, match=r"stage 3 shards nothing.*threshold=100000"):
        run = funczero.initialize(torch.nn.Linear(4, 1), config, _loss, device="cpu")
    assert not any(run.plan.is_sharded(n) for n in run.plan.spec.params)


def test_stage_3_that_shards_is_quiet() -> None:
    config = {**CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run = funczero.initialize(torch.nn.Linear(4, 1), config, _loss, device="cpu")
    assert run.plan.is_sharded("weight")


def test_wall_clock_breakdown_gives_the_step_a_timer() -> None:
    run = funczero.initialize(torch.nn.Linear(4, 1), {**CONFIG, "wall_clock_breakdown": True}, _loss, device="cpu")
    state, _ = run.train_step(run.state, torch.ones(2, 4))
    assert set(run.timer.collect()) == {"forward", "backward", "reduce", "optimizer"}


def test_init_from_starts_a_meta_model_from_pretrained_weights(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    config = {**CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    run = funczero.initialize(model, config, loss_fn, init_from=tmp_path, device="cpu")
    x = torch.randint(0, 32, (2, 8))
    with funczero.bound_module(run.plan, run.state) as bound:
        bound.eval()  # from_pretrained's reference is in eval mode (no dropout)
        torch.testing.assert_close(bound(input_ids=x).logits, reference(input_ids=x).logits, rtol=0, atol=0)


def test_deepspeeds_activation_checkpointing_block_turns_on_remat() -> None:
    from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss

    cfg = GPTConfig(vocab_size=16, seq_len=8, d_model=16, n_layers=2, n_heads=2)
    with_block = {**CONFIG, "activation_checkpointing": {"partition_activations": False}}
    run = funczero.initialize(GPT(cfg), with_block, cross_entropy_loss, device="cpu")
    assert run.plan.remat_units == {"blocks.0", "blocks.1"}
    assert funczero.initialize(GPT(cfg), CONFIG, cross_entropy_loss, device="cpu").plan.remat_units == set()
    assert funczero.initialize(GPT(cfg), with_block, cross_entropy_loss, remat=False,
                               device="cpu").plan.remat_units == set()  # fmt: skip
    with pytest.raises(funczero.config.ConfigError, match="cpu_checkpointing=true is not supported"):
        funczero.initialize(GPT(cfg), {**CONFIG, "activation_checkpointing": {"cpu_checkpointing": True}},
                            cross_entropy_loss)  # fmt: skip


def _run_and_watch(stage: int, compile: bool) -> list:
    """Train a run two steps; weak references to every tensor it holds, then drop it."""
    import weakref

    from funczero import tree
    from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
    from funczero.parallel.compile import CompileOptions

    config = {**CONFIG, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    model = GPT(GPTConfig(vocab_size=16, seq_len=8, d_model=16, n_layers=2, n_heads=2))
    run = funczero.initialize(
        model, config, cross_entropy_loss, device="cpu",
        compile=CompileOptions(backend="aot_eager") if compile else False,
    )  # fmt: skip
    ids = torch.randint(0, 16, (2, 9))
    state = run.state
    for _ in range(2):
        state, metrics = run.train_step(state, (ids[:, :-1], ids[:, 1:]))
    watched = [weakref.ref(t) for t in tree.leaves(state) if isinstance(t, torch.Tensor)]
    assert len(watched) > 10
    del run, state, metrics, model
    return watched


@pytest.mark.parametrize(("stage", "compile"), [(0, False), (3, False), (3, True)])
def test_dropping_a_run_frees_its_state(stage: int, compile: bool) -> None:
    # What a second initialize in the same process must not pay for: the first run's tensors.
    # (On the GPU, benchmarks/gpt_throughput.py --isolate measures peaks in fresh processes and
    # docs/performance.md compares them with a second run in one process.)
    # Freed by reference counting, not at some later garbage collection: a reference cycle
    # through the step's context kept stage 3's shards alive until gc ran.
    import gc

    gc.collect()
    gc.disable()
    try:
        watched = _run_and_watch(stage, compile)
        alive = [r() for r in watched if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"{len(alive)} of {len(watched)} state tensors outlive their run: {[tuple(t.shape) for t in alive][:5]}"
