"""A cost model of funczero's ZeRO at scale: bytes each GPU sends per step, and the step time.

For a model (a preset or explicit parameter shapes), a mesh (``world`` GPUs, ``gpus_per_node``
per node, ``shard`` GPUs per shard group: ``shard == world`` is plain ZeRO, ``shard ==
gpus_per_node`` is HSDP/MiCS, ``replicas = world // shard``) and a ZeRO stage, it lists every
collective one rank issues in one step, with funczero's conventions (``funczero/parallel``):

* **units**: one per transformer block; the root (everything outside the blocks) is split by
  top-level submodule (``_root_parts``: ``wte``, ``wpe``, ``ln_f``, ``head``; whole when it has
  more than 8 such parts); the all-gather after the update (stages 1-2) and the boundary
  reduce-scatter of stage 1 go over the whole root. At stage 3 parameters under
  ``persistence_threshold`` elements form one replicated ``persistent`` unit.
* **padding**: every parameter is padded to a multiple of the shard-group size ``s``; a unit's
  all-gather moves ``s * sum(ceil(numel / s))`` elements. Stage 0's all-reduce is unpadded.
* **dtypes**: all-gathers in the compute dtype (bf16: 2 bytes), reductions in the reduce dtype
  (fp32: 4 bytes, or ``communication_data_type``); the step's norm and loss are one fp32
  all-reduce of 2 elements; floating buffers (BatchNorm) are all-reduced in fp32.
* **when**: stage 3 gathers every unit in forward (the root parts once per micro-batch, kept
  through backward) and every block again in backward; stages 2-3, and stages 0-1 with one
  micro-batch on several ranks, reduce each unit during backward (per micro-batch); otherwise
  stage 0 all-reduces buckets of ``reduce_bucket_size`` elements and stage 1 reduce-scatters
  each unit at the accumulation boundary; stages 1-2 all-gather every unit after the update.
* **hybrid** (``shard < world``: ``build_plan(shard_group_size=...)``, ``mics_shard_size``):
  gathers and reduce-scatters run in the shard group; each reduced shard (reduce dtype) is then
  all-reduced across the ``replicas``: one call per unit and reduction (every micro-batch when
  reducing in backward), issued when the unit's reduction is waited (one unit later, by
  ``ReduceQueue``) and waited at once (``funczero.parallel.hybrid``).

**Bytes** per call are the tensor bytes at the ``torch.distributed`` call (all-gather: its
output, reduce-scatter: its input, all-reduce: its tensor), which ``tests/test_scale_model.py``
checks exactly against what funczero issues on gloo. A ring sends ``(n-1)/n`` of that per GPU
(all-reduce ``2(n-1)/n``); with the group's ``n`` ranks on ``k`` nodes (rank order node-major),
``k`` of the ring's ``n`` edges leave a node (none when ``k == 1``), so a GPU sends on average
``k/n`` of its bytes between nodes and the rest over NVLink.

**Time of one collective** = latency + ``max(intra / nvlink, inter * gpus_per_node / ib)``:
``nvlink`` is half the per-GPU NVLink figure (900 GB/s counts both directions), ``ib`` the
node's InfiniBand per direction (4 x 400 Gb/s = 200 GB/s), shared by the node's GPUs, which all
run the same collective at once. Latency is NCCL's ring model (``src/graph/tuning.cc``, Simple
protocol): ``8.4 us + 3.4 us`` per step inside a node ``+ 9.6 us`` per step between nodes,
``n-1`` steps (all-reduce ``2(n-1)``; for all-reduce the tree's ``2((n/k - 1) + log2 k)``
steps when fewer, as NCCL would pick it).

**Step time**: a timeline of the compute stream and the communication streams per micro-batch. Compute per unit is proportional to its
FLOPs (``2 * params`` per token forward for every weight that is not an embedding lookup, plus
``4 * d * seq`` per block), backward twice forward (plus a forward with ``remat``); the total of
one micro-batch is ``FLOPs / achieved_tflops`` (measured on one H200, ``measure``). The
collectives of one group run one after another on that group's stream (the replicas' all-reduce
on a second stream), each starting when issued: stage 3 issues a unit's all-gather one unit
ahead (forward; the previous unit's in backward, the last block's is not prefetched), every
reduction right after its unit's backward; the compute waits for a gather before its unit runs
and for the previous reduction when it issues the next (funczero's ``ReduceQueue``). So each
unit's collectives overlap the next unit's compute; what does not fit is exposed. Serial on top:
reductions at the accumulation boundary, the all-gathers after the update, the scalar and
buffer all-reduces, and element-wise passes over parameters (optimizer 28 bytes per updated
element, norm 4, casts and copies around collectives, by stage) at ``hbm_gbps``.

Run::

    python benchmarks/scale_model.py table        # docs/scaling.md's table
    python benchmarks/scale_model.py show --preset llama-70b --world 256 --shard 8 --stage 3
    python benchmarks/scale_model.py validate     # predictions against the measured step times
    python benchmarks/scale_model.py measure      # on one GPU: achieved TFLOP/s and HBM rate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Measured on one H200 (nvidia-h200: torch 2.11.0+cu130, driver 580.159.04) on 2026-12-02 with
# `measure`, three runs (10, 20, 20 repetitions): forward and backward of the 1.34B GPT (seq 2048,
# micro-batch 4, bf16, funczero stage 0) took 124.4 / 125.4 / 125.2 ms (583 / 578 / 579 TFLOP/s
# by this model's FLOP count); the fused AdamW pass over its 1.34B fp32 master weights 11.31 /
# 11.22 / 11.31 ms (28 bytes per element: 3326 / 3351 / 3326 GB/s). The medians:
ACHIEVED_TFLOPS = 579.0
HBM_GBPS = 3326.0


# --------------------------------------------------------------------------- model shapes


@dataclasses.dataclass(frozen=True)
class Param:
    """One trainable parameter: its elements, its unit (``""`` root, else the block's FQN),
    its root part (top-level submodule) and forward FLOPs per token."""

    name: str
    numel: int
    unit: str
    part: str = ""
    flops: int = 0  # forward FLOPs per token
    after_blocks: bool = False  # a root parameter used after the blocks (final norm, head)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    params: tuple[Param, ...]
    layers: int
    d_model: int
    seq: int
    micro_batch: int
    float_buffers: int = 0  # elements of floating buffers (all-reduced with buffer_sync="mean")

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: ``3 x`` forward (weights and attention)."""
        return 3 * (sum(p.flops for p in self.params) + 4 * self.d_model * self.seq * self.layers)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(p.unit for p in self.params if p.unit))


