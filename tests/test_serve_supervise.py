"""`lorachat serve --engine vllm` owns the processes it starts: stopped, killed or crashed, none is left behind.

vLLM's server is a tree (API server, engine core, workers) that takes minutes to start on a CPU, so these tests
stand a small program in for it, named as the vLLM environment's python: it starts two grandchildren that ignore
SIGTERM, as an engine process busy on a step would, and acts out what vLLM's API server does on SIGTERM (drains
and stops its children), or hangs, or dies. lorachat itself runs for real, as a process. The same story on the real
vLLM server is in test_serve_vllm.py (marked `vllm`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapter_factory import tiny_adapters
from process_groups import members, wait_until

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from pathlib import Path
    out, mode = Path(os.environ["STAND_IN_DIR"]), os.environ["STAND_IN_MODE"]
    (out / "argv").write_text("\\n".join(sys.argv[1:]))
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    kids = [subprocess.Popen([sys.executable, "-c", ignores_term]) for _ in range(2)]

    def on_term(signum, frame):
        # Once, as vLLM's handler: a SIGKILLed lorachat's parent-death signal comes once per thread it had.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (out / "sigterm").write_text("")
        if mode == "hangs":
            return
        if mode == "like-vllm":  # stops its engine processes, then exits; "leaves-children" forgets to
            for kid in kids:
                kid.kill()
                kid.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    (out / "pids").write_text(" ".join(str(p) for p in [os.getpid(), *(k.pid for k in kids)]))
    print("stand-in ready", flush=True)
    if mode == "dies":
        print("Traceback (most recent call last):", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(3)
    while True:
        time.sleep(1)
""")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return tiny_adapters(tmp_path_factory)[1]


class Served:
    """`lorachat serve --engine vllm ADAPTER` with the stand-in as vLLM, started and waited for."""

    def __init__(self, adapter: Path, tmp_path: Path, mode: str, *flags: str):
        self.dir = tmp_path
        python = tmp_path / "python"
        python.write_text(f"#!{sys.executable}\n{STAND_IN}")
        python.chmod(0o755)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "STAND_IN_DIR": str(tmp_path), "STAND_IN_MODE": mode}
        self.process = subprocess.Popen([sys.executable, "-m", "lora_chat.cli", "serve", "--engine", "vllm",
                                         str(adapter), "--vllm-python", str(python), *flags],
                                        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: (tmp_path / "pids").is_file() or self.process.poll() is not None, 120,
                   "the stand-in did not start")
        assert self.process.poll() is None or mode == "dies", self.process.communicate()
        self.pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        self.pgid = self.pids[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


def test_the_stand_in_runs_in_a_group_of_its_own_with_vllms_command(adapter, tmp_path):
    served = Served(adapter, tmp_path, "like-vllm")
    try:
        assert os.getpgid(served.pids[0]) == served.pids[0] != os.getpgid(served.process.pid)
        assert all(os.getpgid(pid) == served.pgid for pid in served.pids)  # its children inherit the group
        argv = (tmp_path / "argv").read_text().split("\n")
        assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert argv[argv.index("--shutdown-timeout") + 1] == "30"  # vLLM drains (its default 0 aborts)
    finally:
        served.stop()


def test_sigterm_stops_vllm_and_every_process_it_started(adapter, tmp_path):
    served = Served(adapter, tmp_path, "leaves-children")
    code, err = served.stop(signal.SIGTERM)
    assert code == 0, err
    assert (tmp_path / "sigterm").is_file()  # forwarded: vLLM drains itself
    assert "stopping vLLM" in err and "vLLM stopped" in err
    assert members(served.pgid) == []  # the children it left were killed and reaped


def test_ctrl_c_stops_it_the_same_way(adapter, tmp_path):
    served = Served(adapter, tmp_path, "like-vllm")
    code, err = served.stop(signal.SIGINT)
    assert code == 0, err
    assert (tmp_path / "sigterm").is_file() and members(served.pgid) == []


def test_a_vllm_that_does_not_stop_is_killed_at_the_drain_deadline(adapter, tmp_path):
    served = Served(adapter, tmp_path, "hangs", "--drain-timeout", "0")
    started = time.monotonic()
    code, err = served.stop(signal.SIGTERM)
    took = time.monotonic() - started
    assert code == 0, err
    assert "still running 0 + 15 s after SIGTERM: killing its processes" in err
    assert 14.5 < took < 25 and members(served.pgid) == []


def test_a_second_signal_kills_at_once(adapter, tmp_path):
    served = Served(adapter, tmp_path, "hangs")  # would get 30 + 15 s
    served.process.send_signal(signal.SIGTERM)
    wait_until(lambda: (tmp_path / "sigterm").is_file(), 30, "SIGTERM was not forwarded")
    started = time.monotonic()
    code, err = served.stop(signal.SIGTERM)
    assert code == 0 and time.monotonic() - started < 5, err
    assert "a second stop signal: killing its processes" in err and members(served.pgid) == []


def test_killing_lorachat_with_sigkill_takes_vllm_down(adapter, tmp_path):
    served = Served(adapter, tmp_path, "like-vllm")
    served.process.kill()  # no code of lorachat's runs: the kernel's parent-death signal does it
    served.process.wait()
    # lorachat is gone, so reaping the last of them is init's job: a zombie holds no port and no memory.
    wait_until(lambda: members(served.pgid, zombies=False) == [], 30,
               lambda: f"left running: {members(served.pgid)}")
    assert (tmp_path / "sigterm").is_file()  # vLLM was asked to stop (SIGTERM), not killed


def test_a_vllm_that_dies_makes_lorachat_exit_with_its_code_and_last_lines(adapter, tmp_path):
    served = Served(adapter, tmp_path, "dies")
    _, err = served.process.communicate(timeout=30)
    assert served.process.returncode == 3
    assert "error: vLLM exited (code 3) without being asked to; its last lines:" in err
    assert err.rstrip().endswith("  RuntimeError: Engine core initialization failed. See root cause above.")
    assert members(served.pgid) == []  # the children it left behind went too
