"""benchmarks/scale_model.py: its collectives are exactly what funczero sends, and its time model.

The byte check runs real steps (``funczero.make_train_step``) on 2 and 4 gloo ranks with a
counting wrapper around ``torch.distributed``'s collectives and compares every call's kind and
tensor bytes with the model's list, for stages 0-3, one and two micro-batches, padding,
persistent parameters, bf16 reductions, ``reduce_scatter: false``, buffers and buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from funczero import optim
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.parallel.precision import Precision
from funczero.train.step import init_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]


def _load_scale_model() -> Any:
    spec = importlib.util.spec_from_file_location(
        "scale_model", ROOT / "benchmarks" / "scale_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_model"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sm = _load_scale_model()

# Every parameter needs padding at 4 ranks except a few (vocab 13, d 6: 78, 30, 18, 36 ...).
TINY = GPTConfig(vocab_size=13, seq_len=5, d_model=6, n_layers=2, n_heads=2)


@dataclasses.dataclass(frozen=True)
class Case:
    stage: int
    grad_accum: int = 1
    precision: str = "bf16"
    reduce_dtype: str | None = None
    threshold: int = 0
    reduce_scatter: bool = True
    batch_norm: bool = False
    bucket: int = 500_000_000
    remat: bool = False

    @property
    def key(self) -> str:
        return "/".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


CASES = [Case(s, ga) for s in range(4) for ga in (1, 2)] + [
    Case(3, 1, threshold=20),  # biases and norms replicated (persistent)
    Case(3, 2, threshold=20),
    Case(1, 2, reduce_dtype="bf16"),  # communication_data_type bf16
    Case(3, 1, reduce_dtype="bf16"),
    Case(2, 1, reduce_scatter=False),
    Case(0, 2, precision="fp32", batch_norm=True, bucket=50),  # floating buffers; several buckets
    Case(3, 1, precision="fp32", batch_norm=True),
]
# Not in CI: Case(3, 1, remat=True) (recomputation gathers inside its checkpoint) matched too, on
# 2 and 4 ranks (2026-12-02), but torch.utils.checkpoint's first use costs 15 s here.
KINDS = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
}
WRAPPED = (
    *KINDS,
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
)


class CollectiveCounter:
    """Wraps ``torch.distributed``'s collectives (and funczero's module-level references to
    them) to record ``(kind, tensor bytes)`` of every outermost call made while counting."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] | None = None
        self._inside = threading.local()

    def install(self) -> None:
        for name in WRAPPED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            wrapper = self._wrap(name, original)
            holders = [dist] + [
                m for n, m in list(sys.modules.items()) if n.startswith("funczero") and m
            ]
            for module in holders:
                for attr, value in list(vars(module).items()):
                    if value is original:
                        setattr(module, attr, wrapper)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            outer = not getattr(self._inside, "depth", 0)
            if outer and self.calls is not None:
                self.calls.append((KINDS.get(name, name), _nbytes(name, args, kwargs)))
            self._inside.depth = getattr(self._inside, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.depth -= 1

        return counted

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[tuple[str, int]]]:
        self.calls = []
        try:
            yield self.calls
        finally:
            self.calls = None


