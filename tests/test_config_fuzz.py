"""Fuzzing ``Config.load`` with mutants of the example configs: every failure is a ConfigError.

A fixed seed makes every run test the same few hundred mutants (byte-level damage, hostile
numbers and nesting, and structural edits of the parsed JSON). Each mutant either loads, and
then its saved form reloads to an equal config and the runtime objects build from it, or is
rejected with a :class:`ConfigError`, within a bounded time.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

from funczero.config import Config, ConfigError
from funczero.config.jsonc import loads
from funczero.from_config import (
    loss_scale_from_config,
    optimizer_from_config,
    precision_from_config,
    schedule_from_config,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.json"))
SEED = 15
MUTANTS = 400

HOSTILE_TEXT = [
    b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf", b"NaN", b"Infinity", b"-Infinity",
    b"1e999", b"1" * 400, b"1e308", b"-1", b"0", b"2.5", b"[" * 5000, b"{" * 300,
    b'"auto"', b"//", b"/*", b"#", b",", b",]", b"}", b'"\\ud800"', b"true", b"null",
    b'"' + b"x" * 5000 + b'"', b"\n", b"\\", b"\xe2\x80\xa8",
]
HOSTILE_VALUES: list[Any] = [
    10**400, 10**309, 2**63, -(2**63) - 1, 1e308, -1e308, float("nan"), float("inf"), -1, 0,
    0.5, -0.0, 1e-320, "auto", "", "x" * 5000, None, True, False, [], {}, [1, 2, 3],
    {"enabled": True}, {"stage": 3}, [[[[[[[[]]]]]]]],
]


def _mutate_text(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    j = min(len(data), i + rng.randrange(1, 64))
    choice = rng.randrange(7)
    if choice == 0:
        return data[:i] + rng.choice(HOSTILE_TEXT) + data[i:]
    if choice == 1:
        return data[:i] + rng.choice(HOSTILE_TEXT) + data[j:]
    if choice == 2:
        return data[:i] + data[j:]
    if choice == 3:
        return data[:i]
    if choice == 4:
        return data[:j] + data[i:j] * rng.randrange(2, 2000) + data[j:]
    if choice == 5:
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:] if i < len(
            data) else data
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _mutate_tree(rng: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    for _ in range(rng.randrange(1, 4)):
        path = rng.choice(_paths(config)[1:])
        parent = config
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        choice = rng.randrange(4)
        if choice == 0 or isinstance(parent, list):
            parent[last] = rng.choice(HOSTILE_VALUES)
        elif choice == 1:
            del parent[last]
        elif choice == 2:
            parent[last + rng.choice(["", "s", "_x"])[: rng.randrange(3)] + "\u00e9"] = 1
        else:
            parent[last] = parent[last] * 3 if isinstance(parent[last], (int, float)) else {}
    return config


def _check_loaded(cfg: Config, tmp_path: Path) -> None:
    """A config that loads is saved, reloads equal, and builds every runtime object."""
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(cfg.to_dict(), allow_nan=False), encoding="utf-8")
    assert Config.load(saved, world_size=cfg.world_size) == cfg
    precision_from_config(cfg)
    loss_scale_from_config(cfg)
    if cfg.optimizer is not None:
        # Global shapes, as initialize passes them (the examples turn weight-decay masks on).
        optimizer_from_config(cfg, shapes={"w": (4, 4), "b": (4,)})
    elif cfg.scheduler is not None:
        schedule_from_config(cfg, base_lr=1e-3)


def test_mutated_example_configs_fail_only_with_config_errors(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    bases = [p.read_bytes() for p in EXAMPLES]
    assert bases, "examples/configs/*.json not found"
    outcomes = {"loaded": 0, "rejected": 0}
    slowest = 0.0
    started = time.process_time()  # CPU time: other processes on a shared machine do not count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in range(MUTANTS):
            base = rng.choice(bases)
            if n % 2:
                data = _mutate_text(rng, base)
                path = tmp_path / f"mutant{n}.json"
                path.write_bytes(data)
                source: Any = path
                shown = repr(data[:200])
            else:
                source = _mutate_tree(rng, loads(base.decode("utf-8")))
                shown = repr(source)[:200]
            world_size = rng.choice([1, 2, 3, 4, 8, 64])
            one = time.process_time()
            try:
                cfg = Config.load(source, world_size=world_size)
            except ConfigError:
                outcomes["rejected"] += 1
            except Exception as e:  # noqa: BLE001 - the point of the test
                raise AssertionError(f"mutant {n} raised {e!r}, not a ConfigError: {shown}") from e
            else:
                outcomes["loaded"] += 1
                _check_loaded(cfg, tmp_path)
            slowest = max(slowest, time.process_time() - one)
    assert outcomes["loaded"] > 20 and outcomes["rejected"] > 100, outcomes
    assert slowest < 1.0, f"one mutant took {slowest:.2f} s of CPU"
    assert time.process_time() - started < 10.0
