"""FLOPs per token, device peak FLOPS and model FLOPs utilisation (MFU).

MFU = achieved model FLOPs per second / the devices' peak, with the model FLOPs of one token's
forward and backward from either formula:

* :func:`transformer_flops_per_token`: ``6 N + 12 L d T`` (PaLM, appendix B: ``N`` non-embedding
  parameters, ``L`` layers, width ``d``, context ``T``);
* :func:`count_flops_per_token`: counted by ``torch.utils.flop_counter`` over one forward and
  backward of the real model built on the meta device (no memory, no compute), which also gives
  a per-module table.

This is what DeepSpeed's ``flops_profiler`` block reports (FLOPs per step, TFLOPS, and the
top modules); funczero counts once up front instead of hooking every module during a step.

Example:
    >>> transformer_flops_per_token(n_params=1_000_000, n_layers=4, d_model=128, seq_len=128)
    6786432
    >>> round(mfu(flops_per_token=6e9, tokens_per_second=50_000, peak_flops=989e12), 3)
    0.303
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FlopsCount",
    "count_flops_per_token",
    "mfu",
    "peak_flops",
    "transformer_flops_per_token",
]

# Dense (not sparsity) peak FLOPS per device from the vendors' data sheets, by dtype class:
# "16" = bf16/fp16 tensor cores, "32" = plain fp32 (no TF32).
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"16": 989.4e12, "32": 66.9e12}),
    ("H100 PCIE", {"16": 756.5e12, "32": 51.2e12}),
    ("H100", {"16": 989.4e12, "32": 66.9e12}),
    ("GH200", {"16": 989.4e12, "32": 66.9e12}),
    ("A100", {"16": 312e12, "32": 19.5e12}),
    ("L40S", {"16": 362.05e12, "32": 91.6e12}),
    ("L4", {"16": 121e12, "32": 30.3e12}),
    ("A10G", {"16": 70e12, "32": 31.2e12}),
    ("V100", {"16": 125e12, "32": 15.7e12}),
)


def transformer_flops_per_token(
    *, n_params: int, n_layers: int, d_model: int, seq_len: int, n_embedding_params: int = 0
) -> int:
    """Training FLOPs (forward + backward) per token of a decoder-only transformer.

    ``6 (N - E) + 12 L d T``: 6 FLOPs per non-embedding parameter (2 forward, 4 backward) plus the
    attention scores and their use, ``2 * 2 * L * d * T`` forward, three times that in all.

    Args:
        n_params: parameter count ``N``.
        n_layers, d_model, seq_len: ``L``, ``d``, ``T``.
        n_embedding_params: ``E``, embedding parameters to leave out (lookups cost no FLOPs; a
            tied output projection does, so leave it in).
    """
    for name, v in (("n_params", n_params), ("n_layers", n_layers), ("d_model", d_model),
                    ("seq_len", seq_len), ("n_embedding_params", n_embedding_params)):
        if v < 0:
            raise ValueError(f"{name}={v} must be >= 0")
    return 6 * (n_params - n_embedding_params) + 12 * n_layers * d_model * seq_len


@dataclasses.dataclass(frozen=True)
class FlopsCount:
    """The result of :func:`count_flops_per_token`.

    Attributes:
        per_token: training FLOPs per token (forward, backward, and ``recompute_fwd_factor`` of
            the forward again).
        forward: forward FLOPs of the counted batch.
        backward: backward FLOPs of the counted batch.
        tokens: tokens in the counted batch.
        modules: FLOPs (forward + backward) by module name, as ``torch.utils.flop_counter``
            reports them (``"Global"`` is the total).
    """

    per_token: float
    forward: int
    backward: int
    tokens: int
    modules: Mapping[str, int]

    def table(self, *, depth: int = -1, top: int = 1) -> list[tuple[str, int]]:
        """The ``top`` modules by FLOPs at each depth up to ``depth`` (-1: every depth).

        DeepSpeed's ``module_depth`` and ``top_modules``: depth 0 is the model itself.
        """
        by_depth: dict[int, list[tuple[str, int]]] = {}
        for name, flops in self.modules.items():
            if name == "Global":
                continue
            d = name.count(".")
            if depth < 0 or d <= depth:
                by_depth.setdefault(d, []).append((name, flops))
        rows: list[tuple[str, int]] = []
        for d in sorted(by_depth):
            rows += sorted(by_depth[d], key=lambda r: -r[1])[: max(top, 1)]
        return rows


def _counts(mode: Any) -> dict[str, int]:
    return {name: int(sum(c.values())) for name, c in mode.get_flop_counts().items()}


def count_flops_per_token(
    model: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any],
    *,
    tokens: int,
    recompute_fwd_factor: float = 0.0,
) -> FlopsCount:
    """Count one forward and backward of ``loss_fn(model, batch)`` with the FLOP counter.

    Build the model and batch on the meta device to count without memory or compute.

    Args:
        model: the module (any device; meta is cheapest).
        batch: what ``loss_fn`` takes.
        loss_fn: ``loss_fn(model, batch) -> loss`` (or ``(loss, aux)``), as for ``initialize``.
        tokens: tokens in ``batch`` (the divisor).
        recompute_fwd_factor: fraction of the forward recomputed in backward (activation
            checkpointing: 1.0), added as DeepSpeed's ``flops_profiler.recompute_fwd_factor``.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     model = torch.nn.Linear(8, 8, bias=False)
        >>> x = torch.empty(4, 8, device="meta")
        >>> c = count_flops_per_token(model, x, lambda m, b: m(b).sum(), tokens=4)
        >>> c.forward, c.backward, c.per_token  # 2*4*8*8 each way (x needs no gradient)
        (512, 512, 256.0)
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if tokens < 1:
        raise ValueError(f"tokens={tokens} must be >= 1 (the tokens in the counted batch)")
    with FlopCounterMode(display=False) as fwd_mode:
        out = loss_fn(model, batch)
    loss = out[0] if isinstance(out, tuple) else out
    forward_modules = _counts(fwd_mode)
    with FlopCounterMode(display=False) as bwd_mode:
        torch.autograd.backward(loss)
    forward = forward_modules.get("Global", 0)
    backward = _counts(bwd_mode).get("Global", 0)
    modules = dict(forward_modules)
    for name, flops in _counts(bwd_mode).items():
        modules[name] = modules.get(name, 0) + flops
    total = forward * (1.0 + recompute_fwd_factor) + backward
    return FlopsCount(total / tokens, forward, backward, tokens, modules)


def peak_flops(device: Any = None, dtype: Any = "bf16") -> float | None:
    """Dense peak FLOPS of one device for ``dtype``, or ``None`` when unknown (e.g. the CPU).

    Known: H200, H100 (SXM and PCIe), GH200, A100, L40S, L4, A10G, V100. Pass the figure
    yourself (``MetricsLogger(peak_flops=...)``) for other devices.

    Example:
        >>> peak_flops("cpu") is None
        True
    """
    import torch

    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev).upper()
    kind = "32" if str(dtype).replace("torch.", "") in ("fp32", "float32", "float") else "16"
    for key, peaks in _PEAKS:
        if key in name:
            return peaks[kind]
    return None


def mfu(*, flops_per_token: float, tokens_per_second: float, peak_flops: float,
        devices: int = 1) -> float:
    """Model FLOPs utilisation: ``flops_per_token * tokens_per_second / (peak * devices)``."""
    if peak_flops <= 0 or devices < 1:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 and devices={devices} >= 1")
    return flops_per_token * tokens_per_second / (peak_flops * devices)
