#!/usr/bin/env python3
"""Fake ``pdsh``: run the command for every ``-w`` host locally, in parallel.

Mimics what the launcher relies on: ``%h`` / ``%n`` / ``%u`` / ``%%`` expansion in the
command (as pdsh's ``pipecmd_format_arg`` does), ``host: `` prefixes on output, and
``-S`` (exit with the largest remote exit code). SIGTERM/SIGINT are forwarded to the
remote commands, which start with a minimal login environment. Each call is
appended to ``$FAKE_PDSH_LOG`` when set.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import threading

LOGIN_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "SHELL", "TMPDIR")


def expand(command: str, host: str, rank: int) -> str:
    out, i = [], 0
    while i < len(command):
        c = command[i]
        if c == "%" and i + 1 < len(command):
            nxt = command[i + 1]
            out.append(
                {"h": host, "n": str(rank), "u": getpass.getuser(), "%": "%"}.get(nxt, "%" + nxt)
            )
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def main(argv: list[str]) -> int:
    args, hosts, rest = argv[1:], [], []
    i = 0
    while i < len(args):
        if args[i] == "-w":
            hosts = args[i + 1].split(",")
            i += 2
        elif args[i] in ("-f", "-l", "-R"):
            i += 2
        elif args[i].startswith("-") and not rest:
            i += 1
        else:
            rest.append(args[i])
            i += 1
    command = " ".join(rest)
    log = os.environ.get("FAKE_PDSH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"hosts": hosts, "argv": argv[1:]}) + "\n")
    login_env = {k: os.environ[k] for k in LOGIN_ENV if k in os.environ}
    procs = [
        subprocess.Popen(
            ["sh", "-c", expand(command, h, r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=login_env,
        )
        for r, h in enumerate(hosts)
    ]

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def copy(stream, sink, host: str) -> None:
        for line in iter(stream.readline, b""):
            sink.write(host.encode() + b": " + line)
            sink.flush()

    threads = []
    for host, p in zip(hosts, procs):
        for stream, sink in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
            t = threading.Thread(target=copy, args=(stream, sink, host))
            t.start()
            threads.append(t)
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    return max((c if c >= 0 else 128 - c) for c in codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
