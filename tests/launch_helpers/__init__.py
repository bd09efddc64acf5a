"""Scripts and helpers for the launcher tests (tests/test_launch_*.py)."""
