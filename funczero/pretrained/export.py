"""``export_pretrained``: a Hugging Face model directory from a training state or checkpoint.

The directory holds what ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` opens:
``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` when the weights exceed ``max_shard_size``) and the
``config.json`` the user gives, its ``torch_dtype``/``dtype`` set to the exported dtype.

Keys are module names. Trained parameters come from the fp32 master weights, frozen ones from
the parameters; floating-point parameters are cast to ``dtype``, buffers keep theirs. A tied
weight is written under every name of the tie (safetensors stores no shared tensors, and a
model that does not declare the tie in its config still gets both).

From a state the export is collective: parameters are gathered one at a time (every rank holds
at most one full parameter on top of its state) and rank 0 writes. From a checkpoint directory
it runs in one process and streams (``funczero.checkpoint.consolidate``). Either way files are
written under temporary names and renamed into place once all are complete; existing weights
in ``out_dir`` are replaced only with ``overwrite=True`` (stale shards of a previous export are
then removed, never other files).

Example:
    >>> import json, tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import load_file
    >>> from funczero import optim
    >>> from funczero.parallel.plan import build_plan
    >>> from funczero.train.state import init_state
    >>> model = torch.nn.Linear(3, 1)
    >>> plan = build_plan(model, stage=3)
    >>> state = init_state(plan, optim.sgd(0.1), dict(model.named_parameters()), {})
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    >>> files = export_pretrained(state, d / "out", config_json=d / "config.json", dtype="fp32")
    >>> sorted(p.name for p in files), sorted(load_file(d / "out" / "model.safetensors"))
    (['config.json', 'model.safetensors'], ['bias', 'weight'])
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

from funczero.parallel.sharding import ShardSpec
from funczero.pretrained.collective import agree, check_world, state_device
from funczero.pretrained.errors import WeightsFormatError
from funczero.train.state import TrainState

if TYPE_CHECKING:
    from funczero.parallel.plan import ZeroPlan

__all__ = ["export_pretrained"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Files next to config.json that make the directory a complete model (copied when present).
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


class _Entry(NamedTuple):
    key: str  # the name in the output file
    leaf: str  # the state leaf it comes from (params/..., master/..., buffers/...)
    name: str  # the parameter or buffer name
    dtype: torch.dtype
    shape: tuple[int, ...]


def export_pretrained(
    state_or_checkpoint_dir: TrainState | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config_json: str | os.PathLike[str] | None = None,
    dtype: str = "bf16",
    max_shard_size: int | str | None = "5GB",
    plan: ZeroPlan | None = None,
    tag: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a Hugging Face model directory (see the module docstring).

    Args:
        state_or_checkpoint_dir: a :class:`~funczero.TrainState` (collective: every rank
            calls) or a funczero checkpoint directory (root or tag; one process).
        out_dir: the model directory to write (created).
        config_json: the model's ``config.json``, or a directory holding it (then
            ``generation_config.json`` and tokenizer files there are copied too). ``None``
            writes the weights only.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for floating-point parameters.
        max_shard_size: largest weights file (``"5GB"``: 5e9 bytes, ``"2GiB"``); a larger
            tensor gets a file of its own. ``None``: one file.
        plan: the state's plan: its process group, and which buffers are persistent (only
            those are written, as ``state_dict()`` has them; without a plan, every buffer).
        tag: which checkpoint of a checkpoint root (default ``latest``).
        overwrite: replace weights already in ``out_dir``.

    Returns:
        The files written (on rank 0; other ranks get the same list).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    from funczero.checkpoint.consolidation import parse_size

    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    configs = _config_files(config_json)
    out = Path(out_dir)
    if isinstance(state_or_checkpoint_dir, TrainState):
        return _export_state(state_or_checkpoint_dir, out, configs, dtype, limit, plan, overwrite)
    return _export_checkpoint(Path(state_or_checkpoint_dir), out, configs, dtype, limit, tag, overwrite)


def _config_files(config_json: str | os.PathLike[str] | None) -> list[Path]:
    """The files to copy: ``config.json`` first (checked to be a JSON object)."""
    if config_json is None:
        return []
    src = Path(config_json)
    config = src / "config.json" if src.is_dir() else src
    if not config.is_file():
        where = f"directory {src} has no config.json" if src.is_dir() else f"{src} does not exist"
        raise FileNotFoundError(
            f"config_json: {where}; pass the config.json of the model you fine-tuned (the "
            "Hugging Face directory it was loaded from holds one)"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsFormatError(f"config_json: {config} is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise WeightsFormatError(f"config_json: {config} holds a JSON {type(parsed).__name__}, not an object")
    files = [config]
    if src.is_dir():
        files += [src / n for n in COMPANION_FILES if (src / n).is_file()]
    return files


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a directory")
    existing = sorted(p.name for p in out.iterdir() if _WEIGHT_FILE.fullmatch(p.name)) if out.exists() else []
    if existing and not overwrite:
        from funczero.checkpoint.errors import CheckpointExistsError

        raise CheckpointExistsError(
            f"{out} already holds model weights ({', '.join(existing[:4])}); pass "
            "overwrite=True (--overwrite) or choose another directory"
        )


def _finish_dir(out: Path, written: Sequence[Path], configs: Sequence[Path], dtype: str) -> list[Path]:
    """Copy the config files, remove stale weights of an earlier export, fsync."""
    from funczero.checkpoint.atomic import fsync_dir

    done = list(written)
    for src in configs:
        data = src.read_bytes()
        if src == configs[0]:
            config = json.loads(data)
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            config.update({k: _HF_DTYPE_NAMES[dtype] for k in keys})
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        done.append(_atomic_write(out / ("config.json" if src == configs[0] else src.name), data))
    keep = {p.name for p in written}
    for p in out.iterdir():
        if _WEIGHT_FILE.fullmatch(p.name) and p.name not in keep:
            p.unlink()
    fsync_dir(out)
    return done


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_checkpoint(
    directory: Path,
    out: Path,
    configs: list[Path],
    dtype: str,
    limit: int | None,
    tag: str | None,
    overwrite: bool,
) -> list[Path]:
    from funczero.checkpoint.consolidation import consolidate
    from funczero.checkpoint.tags import resolve

    tag_dir = resolve(directory, tag)  # raises before anything is written
    _check_out_dir(out, overwrite)
    written = consolidate(tag_dir, out, dtype=dtype, max_shard_size=limit, overwrite=True)
    return _finish_dir(out, written, configs, dtype)


def _entries(state: TrainState, plan: ZeroPlan | None, dtype: torch.dtype) -> list[_Entry]:
    """What is written, in order: every parameter under each of its names, then buffers."""
    layout = state.layout
    aliases: dict[str, list[str]] = {}
    for alias, canonical in layout.aliases:
        aliases.setdefault(canonical, []).append(alias)
    out: list[_Entry] = []
    for name, shape in layout.shapes:
        leaf = f"master/{name}" if name in state.master else f"params/{name}"
        stored = (state.master if name in state.master else state.params)[name].dtype
        out_dtype = dtype if stored.is_floating_point else stored
        for key in [name, *sorted(aliases.get(name, []))]:
            out.append(_Entry(key, leaf, name, out_dtype, tuple(shape)))
    persistent = None if plan is None else set(plan.module.state_dict(keep_vars=True))
    for name, b in state.buffers.items():
        if persistent is None or name in persistent:
            out.append(_Entry(name, f"buffers/{name}", name, b.dtype, tuple(b.shape)))
    return out


def _shard_groups(entries: list[_Entry], limit: int | None) -> list[list[_Entry]]:
    groups: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = torch.Size(e.shape).numel() * e.dtype.itemsize
        if limit is not None and groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    return groups


def _file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _export_state(
    state: TrainState,
    out: Path,
    configs: list[Path],
    dtype: str,
    limit: int | None,
    plan: ZeroPlan | None,
    overwrite: bool,
) -> list[Path]:
    layout = state.layout
    group = plan.group if plan is not None else None
    check_world(layout, group)
    # Hybrid sharding: rank 0 of every replica holds the same shards; only the first writes.
    writer_rank = layout.rank == 0 and (plan is None or plan.data_parallel_rank == 0)
    device = state_device(state)
    failure: BaseException | None = None
    try:
        if writer_rank:
            _check_out_dir(out, overwrite)
            out.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - every rank raises together in agree
        failure = e
    agree(failure, layout, group, device, what="exporting the model")
    groups = _shard_groups(_entries(state, plan, DTYPES[dtype]), limit)
    names = _file_names(len(groups))
    files = _Files(out, names, groups, layout, active=writer_rank)
    for entry, value in _gathered(state, [e for g in groups for e in g], group):
        files.append(entry, value)  # records a write error on rank 0 and goes on gathering
    written: list[Path] = []
    failure = files.failure
    if writer_rank and failure is None:
        try:
            written = files.publish()
            written = _finish_dir(out, written, configs, dtype)
        except Exception as e:  # noqa: BLE001
            failure = e
    files.cleanup()
    agree(failure, layout, group, device, what="exporting the model")
    return written if writer_rank else [out / n for n in names]


def _gathered(
    state: TrainState, entries: list[_Entry], group: Any
) -> Iterator[tuple[_Entry, torch.Tensor]]:
    """Each entry's full value (gathered when sharded; collective), one parameter at a time."""
    layout = state.layout
    leaves = layout.leaf_map()
    last: tuple[str, torch.Tensor] | None = None
    for e in entries:
        if last is not None and last[0] == e.leaf:
            yield e, last[1]  # another name of the same tied parameter
            continue
        kind, _, name = e.leaf.partition("/")
        tensor = {"master": state.master, "params": state.params, "buffers": state.buffers}[kind][name]
        lay = leaves[e.leaf]
        if lay.placement == "shard":
            full = _all_gather_shard(tensor, ShardSpec(name, torch.Size(lay.shape), layout.world_size), group)
        elif lay.placement == "replicated":
            full = tensor.detach().reshape(lay.shape)
        else:
            raise ValueError(f"state leaf {e.leaf} is laid out per rank and cannot be exported")
        last = (e.leaf, full)
        yield e, full


