#!/usr/bin/env python3
"""Fake ``ssh``: run the remote command locally with ``sh -c``, like sshd would.

Installed as ``ssh`` on PATH by the tests. Options are skipped (those that take a
value consume it); the first non-option is the host; the remaining arguments are
joined with spaces into the remote command, exactly as OpenSSH does. Like a fresh
login, the command starts with a minimal environment (PATH, HOME, USER...), so
only what the launcher exports reaches the remote node. Each call is appended to
``$FAKE_SSH_LOG`` (JSON, one line) when set.
"""

from __future__ import annotations

import json
import os
import sys

_WITH_VALUE = set("bcDEeFIiJLlmOoPpQRSWw")
LOGIN_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "SHELL", "TMPDIR")


def main(argv: list[str]) -> int:
    args = argv[1:]
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        i += 1
        if len(flag) == 2 and flag[1] in _WITH_VALUE:
            i += 1
    host, command = args[i], " ".join(args[i + 1 :])
    log = os.environ.get("FAKE_SSH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"host": host, "argv": argv[1:]}) + "\n")
    # Like sshd: the user's shell runs the command string; stdin stays connected.
    login_env = {k: os.environ[k] for k in LOGIN_ENV if k in os.environ}
    os.execvpe("sh", ["sh", "-c", command], login_env)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
