"""A service started by the launcher ends with it.

The launcher names itself in STRATA_PARENT_PID; the service, first thing after exec,
asks the kernel for SIGTERM when that parent dies (PR_SET_PDEATHSIG) and exits at once
if it is already gone. Done in the child after exec, not in a preexec_fn between fork
and exec: once in a CI run the compute node (the one service started after the
launcher's gRPC health checks) aborted at start in gRPC's poller ("Check failed:
wakeup_fd_->Wakeup().ok()"), the known failure of fork handlers in a process with live
gRPC channels (grpc/grpc#13873); with no preexec_fn, CPython can spawn with vfork and
no Python runs in the child before exec."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "STRATA_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its launcher dies; a no-op when not launched by one."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(parent):  # the launcher died before the request took effect
        sys.exit(1)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
