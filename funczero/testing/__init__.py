"""Test fixtures shared by funczero's tests, docs and examples: gloo worlds and hand-built states."""

from funczero.testing.distributed import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
