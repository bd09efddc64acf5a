"""Hugging Face weights in and out: fine-tune a pretrained model, ship the result.

* :func:`load_pretrained` reads a Hugging Face checkpoint (``model.safetensors`` or a sharded
  ``model.safetensors.index.json``), funczero's consolidated output or a funczero training
  checkpoint's weights straight into each rank's shards of a state;
* :func:`export_pretrained` writes a directory that
  ``transformers.AutoModelForCausalLM.from_pretrained`` opens.

See ``docs/fine-tuning.md``.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from funczero import optim
    >>> from funczero.parallel.plan import build_plan
    >>> from funczero.train.state import init_state
    >>> model = torch.nn.Linear(3, 1)
    >>> plan = build_plan(model, stage=2)
    >>> state = init_state(plan, optim.sgd(0.1), dict(model.named_parameters()), {})
    >>> out = Path(tempfile.mkdtemp()) / "hf"
    >>> _ = export_pretrained(state, out, dtype="fp32")
    >>> again = load_pretrained(state, out)
    >>> torch.equal(again.master["weight"], state.master["weight"])
    True
"""

from __future__ import annotations

from funczero.pretrained.errors import WeightsFormatError as WeightsFormatError
from funczero.pretrained.errors import WeightsMismatchError as WeightsMismatchError
from funczero.pretrained.export import export_pretrained as export_pretrained
from funczero.pretrained.loading import load_pretrained as load_pretrained
from funczero.pretrained.sources import open_weights as open_weights

__all__ = [
    "WeightsFormatError",
    "WeightsMismatchError",
    "export_pretrained",
    "load_pretrained",
    "open_weights",
]
