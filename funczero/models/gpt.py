"""A small GPT (nanoGPT-style) used by the example, the tests and the benchmarks.

Pre-LayerNorm blocks, learned positions, GELU MLP, ``scaled_dot_product_attention`` with a
causal mask, optional bias, dropout, weight tying and (for tests) a BatchNorm in the head path.

Example:
    >>> import torch
    >>> model = GPT(GPTConfig(vocab_size=16, seq_len=8, d_model=32, n_layers=2, n_heads=2))
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 16])
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "cross_entropy_loss"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model size and options."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def num_params(self) -> int:
        """Parameter count (tied weights once)."""
        return sum(p.numel() for p in GPT(self, device="meta").parameters())


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(d, bias=cfg.bias, device=device)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias, device=device)
        self.proj = nn.Linear(d, d, bias=cfg.bias, device=device)
        self.ln2 = nn.LayerNorm(d, bias=cfg.bias, device=device)
        self.fc = nn.Linear(d, 4 * d, bias=cfg.bias, device=device)
        self.out = nn.Linear(4 * d, d, bias=cfg.bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(y), self.dropout, self.training)
        h = self.out(F.gelu(self.fc(self.ln2(x))))
        return x + F.dropout(h, self.dropout, self.training)


class GPT(nn.Module):
    """Decoder-only transformer over token ids ``[batch, seq]`` -> logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model, device=device)
        self.blocks = nn.ModuleList(Block(cfg, device) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias, device=device)
        self.bn = nn.BatchNorm1d(cfg.d_model, device=device) if cfg.batch_norm else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_weights:
            self.head.weight = self.wte.weight
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (std 0.02, residual projections scaled by depth).

        Module by module in module order, as :func:`funczero.module.materialize` initialises a
        model built on the meta device, so both give the same weights for the same seed.
        """
        seen: set[int] = set()
        for module in self.modules():
            fresh = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if fresh:
                self._init_weights(module)
                seen.update(id(p) for p in fresh)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module``'s own parameters (Hugging Face's per-module convention)."""
        residual = any(module is b.proj or module is b.out for b in self.blocks)  # type: ignore[union-attr]
        norm = isinstance(module, (nn.LayerNorm, nn.BatchNorm1d))
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif norm and name == "weight":
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def cross_entropy_loss(
    model: object, batch: dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Next-token loss in fp32 for ``batch = {"x": ids, "y": targets}`` or ``(x, y)``.

    The logits are cast to fp32 before the softmax, so bf16 runs do not quantise the loss.

    Example:
        >>> import math
        >>> model = GPT(GPTConfig(vocab_size=16, seq_len=8, d_model=32, n_layers=1, n_heads=2))
        >>> ids = torch.randint(0, 16, (2, 9))
        >>> loss = cross_entropy_loss(model, (ids[:, :-1], ids[:, 1:]))
        >>> abs(loss.item() - math.log(16)) < 0.5  # an untrained model guesses about uniformly
        True
    """
    x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
    logits = model(x)  # type: ignore[operator]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
