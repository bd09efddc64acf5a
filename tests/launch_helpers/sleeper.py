"""Worker that starts a grandchild, reports both PIDs, then waits to be killed.

Usage: sleeper.py [--dump] [--ignore-term] [--escape MODE] [--fail-rank R --code C]
                  [--signal-rank R --signal S] [ARGS...]

Writes ``$OUT_DIR/pids-<RANK>.json`` = {"worker": pid, "grandchild": pid, "extra": [pids]}
once ready (with ``--ignore-term``: once every process ignores SIGTERM). With
``--fail-rank``, that rank waits until every rank is ready, prints a few lines and
exits with ``--code``; with ``--signal-rank`` it kills itself with signal S instead.
``--dump`` first writes the env record of ``dump_env.py``. ``--escape`` moves the
grandchild out of the worker's process group: ``group`` (``process_group=0``),
``session`` (``start_new_session``) or ``jobshell`` (``bash -m``, whose background
``sleep`` gets a process group of its own; its PID is in "extra").
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
parser.add_argument("--escape", choices=["none", "group", "session", "jobshell"], default="none")
args, _ = parser.parse_known_args()
if args.dump:
    from dump_env import write_record  # same directory as this script

    write_record()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
out = Path(os.environ["OUT_DIR"])
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
# The grandchild ignores SIGTERM too when asked, so only SIGKILL removes the tree. It
# creates its ready file once its handler is in place.
GRANDCHILD = (
    "import pathlib, signal, sys, time\n"
    "if sys.argv[1] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pathlib.Path(sys.argv[2]).touch()\n"
    "time.sleep(600)"
)


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"rank {rank}: {path} did not appear")
        time.sleep(0.01)


ready = out / f"ready-{rank}"
extra: list[int] = []
if args.escape == "jobshell":
    trap = "trap '' TERM; " if args.ignore_term else ""
    script = f"{trap}sleep 600 & echo $! > {ready}.tmp && mv {ready}.tmp {ready}; wait"
    grandchild = subprocess.Popen(["bash", "-m", "-c", script])
    wait_for_file(ready)
    extra.append(int(ready.read_text()))
else:
    options = {"group": {"process_group": 0}, "session": {"start_new_session": True}}
    grandchild = subprocess.Popen(
        [sys.executable, "-c", GRANDCHILD, "1" if args.ignore_term else "0", str(ready)],
        **options.get(args.escape, {}),
    )
    wait_for_file(ready)
tmp = out / f"pids-{rank}.tmp"
tmp.write_text(json.dumps({"worker": os.getpid(), "grandchild": grandchild.pid, "extra": extra}))
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
