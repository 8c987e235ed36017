"""Where model-written code runs (HumanEval, eval.allow_code_execution): a separate process without network.

lm-eval's code tasks hand each completion to HF `evaluate`'s code_eval, which executes it in a
child process with a timeout (3 s) after `reliability_guard` disables destructive os/shutil/
subprocess functions; its authors state that this is not a security sandbox. With code execution
allowed, eval/run.py therefore re-runs itself through `unshare --user --map-root-user --net` (a new
user and network namespace: no interface but a down loopback, so no connection leaves the machine)
with resource limits (no core files, files written by the evaluation at most FSIZE_LIMIT bytes).
The checkpoint and datasets must be local anyway (HF offline).

What this does not protect against: code can still read and write every file the user can (it runs
as the user; the namespace's root is the user), use CPU and memory until the timeout, and affect
the evaluation process's own results. Run untrusted models' code on a machine or container you can
throw away.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

MARK = "HYBRID_LM_CODE_SANDBOX"  # set in the re-run process: the sandbox is in place
FSIZE_LIMIT = 1 << 30  # bytes per file written


class SandboxError(RuntimeError):
    """Code execution was asked for but cannot be isolated here."""


def inside() -> bool:
    return os.environ.get(MARK) == "1"


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def sandboxed(argv: list[str]) -> list[str]:
    """`argv` run in a new user and network namespace (SandboxError when that is not possible here)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "--map-root-user", "--net", "true"],
                                         capture_output=True).returncode != 0:
        raise SandboxError("eval.allow_code_execution runs model-written code without network through `unshare "
                           "--user --net` (util-linux, user namespaces), which is not available here: run the "
                           "code benchmarks on a machine that has it, or leave code execution off")
    return [unshare, "--user", "--map-root-user", "--net", "--", *argv]


def rerun_sandboxed(argv: list[str]) -> int:
    """Run this same command again inside the sandbox; return its exit code."""
    proc = subprocess.run(sandboxed([sys.executable, *argv]), env={**os.environ, MARK: "1"}, preexec_fn=_limits)
    return proc.returncode