def _all_gather_shard(shard: torch.Tensor, spec: ShardSpec, group: Any) -> torch.Tensor:
    if spec.world_size == 1:
        return shard.detach()[: spec.numel].view(spec.shape)
    buf = shard.new_empty(spec.padded_numel)
    dist.all_gather(list(buf.chunk(spec.world_size)), shard.detach().contiguous(), group=group)
    return buf[: spec.numel].view(spec.shape)


class _Files:
    """Rank 0's output files, streamed in order; a write error is kept, not raised mid-gather."""

    def __init__(
        self, out: Path, names: list[str], groups: list[list[_Entry]], layout: Any, *, active: bool
    ) -> None:
        self.out = out
        self.active = active
        self.failure: BaseException | None = None
        self._nonce = uuid.uuid4().hex[:12]
        self._plan = [(name, group) for name, group in zip(names, groups)]
        self._temps: list[Path] = []
        self._writer: Any = None
        self._pending: list[_Entry] = []
        self._meta = {
            "format": "pt",
            "funczero_tied": json.dumps(dict(layout.aliases), sort_keys=True),
        }

    def _next_file(self) -> None:
        from funczero.checkpoint.tensorfile import TensorFileWriter

        if self._writer is not None:
            self._writer.finish()
        name, group = self._plan[len(self._temps)]
        tmp = self.out / f".{name}.tmp-{self._nonce}"
        self._temps.append(tmp)
        self._writer = TensorFileWriter(tmp, [(e.key, e.dtype, e.shape) for e in group], self._meta)
        self._pending = list(group)

    def append(self, entry: _Entry, value: torch.Tensor) -> None:
        if not self.active or self.failure is not None:
            return
        try:
            if not self._pending:
                self._next_file()
            expected = self._pending.pop(0)
            if expected != entry:  # the gather order is the file order; never write out of it
                raise RuntimeError(f"export wrote {entry.key} where {expected.key} belongs")
            self._writer.append(value.to(device="cpu", dtype=entry.dtype).contiguous())
        except Exception as e:  # noqa: BLE001 - raised by every rank after the last gather
            self.failure = e

    def publish(self) -> list[Path]:
        """Finish the last file and rename every file into place; write the index if sharded."""
        if self._writer is not None:
            self._writer.finish()
            self._writer = None
        while len(self._temps) < len(self._plan):  # files of nothing but empty tensors
            self._next_file()
            self._writer.finish()
            self._writer = None
        written = []
        for tmp, (name, _) in zip(self._temps, self._plan):
            os.replace(tmp, self.out / name)
            written.append(self.out / name)
        if len(self._plan) > 1:
            weight_map = {e.key: name for name, group in self._plan for e in group}
            total = sum(
                torch.Size(e.shape).numel() * e.dtype.itemsize for _, g in self._plan for e in g
            )
            text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            written.append(_atomic_write(self.out / "model.safetensors.index.json", (text + "\n").encode()))
        return written

    def cleanup(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
