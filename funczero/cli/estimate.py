"""``funczero estimate``: per-rank training memory before anything is allocated.

The model is built on the meta device (from a factory ``pkg.module:fn`` or a Hugging Face
``config.json``), so a 70B model is estimated on a laptop in seconds. For each ZeRO stage and
world size it gives the bytes one rank holds, by the categories of
:func:`funczero.train.memory.memory_breakdown` (and with its rules: every parameter padded to a
multiple of the world size when sharded, stage 1-2 parameters held as padded gathered buffers,
gradients as :func:`~funczero.train.memory.gradient_bytes` derives them), next to DeepSpeed's
estimate for the same model (its ``estimate_zero{2,3}_model_states_mem_needs`` figures for
mixed-precision Adam). With ``--seq-len`` it adds activations: the bytes autograd saves for
backward, measured on the meta device, without and with activation checkpointing per
transformer block. Offload is not estimated: funczero does not offload.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["ModelFacts", "StageEstimate", "estimate", "estimate_stage", "load_model", "model_facts",
           "optimizer_bytes_per_element"]

_OPT_BYTES = {  # optimizer -> (fp32 bytes per trainable element, bytes of 0-d counters)
    "adamw": (8, 8), "adam": (8, 8), "lamb": (8, 8), "lion": (4, 8), "adagrad": (4, 0),
    "sgd": (0, 0), "sgd-momentum": (4, 0),
}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def optimizer_bytes_per_element(name: str) -> tuple[int, int]:
    """``(bytes per trainable element, bytes of scalar counters)`` of a funczero optimizer.

    Example:
        >>> optimizer_bytes_per_element("AdamW")
        (8, 8)
    """
    key = name.lower()
    if key not in _OPT_BYTES:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(_OPT_BYTES)}")
    return _OPT_BYTES[key]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a model: element counts by parameter, units, buffers.

    Attributes:
        trainable: element count of each trainable parameter (tied parameters once).
        frozen: element count of each parameter with ``requires_grad=False``.
        buffer_bytes: bytes of all buffers.
        largest_layer: elements of the largest parameter (DeepSpeed's ``largest_layer_params``).
        activations: bytes saved for backward per micro-batch without checkpointing, or ``None``.
        activations_checkpointed: the same with each transformer block checkpointed.
    """

    trainable: tuple[int, ...]
    frozen: tuple[int, ...]
    buffer_bytes: int
    largest_layer: int
    activations: int | None = None
    activations_checkpointed: int | None = None

    @property
    def n_trainable(self) -> int:
        return sum(self.trainable)


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """Bytes one rank holds for one stage and world size (keys as ``memory_breakdown``)."""

    stage: int
    world_size: int
    params: int
    grads: int
    master: int
    opt_state: int
    buffers: int
    deepspeed: float
    activations: int | None = None
    activations_checkpointed: int | None = None

    @property
    def total(self) -> int:
        """Model states: params + grads + master + opt_state + buffers (no activations)."""
        return self.params + self.grads + self.master + self.opt_state + self.buffers


def _shard(n: int, w: int) -> int:
    return -(-n // w)


def estimate_stage(facts: ModelFacts, *, stage: int, world_size: int, precision: str = "bf16",
                   optimizer: str = "adamw", grad_accum: int = 1,
                   persistence_threshold: int = 100_000,
                   shard_size: int | None = None) -> StageEstimate:
    """Per-rank bytes of ``facts`` at ZeRO ``stage`` on ``world_size`` ranks.

    ``persistence_threshold`` is ``stage3_param_persistence_threshold``: at stage 3, parameters
    with fewer elements stay replicated in the compute dtype (as gathered, padded buffers).
    ``shard_size`` is hybrid sharding's shard group (``mics_shard_size``): stages 1-3 shard over
    that many ranks and replicate across the groups, so a rank holds what it would on a world
    of ``shard_size`` ranks.

    Example:
        >>> facts = ModelFacts(trainable=(1000,), frozen=(), buffer_bytes=0, largest_layer=1000)
        >>> e = estimate_stage(facts, stage=3, world_size=4, persistence_threshold=0)
        >>> e.params, e.grads, e.master, e.opt_state, e.deepspeed
        (0, 1000, 1000, 2008, 4000.0)
    """
    from funczero.parallel.stages import STAGES

    if stage not in STAGES:
        raise ValueError(f"stage={stage} must be 0, 1, 2 or 3")
    policy = STAGES[stage]
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size={world_size} and grad_accum={grad_accum} must be >= 1")
    if precision not in _ITEMSIZE:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(_ITEMSIZE)}")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1 (mics_shard_size)")
    c, w = _ITEMSIZE[precision], world_size
    if shard_size is not None and policy.master_sharded:
        w = min(shard_size, world_size)
    per_elem, scalars = optimizer_bytes_per_element(optimizer)
    full = facts.n_trainable
    shards = sum(_shard(f, w) for f in facts.trainable)
    padded = shards * w
    frozen = sum(facts.frozen)
    if not policy.master_sharded:
        master, opt = 4 * full, per_elem * full
        params = (0 if c == 4 else c * full) + c * frozen
        grads = 4 * full
    else:
        master, opt = 4 * shards, per_elem * shards
        if policy.params_at_rest == "replicated":
            params = c * padded + c * frozen  # views of the all-gathered unit buffers
        else:  # sharded trainable parameters are their master shards: nothing extra
            kept = [f for f in facts.trainable if f < persistence_threshold]
            params = c * sum(_shard(f, w) * w for f in kept) + sum(
                c * f if f < persistence_threshold else 4 * _shard(f, w) for f in facts.frozen)
        reduced_in_backward = policy.reduces_in_backward(single_micro_batch=grad_accum == 1, world_size=w)
        grads = 4 * shards
        if not reduced_in_backward:
            grads += (c if grad_accum == 1 else 4) * full
    from funczero.train.memory import deepspeed_model_state_bytes

    return StageEstimate(stage, world_size, params, grads, master, opt + (scalars if full else 0),
                         facts.buffer_bytes, deepspeed_model_state_bytes(full, stage, w),
                         facts.activations, facts.activations_checkpointed)