def _linear(name: str, out_f: int, in_f: int, unit: str, bias: bool, **kw: object) -> list[Param]:
    ps = [Param(f"{name}.weight", out_f * in_f, unit, flops=2 * out_f * in_f, **kw)]  # type: ignore[arg-type]
    return ps + ([Param(f"{name}.bias", out_f, unit, **kw)] if bias else [])  # type: ignore[arg-type]


def _norm(name: str, d: int, unit: str, bias: bool, **kw: object) -> list[Param]:
    return [
        Param(f"{name}.{w}", d, unit, **kw) for w in (("weight", "bias") if bias else ("weight",))
    ]  # type: ignore[arg-type]


def gpt_shape(
    vocab: int,
    seq: int,
    d: int,
    layers: int,
    *,
    micro_batch: int = 1,
    bias: bool = True,
    tie: bool = True,
    batch_norm: bool = False,
    name: str = "gpt",
) -> ModelShape:
    """``funczero.models.gpt.GPT``'s parameters, in its module order."""
    ps = [Param("wte.weight", vocab * d, "", "wte"), Param("wpe.weight", seq * d, "", "wpe")]
    for i in range(layers):
        u = f"blocks.{i}"
        ps += _norm(f"{u}.ln1", d, u, bias) + _linear(f"{u}.qkv", 3 * d, d, u, bias)
        ps += _linear(f"{u}.proj", d, d, u, bias) + _norm(f"{u}.ln2", d, u, bias)
        ps += _linear(f"{u}.fc", 4 * d, d, u, bias) + _linear(f"{u}.out", d, 4 * d, u, bias)
    ps += _norm("ln_f", d, "", bias, part="ln_f", after_blocks=True)
    if batch_norm:
        ps += _norm("bn", d, "", True, part="bn", after_blocks=True)
    head_flops = 2 * vocab * d
    if tie:  # the head reuses wte.weight: its FLOPs count, its elements do not
        ps[0] = dataclasses.replace(ps[0], flops=head_flops, after_blocks=True)
    else:
        ps.append(Param("head.weight", vocab * d, "", "head", head_flops, True))
    return ModelShape(name, tuple(ps), layers, d, seq, micro_batch, 2 * d if batch_norm else 0)


def llama_shape(
    vocab: int,
    d: int,
    layers: int,
    ffn: int,
    heads: int,
    kv_heads: int,
    *,
    seq: int,
    micro_batch: int = 1,
    name: str = "llama",
) -> ModelShape:
    """Hugging Face ``LlamaForCausalLM``'s parameters (untied): root parts ``model`` (embedding
    and final norm) and ``lm_head``; one unit per ``model.layers.i``."""
    kv = d // heads * kv_heads
    ps = [Param("model.embed_tokens.weight", vocab * d, "", "model")]
    for i in range(layers):
        u = f"model.layers.{i}"
        ps += _norm(f"{u}.input_layernorm", d, u, False)
        for proj, (o, n) in {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}.items():
            ps += _linear(f"{u}.self_attn.{proj}_proj", o, n, u, False)
        ps += _norm(f"{u}.post_attention_layernorm", d, u, False)
        for proj, (o, n) in {"gate": (ffn, d), "up": (ffn, d), "down": (d, ffn)}.items():
            ps += _linear(f"{u}.mlp.{proj}_proj", o, n, u, False)
    ps += _norm("model.norm", d, "", False, part="model", after_blocks=True)
    ps.append(Param("lm_head.weight", vocab * d, "", "lm_head", 2 * vocab * d, True))
    return ModelShape(name, tuple(ps), layers, d, seq, micro_batch)


def custom_shape(
    params: int, layers: int, d: int, *, seq: int, micro_batch: int = 1, vocab: int = 32000
) -> ModelShape:
    """A model known only by its size: an untied ``vocab x d`` embedding and head, and the rest
    split evenly over ``layers`` blocks of one weight each (padding is then a lower bound)."""
    per_block = (params - 2 * vocab * d) // layers
    if per_block <= 0:
        raise ValueError(f"params={params} is too small for 2 x vocab({vocab}) x d({d}) embeddings")
    ps = [Param("embed.weight", vocab * d, "", "embed")]
    ps += [
        Param(f"layers.{i}.weight", per_block, f"layers.{i}", flops=2 * per_block)
        for i in range(layers)
    ]
    ps.append(Param("head.weight", vocab * d, "", "head", 2 * vocab * d, True))
    return ModelShape(f"custom-{params / 1e9:.1f}B", tuple(ps), layers, d, seq, micro_batch)


