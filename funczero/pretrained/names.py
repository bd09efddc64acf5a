"""Matching a checkpoint's tensor names to a model's parameters and buffers.

Checkpoint keys go through three steps:

1. ``name_map``: a dict (``{checkpoint key: model name}``, ``None`` drops the key) or a callable
   (``key -> model name or None``); keys it does not mention are kept;
2. a prefix: Hugging Face checkpoints of ``*ForCausalLM`` models name the body ``model.`` or
   ``transformer.``; a model built as the bare body (or wrapped one level deeper) sees the same
   weights under other names. ``prefix="model."`` strips that prefix from the keys that have
   it; ``prefix=None`` tries stripping (or adding) each leading component of the names and keeps
   the variant that names the most model tensors (no change unless it matches more);
3. ties: a key naming any alias of a tied parameter (``lm_head.weight`` tied to
   ``model.embed_tokens.weight``) loads the canonical parameter. When the checkpoint holds
   several copies of one tied parameter, the copy under the canonical name is read and the
   others must hold the same values (checked while loading).

Example:
    >>> from funczero.pretrained.sources import SourceTensor
    >>> f32 = __import__("torch").float32
    >>> m = match_names({"model.w": SourceTensor((2,), f32), "lm_head.weight": SourceTensor((2,), f32)},
    ...                 shapes={"w": (2,)}, aliases={"head": "w"})
    >>> m.params, m.unexpected, m.rename
    ({'w': 'model.w'}, ['lm_head.weight'], "strip 'model.'")
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

from funczero.pretrained.sources import SourceTensor

__all__ = ["NameMap", "WeightMatch", "match_names"]

NameMap = Mapping[str, str | None] | Callable[[str], str | None]
"""Renames checkpoint keys to model names (``None``: skip the key)."""


@dataclasses.dataclass(frozen=True)
class WeightMatch:
    """Which checkpoint key fills which model tensor, and what does not fit.

    Attributes:
        params: canonical parameter -> checkpoint key holding its values.
        buffers: buffer name -> checkpoint key.
        tied_copies: canonical parameter -> further checkpoint keys holding the same tied
            weight (their values must equal the one read).
        missing, unexpected, mismatched: the problems (see
            :class:`~funczero.pretrained.errors.WeightsMismatchError`).
        rename: the prefix change applied (``"strip 'model.'"``, ``"add 'model.'"`` or
            ``"none"``), for messages.
    """

    params: dict[str, str]
    buffers: dict[str, str]
    tied_copies: dict[str, list[str]]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    rename: str


def match_names(
    tensors: Mapping[str, SourceTensor],
    *,
    shapes: Mapping[str, tuple[int, ...]],
    aliases: Mapping[str, str] | None = None,
    buffers: Mapping[str, tuple[int, ...]] | None = None,
    required_buffers: Iterable[str] = (),
    source_ties: Mapping[str, str] | None = None,
    name_map: NameMap | None = None,
    prefix: str | None = None,
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> WeightMatch:
    """Match checkpoint keys to the model's tensors (see the module docstring).

    Args:
        tensors: the checkpoint's tensors by key.
        shapes: every canonical parameter's shape.
        aliases: tied parameters, alias name -> canonical name.
        buffers: the model's buffers by name (loaded when the checkpoint has them).
        required_buffers: buffers reported missing when absent (persistent ones).
        source_ties: ties the checkpoint records (alias key -> stored key).
        name_map: renames keys first.
        prefix: a prefix to strip from keys; ``None`` detects one.
        ignore_unexpected, ignore_missing: regular expressions (``re.search``) of names not
            reported (a Hugging Face model's ``_keys_to_ignore_on_load_*``).
    """
    buffers = dict(buffers or {})
    canonical_of = {n: n for n in shapes}
    canonical_of.update({a: c for a, c in (aliases or {}).items() if c in shapes})
    mismatched: list[str] = []
    renamed = _apply_name_map(tensors, name_map, mismatched)
    targets = set(canonical_of) | set(buffers)
    rename, transform = _choose_prefix(list(renamed), targets, prefix)

    skip_unexpected = [re.compile(p) for p in ignore_unexpected]
    groups: dict[str, list[tuple[str, str]]] = {}
    matched_buffers: dict[str, str] = {}
    unexpected: list[str] = []
    for name, key in renamed.items():
        target = transform(name)
        if target in canonical_of:
            groups.setdefault(canonical_of[target], []).append((target, key))
        elif target in buffers and target not in matched_buffers:
            matched_buffers[target] = key
        elif not any(p.search(target) for p in skip_unexpected):
            unexpected.append(key)
    for alias_key, stored_key in (source_ties or {}).items():
        # A tie stored once in the checkpoint fills a model that keeps the two apart.
        target = transform(renamed_name(alias_key, name_map))
        if target in canonical_of and canonical_of[target] not in groups and stored_key in tensors:
            groups[canonical_of[target]] = [(target, stored_key)]

    skip_missing = [re.compile(p) for p in ignore_missing]
    params: dict[str, str] = {}
    tied_copies: dict[str, list[str]] = {}
    missing: list[str] = []
    for name, shape in shapes.items():
        found = groups.get(name)
        if not found:
            if not any(p.search(name) for p in skip_missing):
                missing.append(name)
            continue
        found.sort(key=lambda tk: tk[0] != name)  # the copy under the canonical name first
        params[name] = found[0][1]
        tied_copies.update({name: [k for _, k in found[1:]]} if len(found) > 1 else {})
        for _, key in found:
            _check_shape(key, name, tensors[key].shape, tuple(shape), mismatched)
    for name, key in matched_buffers.items():
        _check_shape(key, name, tensors[key].shape, tuple(buffers[name]), mismatched)
    missing += [
        b for b in required_buffers
        if b not in matched_buffers and not any(p.search(b) for p in skip_missing)
    ]  # fmt: skip
    return WeightMatch(params, matched_buffers, tied_copies, missing, unexpected, mismatched, rename)


def renamed_name(key: str, name_map: NameMap | None) -> str:
    """``key`` after ``name_map`` (itself when the map does not mention it or drops it)."""
    if name_map is None:
        return key
    new = name_map(key) if callable(name_map) else name_map.get(key, key)
    return key if new is None else new


def _apply_name_map(
    tensors: Mapping[str, SourceTensor], name_map: NameMap | None, mismatched: list[str]
) -> dict[str, str]:
    """``{new name: checkpoint key}`` after ``name_map``, without the keys it drops."""
    out: dict[str, str] = {}
    for key in tensors:
        if name_map is None:
            new: str | None = key
        elif callable(name_map):
            new = name_map(key)
        else:
            new = name_map.get(key, key)
        if new is None:
            continue
        if not isinstance(new, str):
            raise TypeError(f"name_map({key!r}) returned {new!r}; return a str or None")
        if new in out:
            mismatched.append(f"{new}: checkpoint keys {out[new]!r} and {key!r} both map to it")
            continue
        out[new] = key
    return out


def _choose_prefix(
    names: list[str], targets: set[str], prefix: str | None
) -> tuple[str, Callable[[str], str]]:
    def strip(p: str) -> Callable[[str], str]:
        return lambda n: n.removeprefix(p)

    def add(p: str) -> Callable[[str], str]:
        return lambda n: p + n

    if prefix is not None:
        return (f"strip {prefix!r}" if prefix else "none"), strip(prefix)
    candidates: list[tuple[str, Callable[[str], str]]] = [("none", lambda n: n)]
    candidates += [(f"strip {p!r}", strip(p)) for p in _leading(names)]
    candidates += [(f"add {p!r}", add(p)) for p in _leading(targets)]
    scores = [sum(fn(n) in targets for n in names) for _, fn in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], i == 0))
    return candidates[best]


def _leading(names: Iterable[str], depth: int = 2) -> list[str]:
    """Distinct leading components of dotted names (``model.``, ``base_model.model.``)."""
    out: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        for k in range(1, min(depth, len(parts) - 1) + 1):
            out[".".join(parts[:k]) + "."] = None
    return list(out)


def _check_shape(
    key: str, name: str, got: tuple[int, ...], want: tuple[int, ...], mismatched: list[str]
) -> None:
    if got != want:
        where = name if key == name else f"{name} (checkpoint key {key})"
        mismatched.append(f"{where}: shape {list(got)} in the checkpoint, {list(want)} in the model")