# --- building the model on the meta device ---------------------------------------------------


def load_model(factory: str | None = None, hf_config: str | None = None) -> Any:
    """Build the model on the meta device from ``pkg.module:fn`` or a HF ``config.json``."""
    import torch

    if (factory is None) == (hf_config is None):
        raise ValueError("give either a model factory 'pkg.module:fn' or --hf-config, not both")
    with torch.device("meta"):
        if factory is not None:
            module_name, sep, attr = factory.partition(":")
            if not sep or not attr:
                raise ValueError(f"model factory {factory!r}: expected 'pkg.module:function'")
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like python -m: the user's own modules
            fn: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
            model = fn()
        else:
            model = _hf_model(hf_config)  # type: ignore[arg-type]
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{factory or hf_config} built a {type(model).__name__}, not an nn.Module")
    return model


def _hf_model(path: str) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"--hf-config needs the transformers package ({e}); pip install transformers"
        ) from e
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--hf-config {path}: no such file or directory")
    config = transformers.AutoConfig.from_pretrained(str(p.parent if p.is_file() else p))
    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        return transformers.AutoModel.from_config(config)


def _saved_bytes(model: Any, ids: Any, units: Sequence[str]) -> tuple[int, int]:
    """Bytes saved for backward by one forward (+ loss), without and with unit checkpointing."""
    import torch

    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    keep: list[Any] = []
    active: list[str] = [""]
    saved: dict[str, int] = {}
    inputs: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
            saved[active[-1]] = saved.get(active[-1], 0) + base.numel() * base.element_size()
        return t

    modules = dict(model.named_modules())
    handles = []
    for name in units:
        def pre(_m: Any, args: Any, name: str = name) -> None:
            active.append(name)
            inputs[name] = sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

        def post(_m: Any, _a: Any, _o: Any) -> None:
            active.pop()

        handles += [modules[name].register_forward_pre_hook(pre),
                    modules[name].register_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids)
            logits = getattr(out, "logits", out)
            if torch.is_tensor(logits) and logits.dim() == 3:
                torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    finally:
        for h in handles:
            h.remove()
    outside = saved.get("", 0)
    inside = [saved.get(u, 0) for u in units]
    return outside + sum(inside), outside + sum(inputs.values()) + max(inside, default=0)


def model_facts(model: Any, *, precision: str = "bf16", micro_batch: int | None = None,
                seq_len: int | None = None) -> ModelFacts:
    """Parameter counts (tied once), buffers, and activations when a token batch is given."""
    import torch

    from funczero.parallel.plan import default_wrap_policy

    seen: set[int] = set()
    trainable, frozen = [], []
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (trainable if p.requires_grad else frozen).append(p.numel())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    largest = max(trainable + frozen, default=0)
    act = act_ckpt = None
    if seq_len is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        model = model.to(dtype)
        ids = torch.zeros(micro_batch or 1, seq_len, dtype=torch.long, device="meta")
        act, act_ckpt = _saved_bytes(model, ids, default_wrap_policy(model))
    return ModelFacts(tuple(trainable), tuple(frozen), buffer_bytes, largest, act, act_ckpt)


