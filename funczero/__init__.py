"""funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in."""

from __future__ import annotations

__version__ = "0.1.0"
