"""Child processes with a deadline, for the tests that start several (torchrun and its ranks, a process pool).

A hang must fail its test, saying where each process waited, rather than stall the suite. `Bounded` starts a command
in a session of its own with STACK_DUMPS=<a fresh folder> in its environment. The processes that arm a stack dump
(train.py's `arm_stack_dump`, this module's for other children) then write every thread's Python stack to their own
file there on SIGUSR1. At the deadline each of them gets SIGUSR1, then every process that inherited the folder's name
gets SIGKILL, and the test fails with the stacks. All of them: torchrun starts its ranks in sessions of their own and
they hold the output pipes, so killing the launcher alone (what subprocess.run's timeout does) leaves the ranks
running and the test waiting for the pipes to close.

    completed = run_bounded(command, 300, "torchrun, 2 ranks", cwd=ROOT, env=env)    # as subprocess.run, text output
    with Bounded(command, 300, "train.py", stdout=subprocess.PIPE, text=True) as bounded:
        for line in bounded.process.stdout: ...                                      # ends at the deadline
"""
import contextlib
import faulthandler
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

VARIABLE = "STACK_DUMPS"
ROOT = Path(__file__).resolve().parent.parent


def arm_stack_dump(name):
    """In a child process: with STACK_DUMPS set, SIGUSR1 writes every thread's stack to <folder>/<name>-<pid>.txt."""
    folder = os.environ.get(VARIABLE)
    if folder and hasattr(signal, "SIGUSR1"):
        dump = open(Path(folder) / f"{name}-{os.getpid()}.txt", "w")       # faulthandler keeps it open
        dump.write(f"{name}, pid {os.getpid()}\n")
        dump.flush()
        faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)


def _processes(marker):
    """{pid: command line} of the processes whose environment holds `marker`: the command and all it started, those
    in sessions of their own too (Linux's /proc; elsewhere none are found and only the process group is killed)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):                  # gone meanwhile, or another user's
            continue
    return found


def _where(dump):
    """Where a dump's process waited: the innermost frame of the first thread that runs this repository's code (the
    main thread, as a rule), and the innermost frame in this repository's code."""
    threads = [re.findall(r'File "([^"]+)", line (\d+) in (\S+)', block) for block in dump.split("(most recent call")]
    is_ours = lambda f: f[0].startswith(str(ROOT)) and "site-packages" not in f[0]
    frames = next((t for t in threads if any(map(is_ours, t))), next((t for t in threads if t), []))
    if not frames:
        return "no Python frame"
    ours = [f for f in frames if is_ours(f)]
    show = lambda f: f"{f[2]} ({os.path.relpath(f[0], ROOT) if f in ours else Path(f[0]).name}:{f[1]})"
    return f"in {show(frames[0])}" + (f", called from {show(ours[0])}" if ours and ours[0] != frames[0] else "")


class Bounded:
    """subprocess.Popen(command, **popen) in a session of its own, stopped with its whole tree after `timeout`
    seconds; leaving the `with` block then fails the test with every armed process's stack. `what` names the run."""

    def __init__(self, command, timeout, what, env=None, **popen):
        self.timeout, self.what, self.output = timeout, what, None
        self.folder = Path(tempfile.mkdtemp(prefix="stack-dumps-"))
        self.marker = f"{VARIABLE}={self.folder}".encode()
        env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1", **{VARIABLE: str(self.folder)})
        self.process = subprocess.Popen(command, env=env, start_new_session=True, **popen)
        self.expired, self.stacks, self.unarmed = False, {}, {}
        self.timer = threading.Timer(timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def deadline_in(self, seconds):
        """Move the deadline to `seconds` from now (the test of this mechanism uses it)."""
        self.timer.cancel()
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self):
        if self.process.poll() is not None and not _processes(self.marker):
            return                                     # finished just in time
        self.expired = True
        self._dump_stacks()
        self._kill_all()

    def _dump_stacks(self):
        """SIGUSR1 to each armed process still running; waits (5 s at most) for their stacks."""
        running, sizes = _processes(self.marker), {}
        for file in sorted(self.folder.glob("*.txt")):
            pid = re.search(r"\bpid (\d+)", file.read_text(errors="replace"))
            if pid and int(pid.group(1)) in running:
                sizes[file] = file.stat().st_size
                os.kill(int(pid.group(1)), signal.SIGUSR1)
                del running[int(pid.group(1))]
        self.unarmed = running
        end = time.monotonic() + 5
        while time.monotonic() < end and any(file.stat().st_size == size for file, size in sizes.items()):
            time.sleep(0.05)
        time.sleep(0.2)                                # the last lines of a dump still being written
        self.stacks = {file.name: file.read_text(errors="replace") for file in sizes}

    def _kill_all(self):
        """SIGKILL to the command and to every process that inherited the marker (three rounds at most: a launcher
        may start one while it is being killed); without /proc, to the command's process group."""
        if self.process.poll() is None:
            if not Path("/proc/self/environ").exists():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.process.kill()
        for _ in range(3):
            left = _processes(self.marker)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not left:
                break
            time.sleep(0.1)

    def report(self):
        lines = [f"tests/bounded.py: {self.what} did not finish within {self.timeout:g} s; every process was killed. "
                 f"Where each one waited:"]
        for dump in self.stacks.values():
            header, _, stack = dump.partition("\n")
            lines.append(f"  {header}: {_where(stack)}")
        lines += [f"  pid {pid} (no stack: not armed, a launcher or a process still starting): {line[:200]}"
                  for pid, line in self.unarmed.items()]
        lines += [f"\n--- {dump}" for dump in self.stacks.values()]
        if self.output:
            lines.append("--- output (its end):\n" + "\n".join(str(o)[-3000:] for o in self.output if o))
        return "\n".join(lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.timer.join()                              # an expiry under way finishes first
        self._kill_all()                               # leftovers (none after a clean run)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe:
                pipe.close()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.expired:
            pytest.fail(self.report(), pytrace=False)


def run_bounded(command, timeout, what, **popen):
    """subprocess.run(command, capture_output=True, text=True, **popen) through `Bounded`."""
    with Bounded(command, timeout, what, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 **popen) as bounded:
        bounded.output = bounded.process.communicate()
    return subprocess.CompletedProcess(command, bounded.process.returncode, *bounded.output)
