"""Exact resume with real training: a GPT (tied head, frozen positions, dropout) with AdamW, a
warmup-cosine LR schedule and gradient clipping.

* Same world size and stage: N steps, save, load in a fresh process, M more steps gives
  bit-identical losses and final state (every tensor, RNG included) to N + M steps
  uninterrupted; fp32 and bf16, world sizes 1 and 2, and fp16 with dynamic loss scaling.
* Another world size or stage: the loaded state equals the saved one tensor for tensor, and
  the continued run's losses match the uninterrupted run within the ZeRO equivalence tolerance
  (fp32 losses 1e-5, see test_parallel_stages.py). Pairs: W4/stage 3 -> W2/stage 1, W2/stage 2 -> W1/stage
  0, W1/stage 0 -> W4/stage 3, and an offline ``reshard`` of the first (must equal the online
  load bit for bit).

Runs are grouped into few process launches (starting ranks dominates the cost); world-size-1
runs without a process group happen in this process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from funczero import checkpoint, optim
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.testing.distributed import run_distributed
from funczero.train.loss_scale import LossScaleConfig
from funczero.train.step import init_state, make_train_step

CFG = GPTConfig(vocab_size=61, seq_len=12, d_model=30, n_layers=2, n_heads=3)
GLOBAL_BATCH = 8
N, M = 3, 3
LOSS_ATOL = 1e-5  # test_parallel_stages.py: fp32 AdamW losses across stages and world sizes


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: fresh (``src`` None) or resumed from ``<root>/<src>`` tag ``mid``."""

    name: str
    world: int
    stage: int
    precision: str = "fp32"
    dropout: float = 0.0
    src: str | None = None


def _setup(run: Run, rank: int):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, dropout=run.dropout))
    model.wpe.weight.requires_grad_(False)
    plan = build_plan(
        model, stage=run.stage, precision=run.precision, param_persistence_threshold=40
    )
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=0.1)
    # fp16: a dynamic loss scale that grows at step 3 and overflows (skips) at step 5, so the
    # resumed half depends on the restored scale, its growth tracker and the skipped count
    scaler = None
    if run.precision == "fp16":
        scaler = LossScaleConfig(init_scale=2.0**18, scale_window=2, hysteresis=1)
    state = init_state(plan, opt, params, buffers, seed=0, loss_scale=scaler)
    step = make_train_step(cross_entropy_loss, opt, plan, gradient_clipping=1.0, loss_scale=scaler)
    return state, step, model


def _batch(i: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x, y = (
        torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.seq_len), generator=g) for _ in range(2)
    )
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def _execute(run: Run, rank: int, root: Path) -> None:
    # One intra-op thread, as in spawned ranks (funczero.testing): the thread count changes
    # CPU reduction order, hence the last bits of results.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(run, rank, root)
    finally:
        torch.set_num_threads(threads)


def _train(run: Run, rank: int, root: Path) -> None:
    state, step, model = _setup(run, rank)
    out = root / run.name
    start = 0
    if run.src is not None:
        state, client = checkpoint.load(root / run.src, like=state, tag="mid")
        start = client["next_batch"]
        checkpoint.save(out, state, tag="loaded", module=model)
    losses: list[float] = []
    for i in range(start, N + M):
        if i == N and run.src is None:
            checkpoint.save(out, state, tag="mid", client_state={"next_batch": i}, module=model)
        state, metrics = step(state, _batch(i, rank, run.world))
        losses.append(float(metrics["loss"]))
    checkpoint.save(out, state, tag="final", module=model)
    if rank == 0:
        (root / f"{run.name}.losses.json").write_text(json.dumps(losses))


def _worker(rank: int, world: int, root: str, runs: list[dict[str, Any]]) -> None:
    for r in runs:
        _execute(Run(**r), rank, Path(root))


def _spawn(root: Path, *runs: Run) -> None:
    worlds = {r.world for r in runs}
    assert len(worlds) == 1
    run_distributed(
        _worker, worlds.pop(), str(root), [dataclasses.asdict(r) for r in runs], timeout=240
    )


def _losses(root: Path, name: str) -> torch.Tensor:
    return torch.tensor(json.loads((root / f"{name}.losses.json").read_text()), dtype=torch.float64)


