"""What ties ``receiver serve``'s children (its redis-server, its simulator) to it.

A graceful stop (Ctrl-C, SIGTERM) stops them after the service, in `cli.serve`'s ``finally``.
A SIGKILL or a crash runs no code of ours, so on Linux each child is started with
``PR_SET_PDEATHSIG``: the kernel sends it SIGTERM when the thread that started it ends (the
main thread, which lives as long as the service). And a data folder has one owner: a lock on
a file in it, inherited by the children, so that it is free again only once the service and
every child of it are gone, however they ended. Two redis-servers on one append-only file
would corrupt it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StartError(RuntimeError):
    """A child process `receiver serve` needs did not start, or may not."""


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGTERM when the calling thread ends (Linux; None
    elsewhere, where only a graceful stop stops the children)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return partial(tie_to, os.getpid(), prctl)


def tie_to(parent: int, prctl: Any = None) -> None:
    """In a child of ``parent``: SIGTERM when the thread that started it ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    prctl = prctl or ctypes.CDLL(None, use_errno=True).prctl
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the service died before the line above: no signal
        os._exit(1)


def stop(child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def hold(lock_path: Path, what: Path, wait: float = 15.0) -> int:
    """Lock ``lock_path`` for this process (and the children it is passed to); the fd.

    A lock whose owner is gone but whose children still hold it (they were just sent
    SIGTERM) is waited for, up to ``wait`` seconds; one whose owner lives is refused."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        owner = _owner(lock_path)
        if owner is None or _alive(owner):
            os.close(fd)
            raise StartError(f"another receiver serve (pid {owner or '?'}) holds {what}: "
                             "stop it, or set REDIS_URL / RECEIVER_DATA_DIR")
        if time.monotonic() > deadline:
            os.close(fd)
            raise StartError(f"processes left by a receiver serve that ended (pid {owner}) "
                             f"still hold {what} (those with {lock_path} open): stop them, or "
                             "set REDIS_URL / RECEIVER_DATA_DIR")
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def remembered_port(path: Path) -> int:
    """The port kept in ``path`` if it is free, else a free one, kept there: a service
    restarted mid-task finds its simulator where the tasks were sent (the provider's base URL
    and every image URL it gave stay right)."""
    try:
        port = int(path.read_text())
    except (OSError, ValueError):
        port = 0
    if not (0 < port < 65536 and _free(port)):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{port}\n")
    return port


class _Terminated(BaseException):
    """SIGTERM, unwinding the stack (so ``finally`` blocks stop the children)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one does not cut the stop short
    raise _Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM raises (uvicorn, which handles it first, raises it again once it has
    stopped); at the end the process dies of SIGTERM as it would have, the status
    supervisors expect. Without this it died in uvicorn, its children left running."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except _Terminated:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        raise  # not reached: the default action ends the process
    finally:
        signal.signal(signal.SIGTERM, previous)


def _owner(lock_path: Path) -> int | None:
    try:
        return int(lock_path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it is dead, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback now (as uvicorn does, SO_REUSEADDR:
    connections of a former server in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
