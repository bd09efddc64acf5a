"""The exceptions of loading and exporting pretrained weights.

Example:
    >>> e = WeightsMismatchError(missing=["lm_head.weight"], source="ckpt/")
    >>> print(e)
    pretrained weights ckpt/ do not match the model (1 problem):
      - missing from the checkpoint: lm_head.weight
    Pass name_map= to rename checkpoint keys, prefix= to strip a prefix, or strict=False to keep the initial values of missing parameters and ignore unexpected keys.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["WeightsFormatError", "WeightsMismatchError"]


class WeightsFormatError(ValueError):
    """A path is not a checkpoint funczero can read weights from, or its files are damaged."""


class WeightsMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model: every problem, listed in one error.

    Attributes:
        missing: parameters (and persistent buffers) the model has and the checkpoint lacks.
        unexpected: checkpoint keys that name nothing in the model.
        mismatched: ``"name: what differs"`` lines (shapes, tied copies that differ).
    """

    def __init__(
        self,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
        source: str = "",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"missing from the checkpoint: {n}" for n in self.missing]
        lines += [f"unexpected in the checkpoint (not in the model): {k}" for k in self.unexpected]
        lines += self.mismatched
        count = f"{len(lines)} problem" + ("s" if len(lines) != 1 else "")
        body = "\n".join(f"  - {line}" for line in lines)
        hint = (
            "Pass name_map= to rename checkpoint keys, prefix= to strip a prefix, or "
            "strict=False to keep the initial values of missing parameters and ignore "
            "unexpected keys."
        )
        if self.mismatched and not (self.missing or self.unexpected):
            hint = "Build the model with the checkpoint's configuration (config.json)."
        super().__init__(f"pretrained weights {source} do not match the model ({count}):\n{body}\n{hint}")
