"""Worker that dies of an exception, with torch's traceback prefix.

Usage: crash.py [--same]

Installs an excepthook like the one ``torch.distributed.init_process_group``
installs (every traceback line prefixed ``[rankN]: ``), prints one stderr line,
waits until every rank is there and raises RuntimeError: the same message on every
rank with ``--same``, else one naming the rank. SIGTERM is ignored, so the launcher
stopping the job cannot cut a rank off before its traceback.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

rank = os.environ["RANK"]
previous_hook = sys.excepthook


def prefixed_hook(*args: object) -> None:
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        previous_hook(*args)  # type: ignore[arg-type]
        text = sys.stderr.getvalue()
    finally:
        sys.stderr = saved
    lines = (f"[rank{rank}]: {line}" if line else "" for line in text.split("\n"))
    sys.stderr.write("\n".join(lines))
    sys.stderr.flush()


sys.excepthook = prefixed_hook
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"rank {rank} starting", file=sys.stderr, flush=True)
out = Path(os.environ["OUT_DIR"])
(out / f"crash-ready-{rank}").touch()
deadline = time.monotonic() + 60
while len(list(out.glob("crash-ready-*"))) < int(os.environ["WORLD_SIZE"]):
    if time.monotonic() > deadline:
        sys.exit("not every rank became ready")
    time.sleep(0.01)


def fail() -> None:
    raise RuntimeError(
        "the same bug on every rank" if "--same" in sys.argv else f"bug of rank {rank}"
    )


fail()
