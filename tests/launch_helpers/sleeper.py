"""Worker that starts a grandchild, reports both PIDs, then waits to be killed.

Usage: sleeper.py [--dump] [--ignore-term] [--fail-rank R --code C] [--signal-rank R --signal S]
                  [ARGS...]

Writes ``$OUT_DIR/pids-<RANK>.json`` = {"worker": pid, "grandchild": pid} once
ready. With ``--fail-rank``, that rank waits until every rank is ready, prints a
few lines and exits with ``--code``; with ``--signal-rank`` it kills itself with
signal S instead. ``--dump`` first writes the env record of ``dump_env.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int)
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--code", type=int, default=1)
parser.add_argument("--signal-rank", type=int, default=-1)
parser.add_argument("--signal", type=int, default=int(signal.SIGKILL))
parser.add_argument("--dump", action="store_true")
args, _ = parser.parse_known_args()
if args.dump:
    from dump_env import write_record  # same directory as this script

    write_record()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
out = Path(os.environ["OUT_DIR"])
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
# The grandchild ignores SIGTERM too when asked, so only SIGKILL removes the tree.
GRANDCHILD = (
    "import signal, sys, time\n"
    "if sys.argv[1] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(600)"
)
grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD, "1" if args.ignore_term else "0"])
tmp = out / f"pids-{rank}.tmp"
tmp.write_text(json.dumps({"worker": os.getpid(), "grandchild": grandchild.pid}))
tmp.rename(out / f"pids-{rank}.json")
print(f"rank {rank} ready", flush=True)

if rank in (args.fail_rank, args.signal_rank):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("pids-*.json"))) < world:
        time.sleep(0.02)
    if rank == args.signal_rank:
        os.kill(os.getpid(), args.signal)
    for i in range(30):
        print(f"rank {rank} log line {i}", flush=True)
    print(f"rank {rank} failing with code {args.code}", file=sys.stderr, flush=True)
    sys.exit(args.code)
while True:
    time.sleep(1)