def estimate(facts: ModelFacts, *, stages: Sequence[int], world_sizes: Sequence[int],
             **options: Any) -> list[StageEstimate]:
    """:func:`estimate_stage` for every stage and world size (``options`` passed on)."""
    return [estimate_stage(facts, stage=s, world_size=w, **options)
            for w in world_sizes for s in stages]


# --- the command ---------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} {text!r}: expected integers separated by commas") from None
    if not values or min(values) < 0:
        raise typer.BadParameter(f"{what} {text!r}: expected non-negative integers")
    return values


def estimate_command(
    factory: Annotated[str | None, typer.Argument(
        metavar="[MODEL_FACTORY]", help="'pkg.module:fn' returning the model (built on meta).")] = None,
    hf_config: Annotated[str | None, typer.Option(
        "--hf-config", help="A Hugging Face config.json (or its directory) instead of a factory.")] = None,
    world_size: Annotated[str, typer.Option(
        "--world-size", "-w", help="Comma-separated world sizes (ignored with --nodes).")] = "1,2,4,8",
    nodes: Annotated[str | None, typer.Option(
        "--nodes", help="Comma-separated node counts; world size = nodes * --gpus-per-node.")] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1)] = 8,
    stage: Annotated[str, typer.Option("--stage", "-s", help="Comma-separated ZeRO stages.")] = "0,1,2,3",
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16.")] = "bf16",
    optimizer: Annotated[str, typer.Option(
        "--optimizer", help="adamw, adam, lamb, lion, adagrad, sgd or sgd-momentum.")] = "adamw",
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1)] = 1,
    persistence_threshold: Annotated[int, typer.Option(
        "--persistence-threshold", min=0,
        help="stage3_param_persistence_threshold: smaller parameters stay replicated.")] = 100_000,
    shard_size: Annotated[int | None, typer.Option(
        "--shard-size", min=1,
        help="Hybrid sharding (mics_shard_size): shard stages 1-3 over groups of this many ranks.")] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1)] = 1,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", min=1, help="Token sequence length: adds activations (token-id models).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Estimate per-rank memory (params, grads, master, optimizer, activations) per stage and size."""
    try:
        stages = _ints(stage, "--stage")
        sizes = ([n * gpus_per_node for n in _ints(nodes, "--nodes")] if nodes
                 else _ints(world_size, "--world-size"))
        if min(sizes) < 1:
            raise typer.BadParameter("world sizes must be >= 1")
        model = load_model(factory, hf_config)
        facts = model_facts(model, precision=precision, micro_batch=micro_batch, seq_len=seq_len)
        rows = estimate(facts, stages=stages, world_sizes=sizes, precision=precision,
                        optimizer=optimizer, grad_accum=grad_accum,
                        persistence_threshold=persistence_threshold, shard_size=shard_size)
    except (ValueError, TypeError, ImportError, OSError, AttributeError) as e:
        typer.echo(f"funczero estimate: error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        out = {"trainable_params": facts.n_trainable, "frozen_params": sum(facts.frozen),
               "largest_layer": facts.largest_layer,
               "rows": [{**dataclasses.asdict(r), "total": r.total} for r in rows]}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    _print_table(facts, rows, precision, optimizer, gpus_per_node if nodes else None)


def _print_table(facts: ModelFacts, rows: Sequence[StageEstimate], precision: str,
                 optimizer: str, gpus_per_node: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{facts.n_trainable:,} trainable parameters"
             f"{f' + {sum(facts.frozen):,} frozen' if facts.frozen else ''}, "
             f"{precision}, {optimizer}: GiB per rank")
    table = Table(title=title, title_justify="left")
    headers = ["ranks", "stage", "params", "grads", "master", "optimizer", "buffers", "total",
               "DeepSpeed"]
    if rows and rows[0].activations is not None:
        headers += ["+ activations", "+ act. (ckpt)"]
    for h in headers:
        table.add_column(h, justify="right")
    for r in rows:
        ranks = str(r.world_size) if not gpus_per_node else (
            f"{r.world_size} ({r.world_size // gpus_per_node}x{gpus_per_node})")
        cells = [ranks, str(r.stage), *map(_gib, (r.params, r.grads, r.master, r.opt_state,
                                                  r.buffers, r.total, r.deepspeed))]
        if r.activations is not None:
            cells += [_gib(r.total + r.activations), _gib(r.total + (r.activations_checkpointed or 0))]
        table.add_row(*cells)
    console = Console(markup=False, highlight=False, width=max(Console().width, 130))
    console.print(table)
    console.print("DeepSpeed: its ZeRO-paper model-state figure (16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N) for "
                  "mixed-precision Adam; docs/zero.md explains where funczero differs. Activations "
                  "are per micro-batch, at the stage's peak they add to the total.")
