"""A server run as a child process group that lives and stops with lorachat (used by `serve --engine vllm`).

    code = supervise(launch.argv, env, drain_timeout=30, name="vLLM", say=print)

vLLM's OpenAI server is not one process: the API server starts an engine core process (and, with tensor
parallelism, workers), plus multiprocessing's helpers. Under systemd, Docker or Kubernetes SIGTERM to lorachat is
how the service stops, so all of them must go with it. Three mechanisms, each for a case the others miss:

- A process group of its own (setpgid in the child): every process vLLM starts inherits it, so one `killpg` reaches
  all of them, and an empty group is how "nothing left" is checked. It also keeps a terminal's Ctrl-C (sent to the
  foreground group) from hitting vLLM's processes all at once: lorachat receives it and stops vLLM in order.
- A parent-death signal (prctl PR_SET_PDEATHSIG, Linux): when lorachat is killed with SIGKILL no code of ours
  runs, so the kernel itself sends the API server SIGTERM, and vLLM's own shutdown stops its engine core (whose
  workers watch it through a pipe). SIGTERM rather than SIGKILL: vLLM 0.32's engine core does not watch its
  parent, so a SIGKILLed API server would leave it running. (The kernel clears the signal at fork, so it can only
  be set on the process we start. It follows the thread that forked, so the child is started from the main
  thread; and a killed lorachat's threads each pass it on as they exit, so vLLM may get SIGTERM more than once,
  which its handler ignores.)
- This supervisor loop, for every case where lorachat is alive: a stop signal is forwarded to the API server
  alone (vLLM drains: with `--shutdown-timeout` its engine finishes the requests it runs, then stops), the group
  is SIGKILLed if that takes longer than the drain timeout (or on a second signal), and whatever outlived the API
  server is killed and reaped (lorachat is the group's subreaper, so orphans come back to it rather than to init,
  which in a container may not reap them). If the API server dies on its own, its last lines say why.
A systemd unit or pod spec needs nothing more: no KillMode, no init process of its own.
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from .shutdown import Stopping

TAIL_LINES = 15  # what is shown of the child's output when it dies: a Python traceback's end fits
# After the drain vLLM still stops its engine core and worker: 11 s for vLLM 0.32's CPU build on a busy 2-core box
# (its worker alone is given 5 s, VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS); killing it sooner would cut a clean exit.
TEARDOWN_SECONDS = 15.0
REAP_SECONDS = 5.0  # SIGKILLed processes are gone in milliseconds; this bounds a process stuck in the kernel
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>
# Resolved before any fork: the child between fork and exec should only make system calls.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _own_group_dying_with(parent: int) -> Callable[[], None]:
    def in_child() -> None:
        os.setpgid(0, 0)
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl ran: the signal will never come
                os.kill(os.getpid(), signal.SIGTERM)
    return in_child


def group_alive(pgid: int) -> bool:
    """Whether any process (a zombie included) is still in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        pass
    return True


def _echo(pipe: IO[bytes], tail: collections.deque) -> None:
    """Pass the child's output through to our stderr, keeping its last lines."""
    shown = True
    for raw in pipe:  # read to the end whatever happens to our stderr: a full pipe would block vLLM's logging
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        if shown:
            try:
                sys.stderr.write(line + "\n")  # the last line may lack one: ours would follow on it
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed, or a pipe whose reader left
                shown = False


def _end_group(pgid: int) -> None:
    """Kill what is left of the group once its leader has exited, and reap what became ours."""
    deadline = time.monotonic() + REAP_SECONDS
    while group_alive(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        try:
            while os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG) is not None:
                pass
        except ChildProcessError:  # none of the group is our child: another parent (or init) reaps it
            pass
        time.sleep(0.02)


class _Run:
    """The stop policy of `Stopping` (once: drain, twice: now) applied to a child's process group."""

    def __init__(self, drain_timeout: float, name: str, say: Callable[[str], None]):
        self.drain_timeout, self.name, self.say = drain_timeout, name, say
        self.child: subprocess.Popen | None = None
        self.started = threading.Event()
        self.deadline = math.inf  # when the group is SIGKILLed if it is still there
        self.forced = False  # a second stop signal: SIGKILL now

    def drain(self) -> None:  # the first stop signal (on a thread of its own)
        self.started.wait()
        self.say(f"stopping {self.name}: it finishes the requests it is answering "
                 f"(--drain-timeout {self.drain_timeout:g} s)")
        self.deadline = time.monotonic() + self.drain_timeout + TEARDOWN_SECONDS
        self.child.send_signal(signal.SIGTERM)  # the API server alone: it stops its engine once drained

    def now(self) -> None:  # a second stop signal
        self.forced = True

    def wait(self) -> int:
        while True:
            try:
                return self.child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            if self.forced or time.monotonic() >= self.deadline:
                why = "a second stop signal" if self.forced else \
                    f"still running {self.drain_timeout:g} + {TEARDOWN_SECONDS:g} s after SIGTERM"
                self.say(f"{self.name}: {why}: killing its processes")
                os.killpg(self.child.pid, signal.SIGKILL)
                return self.child.wait()


def supervise(argv: Sequence[str], env: Mapping[str, str], *, drain_timeout: float, name: str,
              say: Callable[[str], None]) -> int:
    """Run `argv` in a process group of its own until it exits or we are asked to stop.

    Returns 0 when it was stopped by SIGTERM/SIGINT (drained, or killed at the deadline), else its own exit code
    (128 + signal if a signal ended it, 1 if it exited 0 unasked), after saying its last lines."""
    run = _Run(drain_timeout, name, say)
    stop = Stopping(on_first=run.drain, on_again=run.now)
    if _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    # Installed before the child exists, so that a signal while it starts stops it as soon as it does.
    with stop.installed():
        run.child = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=_own_group_dying_with(os.getpid()))
        run.started.set()
        echo = threading.Thread(target=_echo, args=(run.child.stdout, tail), daemon=True)
        echo.start()
        try:
            code = run.wait()
        finally:
            _end_group(run.child.pid)
        echo.join(timeout=2)  # the pipe closes when the last process holding it is gone
    if stop.signalled.is_set():
        say(f"{name} stopped")
        return 0
    ended = f"signal {-code}" if code < 0 else f"code {code}"
    say(f"error: {name} exited ({ended}) without being asked to; its last lines:")
    for line in tail:
        say(f"  {line}")
    return 128 - code if code < 0 else code or 1