PRESETS = {  # name: (builder, what it is)
    "gpt-1.3b": (
        lambda: gpt_shape(
            32000, 2048, 2048, 24, micro_batch=4, bias=False, tie=False, name="gpt-1.3b"
        ),
        "benchmarks/gpt_throughput.py's GPT, seq 2048, micro-batch 4",
    ),
    "llama-7b": (
        lambda: llama_shape(32000, 4096, 32, 11008, 32, 32, seq=4096, name="llama-7b"),
        "Llama 2 7B, seq 4096, micro-batch 1",
    ),
    "llama-8b": (
        lambda: llama_shape(128256, 4096, 32, 14336, 32, 8, seq=8192, name="llama-8b"),
        "Llama 3 8B (GQA, 128K vocabulary), seq 8192, micro-batch 1",
    ),
    "llama-13b": (
        lambda: llama_shape(32000, 5120, 40, 13824, 40, 40, seq=4096, name="llama-13b"),
        "Llama 2 13B, seq 4096, micro-batch 1",
    ),
    "llama-70b": (
        lambda: llama_shape(32000, 8192, 80, 28672, 64, 8, seq=4096, name="llama-70b"),
        "Llama 2 70B (GQA), seq 4096, micro-batch 1",
    ),
}


def preset(name: str) -> ModelShape:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name][0]()


# --------------------------------------------------------------------------- mesh, setup


