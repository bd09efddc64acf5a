"""What a loss function may return to have the step weight its micro-batches by tokens.

A ``loss_fn`` that returns a mean per micro-batch makes the step average those means: with padded
or variable-length batches every micro-batch (and every rank) weighs the same however many tokens
it holds, and the gradient is biased (the bug Hugging Face fixed with ``num_items_in_batch``).
Returning :class:`TokenLoss` (the *sum* of per-token losses and the number of tokens) instead
makes :func:`funczero.make_train_step` divide by the token count of the whole global batch, over
all micro-batches and ranks: the gradient of one big batch of all the real tokens.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> def loss_fn(model, batch):
    ...     x, y = batch  # y == -100 marks padding
    ...     logits = model(x).float()
    ...     total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    ...     return TokenLoss(total, (y != -100).sum())
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["MicroBatches", "TokenLoss"]


class TokenLoss(NamedTuple):
    """A micro-batch's summed loss and the number of items (tokens) it sums over.

    Return it from ``loss_fn`` (alone, or as ``(TokenLoss(...), aux)``). The step's ``loss``
    metric is then ``sum of all sums / sum of all counts`` over the global batch.
    """

    sum: torch.Tensor
    count: torch.Tensor | int


class MicroBatches(list):  # type: ignore[type-arg]
    """A batch given as its micro-batches, which may differ in shape (variable lengths).

    ``train_step(state, MicroBatches([mb0, mb1]))`` runs one micro-batch per element instead of
    splitting one batch along dim 0; there must be exactly ``gradient_accumulation_steps`` of
    them. Pair it with :class:`TokenLoss` so that each token weighs the same.
    """

    def __init__(self, micro_batches: Any = ()) -> None:
        super().__init__(micro_batches)
