"""Run inside eval/sandbox.py's sandbox by tests/eval/test_run.py: prints the file-size limit (RLIMIT_FSIZE),
then `connected` or `no network ERRNO` for a connection attempt to a public address."""

from __future__ import annotations

import resource
import socket

if __name__ == "__main__":
    print(resource.getrlimit(resource.RLIMIT_FSIZE)[0])
    try:
        socket.create_connection(("8.8.8.8", 53), timeout=2)
        print("connected")
    except OSError as exc:
        print("no network", exc.errno)