@dataclasses.dataclass(frozen=True)
class Mesh:
    """``world`` GPUs, ``gpus_per_node`` per node, shard groups of ``shard`` (default: world)."""

    world: int
    gpus_per_node: int = 8
    shard: int | None = None

    def __post_init__(self) -> None:
        s, w, g = self.shard_size, self.world, self.gpus_per_node
        if w < 1 or g < 1 or s < 1 or w % s:
            raise ValueError(f"shard={s} must divide world={w} (both >= 1)")
        if w > g and w % g:
            raise ValueError(f"world={w} must be a multiple of gpus_per_node={g} beyond one node")
        if s % g and g % s:
            raise ValueError(f"shard={s} must divide or be a multiple of gpus_per_node={g}")

    @property
    def shard_size(self) -> int:
        return self.world if self.shard is None else self.shard

    @property
    def replicas(self) -> int:
        return self.world // self.shard_size

    def nodes(self, group: str) -> tuple[int, int]:
        """``(ranks, nodes)`` of one group: ``world``, ``shard`` or ``replicate``."""
        g = self.gpus_per_node
        n = {"world": self.world, "shard": self.shard_size, "replicate": self.replicas}[group]
        if group == "replicate":  # ranks r, r + s, r + 2s, ...: one node each unless s < g
            return n, min(n, max(1, self.world // g))
        return n, max(1, n // g)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the step does: stage, micro-batches, dtypes (bytes) and funczero's knobs."""

    stage: int
    grad_accum: int = 1
    compute_bytes: int = 2  # bf16
    reduce_bytes: int = 4  # fp32 (communication_data_type)
    persistence_threshold: int = 100_000  # stage3_param_persistence_threshold
    reduce_scatter: bool = True
    bucket_numel: int = 500_000_000  # reduce_bucket_size
    buffer_sync: bool = True
    remat: bool = False
    # Hybrid, when the replicas' all-reduce of a unit runs (on a stream of its own): False,
    # issued when the unit's reduction is waited (one unit later) and waited one unit after that
    # (funczero.parallel.hybrid.ReplicaPipeline); True, issued right after the unit's
    # reduce-scatter and waited only at the end of backward (FSDP2's HSDP).
    replica_overlap: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3) or self.grad_accum < 1:
            raise ValueError(
                f"stage={self.stage} must be 0-3 and grad_accum={self.grad_accum} >= 1"
            )


@dataclasses.dataclass(frozen=True)
class Call:
    """One ``torch.distributed`` call of one rank: kind, group, what it is for, tensor bytes."""

    kind: str  # all_gather | reduce_scatter | all_reduce
    group: str  # world | shard | replicate
    purpose: str  # gather_fwd, gather_bwd, reduce_grads, reduce_replicas, gather_update, scalars, buffers
    unit: str
    nbytes: int
    micro: int = -1  # the micro-batch it belongs to; -1: once per step

    def ring_bytes(self, n: int) -> float:
        """Bytes one GPU sends in a ring over ``n`` ranks."""
        return (2 if self.kind == "all_reduce" else 1) * (n - 1) / n * self.nbytes


# --------------------------------------------------------------------------- the collectives


def _units(
    model: ModelShape, setup: Setup
) -> tuple[list[tuple[str, list[Param]]], list[Param], list[Param]]:
    """``(root parts + blocks as (key, params), the whole root, persistent)`` the plan communicates."""
    kept = [p for p in model.params if setup.stage == 3 and p.numel < setup.persistence_threshold]
    moving = [p for p in model.params if p not in kept]
    root = [p for p in moving if not p.unit]
    parts: dict[str, list[Param]] = {}
    for p in root:
        parts.setdefault(p.part, []).append(p)
    root_units = (
        [("root", root)] if len(parts) > 8 else [(f"root.{k}", v) for k, v in parts.items()]
    )
    blocks = [(u, [p for p in moving if p.unit == u]) for u in model.blocks]
    return root_units + [(u, ps) for u, ps in blocks if ps], root, kept


def shard_numel(params: Iterable[Param], s: int) -> int:
    return sum(-(-p.numel // s) for p in params)


def collective_calls(model: ModelShape, mesh: Mesh, setup: Setup) -> list[Call]:
    """Every collective one rank issues in one step, in funczero's order within each phase."""
    if mesh.world == 1:
        return []
    if setup.stage == 0 and mesh.shard_size != mesh.world:
        raise ValueError("stage 0 shards nothing: hybrid sharding needs stage 1-3 (shard == world)")
    s, c, r = mesh.shard_size, setup.compute_bytes, setup.reduce_bytes
    units, root, kept = _units(model, setup)
    sharded_group = "shard" if mesh.replicas > 1 else "world"
    reduced = setup.stage >= 2 or setup.grad_accum == 1
    calls: list[Call] = []

    def reduce(unit: str, ps: list[Param], micro: int) -> None:
        if setup.stage == 0:
            calls.append(
                Call(
                    "all_reduce", "world", "reduce_grads", unit, sum(p.numel for p in ps) * r, micro
                )
            )
            return
        kind = "reduce_scatter" if setup.reduce_scatter else "all_reduce"
        calls.append(
            Call(kind, sharded_group, "reduce_grads", unit, s * shard_numel(ps, s) * r, micro)
        )
        if mesh.replicas > 1:
            calls.append(
                Call(
                    "all_reduce",
                    "replicate",
                    "reduce_replicas",
                    unit,
                    shard_numel(ps, s) * r,
                    micro,
                )
            )

    def gather(unit: str, ps: list[Param], purpose: str, micro: int = -1) -> None:
        calls.append(
            Call("all_gather", sharded_group, purpose, unit, s * shard_numel(ps, s) * c, micro)
        )

    for micro in range(setup.grad_accum):
        if setup.stage == 3:
            for unit, ps in units:
                gather(unit, ps, "gather_fwd", micro)
            for unit, ps in units:
                if not unit.startswith("root"):
                    gather(unit, ps, "gather_bwd", micro)
        if reduced:
            for unit, ps in units + ([("persistent", kept)] if kept else []):
                reduce(unit, ps, micro)
    whole = [("root", root)] + [(u, [p for p in model.params if p.unit == u]) for u in model.blocks]
    if not reduced:  # the accumulation boundary
        if setup.stage == 0:
            for size in _buckets([p.numel for p in model.params], setup.bucket_numel):
                calls.append(Call("all_reduce", "world", "reduce_grads", "bucket", size * r))
        else:
            for unit, ps in whole:
                reduce(unit, ps, -1)
    calls.append(Call("all_reduce", "world", "scalars", "", 2 * 4))
    if setup.stage in (1, 2):
        for unit, ps in whole:
            gather(unit, ps, "gather_update")
    elif setup.stage == 3 and kept:
        gather("persistent", kept, "gather_update")
    if setup.buffer_sync and model.float_buffers:
        for size in _buckets([model.float_buffers], 2**27):
            calls.append(Call("all_reduce", "world", "buffers", "", size * 4))
    return calls


def _buckets(sizes: Sequence[int], bucket_numel: int) -> list[int]:
    """``all_reduce_mean_``'s buckets: add a tensor while the bucket is empty or stays within the limit."""
    out: list[int] = []
    size = 0
    for n in sizes:
        if size and size + n > bucket_numel:
            out.append(size)
            size = 0
        size += n
    return out + ([size] if size else [])


def link_bytes(call: Call, mesh: Mesh) -> tuple[float, float]:
    """``(intra-node, inter-node)`` bytes one GPU sends for ``call`` (ring, averaged over GPUs)."""
    n, k = mesh.nodes(call.group)
    sent = call.ring_bytes(n)
    inter = sent * k / n if k > 1 else 0.0
    return sent - inter, inter


def bytes_per_gpu(model: ModelShape, mesh: Mesh, setup: Setup) -> dict[str, tuple[float, float]]:
    """Per purpose: ``(intra, inter)`` bytes one GPU sends in one step."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for call in collective_calls(model, mesh, setup):
        intra, inter = link_bytes(call, mesh)
        out[call.purpose][0] += intra
        out[call.purpose][1] += inter
    return {k: (v[0], v[1]) for k, v in out.items()}


# --------------------------------------------------------------------------- time


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Link rates (vendor figures), NCCL's ring latencies, and the measured compute rates."""

    nvlink_gbps: float = 900.0  # GB/s per GPU, both directions together
    ib_gbit_per_node: float = 4 * 400.0  # Gb/s per node, per direction
    base_latency_us: float = 8.4
    intra_step_us: float = 3.4
    inter_step_us: float = 9.6
    achieved_tflops: float = ACHIEVED_TFLOPS
    hbm_gbps: float = HBM_GBPS
    peak_tflops: float = 989.0  # H100/H200 dense bf16, for MFU

    def latency_s(self, kind: str, n: int, k: int) -> float:
        m = n // k  # ranks per node
        if kind == "all_reduce":
            ring = (2 * (n - k), 2 * (k - 1)) if k > 1 else (2 * (n - 1), 0)
            tree = (2 * (m - 1), 2 * math.ceil(math.log2(k)))
            steps = min(
                ring, tree, key=lambda s: s[0] * self.intra_step_us + s[1] * self.inter_step_us
            )
        else:
            steps = (n - k, k - 1) if k > 1 else (n - 1, 0)
        return (
            self.base_latency_us + steps[0] * self.intra_step_us + steps[1] * self.inter_step_us
        ) * 1e-6

    def seconds(self, call: Call, mesh: Mesh) -> float:
        n, k = mesh.nodes(call.group)
        if n == 1:
            return 0.0
        intra, inter = link_bytes(call, mesh)
        bw = max(
            intra / (self.nvlink_gbps / 2 * 1e9),
            inter * mesh.gpus_per_node / (self.ib_gbit_per_node / 8 * 1e9),
        )
        return self.latency_s(call.kind, n, k) + bw


def pass_bytes(model: ModelShape, mesh: Mesh, setup: Setup) -> float:
    """HBM bytes of the step's element-wise passes over parameters on one GPU (see module doc)."""
    s, c, r, a = mesh.shard_size, setup.compute_bytes, setup.reduce_bytes, setup.grad_accum
    world = mesh.world
    full = model.numel
    kept = _units(model, setup)[2]
    shard = shard_numel(model.params, s)
    padded = s * shard
    cast_out = (r + 4) * shard if r != 4 or not setup.reduce_scatter and world > 1 else 0
    reduced = setup.stage >= 2 or (a == 1 and world > 1)
    extra = a - 1  # micro-batches after the first
    to_fp32 = (c + 4) * full if c != 4 else 0  # the first micro-batch's gradients, converted
    if setup.stage == 0:
        if reduced:
            grads = a * ((c + r) * full + ((r + 4) * full if r != 4 else 0))
        else:
            grads = to_fp32 + extra * (8 + c) * full + ((8 + 2 * r) * full if world > 1 else 0)
        return grads + 32 * full + ((4 + c) * full if c != 4 else 0)
    norm_opt = 32 * shard
    if setup.stage in (1, 2):
        if reduced:
            grads = a * (c * full + r * padded + cast_out) + extra * 12 * shard
        elif a > 1:
            grads = to_fp32 + extra * (8 + c) * full + 4 * full + r * padded + cast_out
        else:  # one rank: the compute-dtype gradients are chunked directly
            grads = c * full + r * padded + cast_out
        return grads + norm_opt + (4 + c) * shard + 2 * c * padded
    sharded = [p for p in model.params if p not in kept]
    blocks = [p for p in sharded if p.unit]
    gathers = (4 + c) * shard_numel(sharded, s) + 2 * c * s * shard_numel(sharded, s)
    regathers = (4 + c) * shard_numel(blocks, s) + 2 * c * s * shard_numel(blocks, s)
    grads = a * (gathers + regathers + c * full + r * padded + cast_out) + extra * 12 * shard
    rebuild = (4 + c) * shard_numel(kept, s) + 2 * c * s * shard_numel(kept, s)
    return grads + norm_opt + rebuild


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute_s: float  # forward and backward of every micro-batch
    passes_s: float  # element-wise passes (optimizer, casts, copies)
    exposed_s: float  # communication not hidden behind compute
    tokens_per_gpu: int
    flops_per_token: int
    peak_tflops: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.passes_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        """Compute-only time over the step: 1 when no communication is exposed."""
        return (self.compute_s + self.passes_s) / self.total_s

    @property
    def mfu(self) -> float:
        return self.tokens_per_gpu * self.flops_per_token / self.total_s / (self.peak_tflops * 1e12)


class _Timeline:
    """The compute stream's clock and each communication stream's next free time."""

    def __init__(self, hw: Hardware, mesh: Mesh) -> None:
        self.hw, self.mesh, self.t = hw, mesh, 0.0
        self.free: dict[str, float] = defaultdict(float)

    def issue(self, calls: Sequence[Call], after: float = 0.0) -> float:
        """Issue ``calls`` now, one after another, none before ``after``; when the last is done."""
        done = max(self.t, after)
        for call in calls:
            stream = "replicate" if call.group == "replicate" else "main"
            start = max(self.t, self.free[stream], done)
            done = self.free[stream] = start + self.hw.seconds(call, self.mesh)
        return done

    def wait(self, done: float) -> None:
        self.t = max(self.t, done)


def step_time(model: ModelShape, mesh: Mesh, setup: Setup, hw: Hardware = Hardware()) -> StepTime:
    """Predicted time of one step (see the module docstring for the model)."""
    calls = collective_calls(model, mesh, setup)
    tokens = model.micro_batch * model.seq
    per_flop = tokens / (hw.achieved_tflops * 1e12)  # seconds per forward FLOP per token
    fwd: dict[str, float] = defaultdict(float)
    for p in model.params:
        fwd[p.unit] += p.flops * per_flop
    for u in model.blocks:
        fwd[u] += 4 * model.d_model * model.seq * per_flop
    tl = _Timeline(hw, mesh)
    for micro in range(setup.grad_accum):
        _micro_batch(tl, model, setup, [c for c in calls if c.micro == micro], fwd)
    blocks_fwd = sum(fwd[u] for u in model.blocks)
    compute = setup.grad_accum * (3 * fwd[""] + (3 + setup.remat) * blocks_fwd)
    # Once per step, not overlapped: boundary reductions, scalars, the after-update gathers.
    serial = [c for c in calls if c.micro == -1]
    exposed = tl.t - compute + sum(hw.seconds(c, mesh) for c in serial)
    passes = pass_bytes(model, mesh, setup) / (hw.hbm_gbps * 1e9)
    return StepTime(
        compute,
        passes,
        max(exposed, 0.0),
        tokens * setup.grad_accum,
        model.flops_per_token(),
        hw.peak_tflops,
    )


def _micro_batch(
    tl: _Timeline, model: ModelShape, setup: Setup, calls: list[Call], fwd: dict[str, float]
) -> None:
    """One micro-batch's forward and backward on the timeline."""
    by_unit: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in calls:
        by_unit[(call.purpose, call.unit)].append(call)
    units, _, kept = _units(model, setup)
    roots = [u for u, _ in units if u.startswith("root")]
    gathered_units = [u for u, _ in units if not u.startswith("root")] if setup.stage == 3 else []
    pre = {f"root.{p.part}" for p in model.params if not p.unit and not p.after_blocks}
    pending: dict[str, float] = {}
    if gathered_units:  # the root parts and the first block together, then one block ahead
        for u in roots + gathered_units[:1]:
            pending[u] = tl.issue(by_unit[("gather_fwd", u)])
        for u in roots:
            tl.wait(pending.pop(u))
    for u in model.blocks:
        if u in pending:
            tl.wait(pending.pop(u))
            j = gathered_units.index(u) + 1
            if j < len(gathered_units):
                pending[gathered_units[j]] = tl.issue(by_unit[("gather_fwd", gathered_units[j])])
        tl.t += fwd[u]
    tl.t += fwd[""]
    backward = {u: (2 + setup.remat) * fwd[u] for u in model.blocks}
    if not any(c.purpose == "reduce_grads" for c in calls):  # reduced at the accumulation boundary
        tl.t += 2 * fwd[""] + sum(backward.values())
        return
    previous: list[Any] = [tl.t, None]  # the previous reduction: when its reduce-scatter ends, unit

    replicas = [0.0]  # when the all-reduce issued at the previous wait is done

    def finish_previous(last: bool = False) -> None:
        # ReduceQueue(depth=1) waits for the previous reduction; with replicas that wait issues
        # the unit's all-reduce across replicas and waits for the one issued at the wait before
        # (ReplicaPipeline); the last wait waits for all.
        tl.wait(previous[0])
        if previous[1] is not None and not setup.replica_overlap:
            issued = tl.issue(by_unit[("reduce_replicas", previous[1])], after=previous[0])
            tl.wait(replicas[0])
            replicas[0] = issued
        if last:
            tl.wait(replicas[0])

    def reduce(u: str) -> None:
        done = tl.issue(by_unit[("reduce_grads", u)])
        if setup.replica_overlap:
            tl.issue(by_unit[("reduce_replicas", u)], after=done)
        finish_previous()
        previous[:] = [done, u]

    tl.t += 2 * fwd[""]  # head and final norm; the embedding's backward costs ~nothing
    for u in roots:
        if u not in pre:
            reduce(u)
    for u in reversed(model.blocks):
        if u in gathered_units:
            j = gathered_units.index(u)
            if u not in pending:  # the last block is gathered on first use, not prefetched
                pending[u] = tl.issue(by_unit[("gather_bwd", u)])
            if j > 0:
                pending[gathered_units[j - 1]] = tl.issue(
                    by_unit[("gather_bwd", gathered_units[j - 1])]
                )
            tl.wait(pending.pop(u))
        tl.t += backward[u]
        if any(x == u for x, _ in units):
            reduce(u)
    if kept:
        reduce("persistent")
    for u in roots:
        if u in pre:
            reduce(u)
    finish_previous(last=True)
    tl.wait(max([previous[0], *tl.free.values()]))


def state_bytes(model: ModelShape, mesh: Mesh, setup: Setup) -> float:
    """Model-state bytes per GPU (docs/zero.md's formulas; activations not included)."""
    c, full, shard = setup.compute_bytes, model.numel, shard_numel(model.params, mesh.shard_size)
    if setup.stage == 0:
        return (c if c != 4 else 0) * full + 16 * full
    return (c * full if setup.stage in (1, 2) else 0) + 16 * shard


# --------------------------------------------------------------------------- measuring (one GPU)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Forward+backward time of the 1.34B GPT and the fused AdamW pass, on one GPU."""
    import torch

    from funczero import optim
    from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
    from funczero.module import extract_tensors, release_module_tensors
    from funczero.parallel.forward_backward import PrefetchOrder, forward_backward
    from funczero.parallel.plan import build_plan
    from funczero.train.step import init_state

    shape = preset("gpt-1.3b")
    cfg = GPTConfig(
        vocab_size=32000,
        seq_len=2048,
        d_model=2048,
        n_layers=24,
        n_heads=16,
        dropout=0.0,
        bias=False,
        tie_weights=False,
    )
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(cfg, device=device)
    plan = build_plan(model, stage=0, precision="bf16")
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-4, weight_decay=0.01)
    state = init_state(plan, opt, params, buffers, device=device)
    del params
    tokens = torch.randint(0, cfg.vocab_size, (shape.micro_batch, cfg.seq_len + 1), device=device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    one, order = torch.ones((), device=device), PrefetchOrder()

    def fb() -> None:
        forward_backward(
            plan,
            cross_entropy_loss,
            state.params,
            state.master,
            state.buffers,
            batch,
            one,
            single_micro_batch=True,
            order=order,
        )

    master = {n: state.master[n] for n in plan.trainable}
    grads = {n: torch.full_like(m, 1e-3) for n, m in master.items()}
    no_inf = torch.zeros((), device=device)

    def adamw() -> None:
        opt.update_(grads, state.opt_state, master, found_inf=no_inf)

    def timed(fn: object, reps: int) -> float:
        for _ in range(3):
            fn()  # type: ignore[operator]
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()  # type: ignore[operator]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    bf16 = [state.params[n] for n in plan.trainable]

    def cast() -> None:
        torch._foreach_copy_(bf16, list(master.values()))

    fb_s, adamw_s, cast_s = timed(fb, args.reps), timed(adamw, args.reps), timed(cast, args.reps)
    flops = shape.flops_per_token() * shape.micro_batch * shape.seq
    return {
        "fb_ms": fb_s * 1e3,
        "adamw_ms": adamw_s * 1e3,
        "cast_ms": cast_s * 1e3,
        "achieved_tflops": flops / fb_s / 1e12,
        "hbm_gbps": 28 * shape.numel / adamw_s / 1e9,
        "cast_gbps": 6 * shape.numel / cast_s / 1e9,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- validation, table

SYSTEM_STAGE = {"ddp": 0, "fsdp2": 3, "ds1": 1, "ds2": 2, "ds3": 3}
# One H200, the same machine and day as the constants above: `python3 benchmarks/gpt_throughput.py
# --nprocs 1 --systems z0,z1,z2,z3,fsdp2,ddp --tag 1gpu` (median of 20 steps after 5 warm-up).
MEASURED_1GPU: list[dict[str, object]] = [
    {"impl": impl, "world": 1, "params_M": 1343.3, "seq": 2048, "mbs": 4, "step_ms_median": ms,
     "peak_mem_gib_max": gib, "tag": "1gpu"}
    for impl, ms, gib in [("funczero-z0", 139.5, 32.586), ("funczero-z1", 142.56, 32.586),
                          ("funczero-z2", 142.25, 32.586), ("funczero-z3", 145.85, 30.207),
                          ("fsdp2", 162.21, 30.335), ("ddp", 170.56, 39.48)]
]  # fmt: skip


def measured_rows() -> list[tuple[str, dict[str, object]]]:
    """``(source, JSON line)`` of every GPT step time measured: benchmarks/results, the shared
    anchors (DDP, FSDP2, DeepSpeed) and the one-GPU rows above."""
    rows: list[tuple[str, dict[str, object]]] = [
        ("1xh200 (scale_model.py)", r) for r in MEASURED_1GPU
    ]
    files = sorted((ROOT / "benchmarks" / "results").glob("*.jsonl"))
    files += sorted((ROOT.parent / "shared" / "benchmarks").glob("anchor-*.jsonl"))
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append((path.name, json.loads(line)))
    return rows


def validate(hw: Hardware = Hardware()) -> list[dict[str, object]]:
    """Predicted against measured step times of the 1.34B GPT (funczero and, for reference,
    other systems with the same communication pattern)."""
    out = []
    for source, row in measured_rows():
        if not {"impl", "world", "seq", "mbs", "step_ms_median"} <= row.keys():
            continue  # another benchmark's lines
        impl = str(row["impl"])
        numbered = re.fullmatch(r"funczero-z([0-3])", impl)
        stage = int(numbered[1]) if numbered else SYSTEM_STAGE.get(impl)
        if stage is None or row.get("params_M") not in (1343.3, 1343.4):
            continue
        model = dataclasses.replace(
            preset("gpt-1.3b"), seq=int(row["seq"]), micro_batch=int(row["mbs"])
        )  # type: ignore[arg-type]
        t = step_time(model, Mesh(int(row["world"])), Setup(stage), hw)  # type: ignore[arg-type]
        measured = float(row["step_ms_median"])  # type: ignore[arg-type]
        out.append(
            {
                "source": source,
                "tag": row.get("tag", ""),
                "impl": impl,
                "world": row["world"],
                "funczero": bool(numbered),
                "measured_ms": measured,
                "predicted_ms": t.total_s * 1e3,
                "compute_ms": t.compute_s * 1e3,
                "passes_ms": t.passes_s * 1e3,
                "exposed_ms": t.exposed_s * 1e3,
                "error": t.total_s * 1e3 / measured - 1,
            }
        )
    return out


def table_rows(
    models: Sequence[str],
    worlds: Sequence[int],
    stages: Sequence[int],
    hw: Hardware,
    gpus_per_node: int,
    reduce_bytes: int = 4,
    replica_overlap: bool = True,
) -> list[dict[str, object]]:
    rows = []
    for name in models:
        model = preset(name)
        for world in worlds:
            for stage in stages:
                row: dict[str, object] = {
                    "model": name,
                    "params_B": model.numel / 1e9,
                    "gpus": world,
                    "stage": stage,
                }
                for label, shard in (("flat", world), ("hybrid", min(world, gpus_per_node))):
                    mesh, setup = (
                        Mesh(world, gpus_per_node, shard),
                        Setup(stage, reduce_bytes=reduce_bytes, replica_overlap=replica_overlap),
                    )
                    t = step_time(model, mesh, setup, hw)
                    inter = sum(v[1] for v in bytes_per_gpu(model, mesh, setup).values())
                    row[label] = {
                        "step_ms": t.total_s * 1e3,
                        "exposed_ms": t.exposed_s * 1e3,
                        "efficiency": t.efficiency,
                        "mfu": t.mfu,
                        "inter_gb": inter / 1e9,
                        "state_gib": state_bytes(model, mesh, setup) / 2**30,
                        "tokens_per_s_per_gpu": t.tokens_per_gpu / t.total_s,
                    }
                rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, object]], hbm_gib: float) -> str:
    head = (
        "| model | GPUs | ZeRO | flat: step ms | eff. | MFU | inter-node GB/GPU | states GiB "
        "| hybrid: step ms | eff. | MFU | inter-node GB/GPU | states GiB | faster |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        f, h = r["flat"], r["hybrid"]
        cells = [str(r["model"]), str(r["gpus"]), str(r["stage"])]
        for x in (f, h):
            fits = "" if x["state_gib"] < hbm_gib else " (does not fit)"  # type: ignore[index]
            cells += [
                f"{x['step_ms']:,.0f}",
                f"{x['efficiency']:.2f}",
                f"{x['mfu']:.0%}",  # type: ignore[index]
                f"{x['inter_gb']:.2f}",
                f"{x['state_gib']:.1f}{fits}",
            ]  # type: ignore[index]
        same = r["gpus"] <= 8 or abs(f["step_ms"] / h["step_ms"] - 1) < 0.01  # type: ignore[index,operator]
        cells.append("same" if same else "flat" if f["step_ms"] < h["step_ms"] else "hybrid")  # type: ignore[index,operator]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(model: ModelShape, mesh: Mesh, setup: Setup, hw: Hardware) -> str:
    """Per purpose: calls, bytes at the call, bytes one GPU sends intra/inter node, link time."""
    groups: dict[tuple[str, str, str], list[Call]] = defaultdict(list)
    for call in collective_calls(model, mesh, setup):
        groups[(call.purpose, call.kind, call.group)].append(call)
    lines = [
        "| what | collective | group | calls | MB at the call | intra GB/GPU | inter GB/GPU | link ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (purpose, kind, group), calls in groups.items():
        intra = sum(link_bytes(c, mesh)[0] for c in calls)
        inter = sum(link_bytes(c, mesh)[1] for c in calls)
        ms = sum(hw.seconds(c, mesh) for c in calls) * 1e3
        mb = sum(c.nbytes for c in calls) / 1e6
        lines.append(
            f"| {purpose} | {kind} | {group} | {len(calls)} | {mb:,.1f} | {intra / 1e9:.3f} "
            f"| {inter / 1e9:.3f} | {ms:.2f} |"
        )
    t = step_time(model, mesh, setup, hw)
    lines.append(
        f"\nstep {t.total_s * 1e3:.1f} ms = compute {t.compute_s * 1e3:.1f} + passes "
        f"{t.passes_s * 1e3:.1f} + exposed communication {t.exposed_s * 1e3:.1f}; "
        f"efficiency {t.efficiency:.3f}, MFU {t.mfu:.1%}, model states "
        f"{state_bytes(model, mesh, setup) / 2**30:.1f} GiB per GPU"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _hardware_args(ap: argparse.ArgumentParser) -> None:
    d = Hardware()
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument(
        "--nvlink-gbps", type=float, default=d.nvlink_gbps, help="GB/s per GPU, both directions"
    )
    ap.add_argument(
        "--ib-gbit", type=float, default=d.ib_gbit_per_node, help="Gb/s per node, per direction"
    )
    ap.add_argument("--achieved-tflops", type=float, default=d.achieved_tflops)
    ap.add_argument("--hbm-gbps", type=float, default=d.hbm_gbps)
    ap.add_argument(
        "--latency-us", type=float, nargs=3, default=None, metavar=("BASE", "INTRA", "INTER")
    )


def _hardware(args: argparse.Namespace) -> Hardware:
    lat = dict(zip(("base_latency_us", "intra_step_us", "inter_step_us"), args.latency_us or ()))
    return Hardware(
        nvlink_gbps=args.nvlink_gbps,
        ib_gbit_per_node=args.ib_gbit,
        achieved_tflops=args.achieved_tflops,
        hbm_gbps=args.hbm_gbps,
        **lat,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="flat ZeRO against hybrid (shard inside a node), markdown")
    t.add_argument("--models", default="gpt-1.3b,llama-7b,llama-8b,llama-13b,llama-70b")
    t.add_argument("--worlds", default="8,64,256,1024")
    t.add_argument("--stages", default="1,2,3")
    t.add_argument(
        "--hbm-gib", type=float, default=139.0, help="GPU memory, to flag states that do not fit"
    )
    t.add_argument("--json", action="store_true", help="JSON lines instead of markdown")
    s = sub.add_parser("show", help="one configuration, collective by collective")
    s.add_argument("--preset", default="gpt-1.3b", choices=sorted(PRESETS))
    s.add_argument(
        "--params", type=float, default=None, help="instead of a preset: parameter count"
    )
    s.add_argument("--layers", type=int, default=None)
    s.add_argument("--hidden", type=int, default=None)
    s.add_argument("--seq", type=int, default=None)
    s.add_argument("--micro-batch", type=int, default=None)
    s.add_argument("--world", type=int, default=8)
    s.add_argument("--shard", type=int, default=None, help="shard-group size (default: world)")
    s.add_argument("--stage", type=int, default=3)
    s.add_argument("--grad-accum", type=int, default=1)
    for p in (t, s):
        _hardware_args(p)
        p.add_argument("--reduce-bytes", type=int, default=4, help="4: fp32 reductions, 2: bf16")
        p.add_argument(
            "--replica-overlap", action=argparse.BooleanOptionalAction, default=p is t,
            help="hybrid: the replicas' all-reduce is waited at the end of backward (FSDP2's "
            "HSDP; the table's default) or one unit after it is issued (funczero; show's default)",
        )
    v = sub.add_parser("validate", help="predicted against measured step times (1.34B GPT)")
    _hardware_args(v)
    m = sub.add_parser(
        "measure", help="on one GPU: forward+backward and AdamW times of the 1.34B GPT"
    )
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.command == "measure":
        line = json.dumps(measure(args))
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n")
        return
    hw = _hardware(args)
    if args.command == "table":
        rows = table_rows(
            args.models.split(","),
            [int(w) for w in args.worlds.split(",")],
            [int(x) for x in args.stages.split(",")],
            hw,
            args.gpus_per_node,
            args.reduce_bytes,
            args.replica_overlap,
        )
        print(
            "\n".join(json.dumps(r) for r in rows)
            if args.json
            else markdown_table(rows, args.hbm_gib)
        )
    elif args.command == "show":
        model = preset(args.preset)
        if args.params is not None:
            if not (args.layers and args.hidden and args.seq):
                ap.error("--params needs --layers, --hidden and --seq")
            model = custom_shape(int(args.params), args.layers, args.hidden, seq=args.seq)
        model = dataclasses.replace(
            model, seq=args.seq or model.seq, micro_batch=args.micro_batch or model.micro_batch
        )
        print(
            show(
                model,
                Mesh(args.world, args.gpus_per_node, args.shard),
                Setup(
                    args.stage, args.grad_accum, reduce_bytes=args.reduce_bytes,
                    replica_overlap=args.replica_overlap,
                ),
                hw,
            )
        )
    else:
        print(
            "| source | tag | system | GPUs | measured ms | predicted ms | compute | passes | exposed | error |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in validate(hw):
            print(
                f"| {r['source']} | {r['tag']} | {r['impl']} | {r['world']} | {r['measured_ms']:.1f} "
                f"| {r['predicted_ms']:.1f} | {r['compute_ms']:.1f} | {r['passes_ms']:.1f} "
                f"| {r['exposed_ms']:.1f} | {r['error']:+.1%} |"
            )


if __name__ == "__main__":
    main()
