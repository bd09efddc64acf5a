"""``python -m funczero.config [FILE]``: print the generated key tables, or refresh FILE's copy."""

from __future__ import annotations

import sys

from funczero.config.reference import render, update_file

if __name__ == "__main__":
    if len(sys.argv) > 1:
        changed = update_file(sys.argv[1])
        print(f"{sys.argv[1]}: {'updated' if changed else 'already up to date'}")
    else:
        print(render())