def _nbytes(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """All-gather: the output; reduce-scatter: the input; otherwise the first tensor argument."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name.startswith("all_gather") and len(tensors) >= 1:
        out = kwargs.get("output_tensor", tensors[0])
        return out.numel() * out.element_size()
    if name.startswith("reduce_scatter") and len(tensors) >= 2:
        return tensors[1].numel() * tensors[1].element_size()
    if tensors:
        return tensors[0].numel() * tensors[0].element_size()
    first = args[0] if args else next(iter(kwargs.values()))  # a list of tensors
    return sum(t.numel() * t.element_size() for t in first)


def _tiny(case: Case) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(TINY, batch_norm=case.batch_norm))


def _counting_worker(rank: int, world: int, cases_json: str) -> dict[str, torch.Tensor]:
    """Every case on all ranks, then on a group of the first two (one spawn for both sizes)."""
    counter = CollectiveCounter()
    counter.install()
    pair = dist.new_group([0, 1])
    report: dict[str, torch.Tensor] = {}
    for group, size in ((None, world), (pair, 2)):
        if rank < size:
            report.update(_count_cases(counter, rank, size, group, cases_json))
    return report


def _count_cases(
    counter: CollectiveCounter,
    rank: int,
    world: int,
    group: Any,
    cases_json: str,
    shard: int | None = None,
) -> dict[str, torch.Tensor]:
    report: dict[str, torch.Tensor] = {}
    # Hybrid (``shard``): the mesh comes from the shard-group size, not world/rank/group.
    where = (
        {"shard_group_size": shard}
        if shard is not None
        else {"world_size": world, "rank": rank, "group": group}
    )
    for fields in json.loads(cases_json):
        case = Case(**fields)
        model = _tiny(case)
        precision = Precision.from_name(case.precision, reduce_dtype=case.reduce_dtype)
        plan = build_plan(
            model,
            stage=case.stage,
            precision=precision,
            param_persistence_threshold=case.threshold,
            reduce_scatter=case.reduce_scatter,
            reduce_bucket_size=case.bucket,
            remat=case.remat,
            **where,
        )
        params, buffers = extract_tensors(model, plan.spec)
        release_module_tensors(model)
        opt = optim.adamw(1e-3, weight_decay=0.1)
        state = init_state(plan, opt, params, buffers)
        step = make_train_step(
            cross_entropy_loss, opt, plan, grad_accum=case.grad_accum, gradient_clipping=1.0
        )
        g = torch.Generator().manual_seed(rank + 1)
        batch = tuple(
            torch.randint(0, TINY.vocab_size, (2 * case.grad_accum, TINY.seq_len), generator=g)
            for _ in range(2)
        )
        for i in range(2):  # the first step and one after it (stage 3 then prefetches in order)
            with counter.counting() as calls:
                state, metrics = step(state, batch)
            for kind in {k for k, _ in calls}:
                sizes = sorted(b for k, b in calls if k == kind)
                report[f"w{world}/{case.key}/step{i}/{kind}"] = torch.tensor(
                    sizes, dtype=torch.int64
                )
            assert torch.isfinite(metrics["loss"])
    return report


def predicted(case: Case, world: int, shard: int | None = None) -> dict[str, list[int]]:
    shape = sm.gpt_shape(
        TINY.vocab_size,
        TINY.seq_len,
        TINY.d_model,
        TINY.n_layers,
        bias=TINY.bias,
        tie=TINY.tie_weights,
        batch_norm=case.batch_norm,
    )
    nbytes = {"bf16": 2, "fp32": 4, None: 4}
    setup = sm.Setup(
        case.stage,
        case.grad_accum,
        compute_bytes=nbytes[case.precision],
        reduce_bytes=nbytes[case.reduce_dtype],
        persistence_threshold=case.threshold,
        reduce_scatter=case.reduce_scatter,
        bucket_numel=case.bucket,
        remat=case.remat,
    )
    calls = sm.collective_calls(shape, sm.Mesh(world, shard=shard), setup)
    return {
        kind: sorted(c.nbytes for c in calls if c.kind == kind) for kind in {c.kind for c in calls}
    }


@pytest.fixture(scope="module")
def counted(
    gloo_world: Callable[..., list[dict[str, torch.Tensor]]],
) -> list[dict[str, torch.Tensor]]:
    cases = json.dumps([dataclasses.asdict(c) for c in CASES])
    return gloo_world(_counting_worker, 4, cases, timeout=150.0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.key.replace("/", ","))
def test_model_bytes_equal_counted_collectives(
    counted: list[dict[str, torch.Tensor]], case: Case, world: int
) -> None:
    want = predicted(case, world)
    assert want  # every case communicates
    for rank in range(world):
        for step in (0, 1):
            prefix = f"w{world}/{case.key}/step{step}/"
            got = {
                k[len(prefix) :]: v.tolist()
                for k, v in counted[rank].items()
                if k.startswith(prefix)
            }
            assert got == want, f"world {world}, rank {rank}, step {step}"


HYBRID_CASES = [c for c in CASES if c.stage > 0]


def _hybrid_counting_worker(rank: int, world: int, cases_json: str) -> dict[str, torch.Tensor]:
    """Every stage 1-3 case on 4 ranks as 2 replicas x shard groups of 2."""
    counter = CollectiveCounter()
    counter.install()
    return _count_cases(counter, rank, world, None, cases_json, shard=2)


@pytest.fixture(scope="module")
def counted_hybrid(
    gloo_world: Callable[..., list[dict[str, torch.Tensor]]],
) -> list[dict[str, torch.Tensor]]:
    cases = json.dumps([dataclasses.asdict(c) for c in HYBRID_CASES])
    return gloo_world(_hybrid_counting_worker, 4, cases, timeout=150.0)


@pytest.mark.parametrize("case", HYBRID_CASES, ids=lambda c: c.key.replace("/", ","))
def test_model_bytes_equal_counted_collectives_of_2x2_hybrid(
    counted_hybrid: list[dict[str, torch.Tensor]], case: Case
) -> None:
    want = predicted(case, 4, shard=2)
    assert any(c.group == "replicate" for c in sm.collective_calls(
        sm.gpt_shape(TINY.vocab_size, TINY.seq_len, TINY.d_model, TINY.n_layers),
        sm.Mesh(4, shard=2), sm.Setup(case.stage, case.grad_accum),
    ))
    for rank in range(4):
        for step in (0, 1):
            prefix = f"w4/{case.key}/step{step}/"
            got = {
                k[len(prefix) :]: v.tolist()
                for k, v in counted_hybrid[rank].items()
                if k.startswith(prefix)
            }
            assert got == want, f"hybrid 2x2, rank {rank}, step {step}"


@pytest.mark.parametrize(
    "overrides", [{}, {"bias": False, "tie_weights": False}, {"batch_norm": True}]
)
def test_gpt_shape_lists_the_modules_parameters_in_order(overrides: dict[str, bool]) -> None:
    cfg = dataclasses.replace(
        GPTConfig(vocab_size=50, seq_len=7, d_model=8, n_layers=3, n_heads=2), **overrides
    )
    model = GPT(cfg, device="meta")
    shape = sm.gpt_shape(
        cfg.vocab_size,
        cfg.seq_len,
        cfg.d_model,
        cfg.n_layers,
        bias=cfg.bias,
        tie=cfg.tie_weights,
        batch_norm=cfg.batch_norm,
    )
    assert [(p.name, p.numel) for p in shape.params] == [
        (n, p.numel()) for n, p in model.named_parameters()
    ]
    floats = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert shape.float_buffers == floats


def test_preset_sizes_are_the_published_parameter_counts() -> None:
    sizes = {name: sm.preset(name).numel for name in sm.PRESETS}
    assert (
        sizes["gpt-1.3b"]
        == GPTConfig(32000, 2048, 2048, 24, 16, bias=False, tie_weights=False).num_params()
    )
    assert sizes["llama-7b"] == 6_738_415_616  # Llama-2-7b-hf
    assert sizes["llama-13b"] == 13_015_864_320
    assert sizes["llama-70b"] == 68_976_648_192
    assert sizes["llama-8b"] == 8_030_261_248  # Meta-Llama-3-8B


def test_hybrid_keeps_gathers_and_reduce_scatters_inside_the_node() -> None:
    model = sm.preset("llama-7b")
    flat, hybrid = sm.Mesh(64), sm.Mesh(64, shard=8)
    for stage in (1, 2, 3):
        setup = sm.Setup(stage)
        calls = sm.collective_calls(model, hybrid, setup)
        inner = [c for c in calls if c.group == "shard"]
        assert inner and all(sm.link_bytes(c, hybrid)[1] == 0 for c in inner)
        # The shard group's calls are those of a flat 8-GPU world, plus one all-reduce per unit
        # of its fp32 shard across the 8 replicas, entirely between nodes.
        eight = sm.collective_calls(model, sm.Mesh(8), setup)
        assert sorted(c.nbytes for c in inner) == sorted(
            c.nbytes for c in eight if c.purpose != "scalars"
        )
        across = [c for c in calls if c.group == "replicate"]
        units = [c for c in calls if c.purpose == "reduce_grads"]
        assert [c.nbytes * 8 for c in across] == [c.nbytes for c in units]
        assert all(sm.link_bytes(c, hybrid) == (0.0, c.ring_bytes(8)) for c in across)
        # Flat: a ring over 8 nodes leaves a node on 8 of its 64 edges.
        for c in sm.collective_calls(model, flat, setup):
            intra, inter = sm.link_bytes(c, flat)
            assert inter == pytest.approx(c.ring_bytes(64) / 8) and intra + inter == pytest.approx(
                c.ring_bytes(64)
            )


def test_stage_zero_has_no_hybrid_form_and_meshes_must_tile_nodes() -> None:
    with pytest.raises(ValueError, match="stage 0 shards nothing"):
        sm.collective_calls(sm.preset("gpt-1.3b"), sm.Mesh(16, shard=8), sm.Setup(0))
    with pytest.raises(ValueError, match="must divide world"):
        sm.Mesh(24, shard=16)
    with pytest.raises(ValueError, match="multiple of gpus_per_node"):
        sm.Mesh(12)
    with pytest.raises(ValueError, match="divide or be a multiple"):
        sm.Mesh(48, shard=12)


def test_time_is_compute_plus_passes_when_links_are_free_and_one_gpu_has_no_communication() -> None:
    model = sm.preset("llama-13b")
    free = sm.Hardware(
        nvlink_gbps=1e12, ib_gbit_per_node=1e12, base_latency_us=0, intra_step_us=0, inter_step_us=0
    )
    for stage in range(4):
        for mesh in (sm.Mesh(1), sm.Mesh(256), sm.Mesh(256, shard=8) if stage else sm.Mesh(64)):
            t = sm.step_time(model, mesh, sm.Setup(stage, grad_accum=2), free)
            assert t.exposed_s == pytest.approx(0.0, abs=1e-9)
            tokens = 2 * model.seq * model.micro_batch
            assert t.compute_s == pytest.approx(
                tokens * model.flops_per_token() / (free.achieved_tflops * 1e12)
            )
            assert t.passes_s == pytest.approx(
                sm.pass_bytes(model, mesh, sm.Setup(stage, 2)) / (free.hbm_gbps * 1e9)
            )
    one = sm.step_time(model, sm.Mesh(1), sm.Setup(3))
    assert one.exposed_s == 0 and one.efficiency == 1.0


def test_latency_follows_nccls_ring_and_tree_step_counts() -> None:
    hw = sm.Hardware()
    assert hw.latency_s("all_gather", 8, 1) == pytest.approx((8.4 + 7 * 3.4) * 1e-6)
    assert hw.latency_s("all_gather", 64, 8) == pytest.approx((8.4 + 56 * 3.4 + 7 * 9.6) * 1e-6)
    # 1024 ranks on 128 nodes: the tree's 2 * (7 + 7) steps beat the ring's 2 * 1023.
    assert hw.latency_s("all_reduce", 1024, 128) == pytest.approx(
        (8.4 + 14 * 3.4 + 14 * 9.6) * 1e-6
    )


def test_predicted_step_times_stay_near_the_measured_h200_steps() -> None:
    # funczero's rows of benchmarks/results and the one-GPU rows; v0 predates the overlap the
    # model assumes. The errors are listed in docs/scaling.md.
    sources = {"1xh200 (scale_model.py)"} | {
        f"2026-11-22-{m}.jsonl" for m in ("2of4xh200-v4", "2xh200-v1", "2xh200-v2", "2xh200-v3",
                                          "2xh200-v4", "2xh200-v2-nccl-proto-simple", "4xh200-v4")
    }  # fmt: skip
    rows = [r for r in sm.validate() if r["funczero"] and r["source"] in sources]
    assert {r["world"] for r in rows} == {1, 2, 4} and len(rows) == 29
    one_gpu = [r["error"] for r in rows if r["world"] == 1]
    assert len(one_gpu) == 4 and max(abs(e) for e in one_gpu) < 0.04
    assert max(abs(r["error"]) for r in rows) < 0.12