# Same-(world, stage) pairs: (uninterrupted reference, resumed run)
SAME = [
    (Run("w1-fp32", 1, 0, "fp32", 0.1), "w1-fp32-res"),
    (Run("w1-bf16", 1, 1, "bf16", 0.1), "w1-bf16-res"),
    (Run("w1-fp16", 1, 2, "fp16", 0.1), "w1-fp16-res"),
    (Run("w2-fp32", 2, 3, "fp32", 0.1), "w2-fp32-res"),
    (Run("w2-bf16", 2, 2, "bf16", 0.1), "w2-bf16-res"),
]
REF_W4S3, REF_W2S2, REF_W1S0 = Run("w4s3", 4, 3), Run("w2s2", 2, 2), Run("w1s0", 1, 0)
CROSS = [
    (REF_W4S3, Run("w4s3-to-w2s1", 2, 1, src="w4s3")),
    (REF_W2S2, Run("w2s2-to-w1s0", 1, 0, src="w2s2")),
    (REF_W1S0, Run("w1s0-to-w4s3", 4, 3, src="w1s0")),
]
OFFLINE = Run("w4s3-resharded-to-w2s1", 2, 1, src="w4s3-resharded")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    same = {ref.world: [] for ref, _ in SAME}
    for ref, _ in SAME:
        same[ref.world].append(ref)
    # world size 1 needs no process group: the references run here, the resumes in a fresh process
    for ref in same[1] + [REF_W1S0]:
        _execute(ref, 0, root)
    _spawn(root, REF_W4S3, CROSS[2][1])
    checkpoint.reshard(root / "w4s3", root / "w4s3-resharded", world_size=2, stage=1, tag="mid")
    _spawn(root, REF_W2S2, *same[2], CROSS[0][1], OFFLINE)
    _spawn(
        root,
        *[
            dataclasses.replace(ref, name=name, src=ref.name)
            for ref, name in SAME
            if ref.world == 2
        ],
    )
    _spawn(
        root,
        *[
            dataclasses.replace(ref, name=name, src=ref.name)
            for ref, name in SAME
            if ref.world == 1
        ],
    )
    _execute(CROSS[1][1], 0, root)
    return root


@pytest.mark.parametrize("ref, resumed", SAME, ids=[name for _, name in SAME])
def test_same_world_and_stage_resume_is_bit_identical_to_uninterrupted_training(
    runs: Path, ref: Run, resumed: str
) -> None:
    assert torch.equal(_losses(runs, resumed), _losses(runs, ref.name)[N:])
    diffs = checkpoint.diff(runs / ref.name, runs / resumed, tag_a="final", tag_b="final")
    assert [d.path for d in diffs if d.status != "equal"] == []  # RNG, step, moments, everything
    # the resumed run started from exactly the saved state
    loaded = checkpoint.diff(runs / ref.name, runs / resumed, tag_a="mid", tag_b="loaded")
    assert [d.path for d in loaded if d.status != "equal"] == []


@pytest.mark.parametrize("ref, resumed", CROSS, ids=[r.name for _, r in CROSS])
def test_resume_into_another_world_size_and_stage_continues_the_same_training(
    runs: Path, ref: Run, resumed: Run
) -> None:
    # same parameters and optimizer state right after loading (the RNG is re-derived per rank)
    loaded = checkpoint.diff(runs / ref.name, runs / resumed.name, tag_a="mid", tag_b="loaded")
    assert [d.path for d in loaded if d.status != "equal"] == ["rng"]
    torch.testing.assert_close(
        _losses(runs, resumed.name), _losses(runs, ref.name)[N:], atol=LOSS_ATOL, rtol=0
    )
    final = {
        d.path: d
        for d in checkpoint.diff(runs / ref.name, runs / resumed.name, tag_a="final", tag_b="final")
    }
    assert final["step"].status == "equal" and final["opt_state/0/count"].status == "equal"
    assert max(d.max_abs for p, d in final.items() if p.startswith("master/")) < 1e-4


def test_offline_reshard_then_resume_equals_online_resharding_bit_for_bit(runs: Path) -> None:
    online, offline = runs / CROSS[0][1].name, runs / OFFLINE.name
    for tag in ("loaded", "final"):
        assert [
            d.path
            for d in checkpoint.diff(online, offline, tag_a=tag, tag_b=tag)
            if d.status != "equal"
        ] == []
    assert torch.equal(_losses(runs, OFFLINE.name), _losses(runs, CROSS[0][1].name))


def test_resumed_checkpoints_verify_and_consolidate_with_tied_head(
    runs: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    assert checkpoint.verify(runs / "w4s3-to-w2s1", tag="final").ok
    checkpoint.consolidate(runs / "w4s3-to-w2s1", tmp_path, tag="final")
    sd = load_file(tmp_path / "model.safetensors")
    GPT(CFG).load_state_dict(sd, strict=True)
    assert torch.equal(sd["head.weight"], sd["wte.weight"])
