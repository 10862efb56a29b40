"""Running model-written Python (HumanEval completions) in a throwaway child process.

`execute_code(program, timeout, max_memory_bytes) -> ExecutionResult` writes the program into a fresh
temporary directory and runs it with `sys.executable -I` (isolated mode: no PYTHON* variables, no user
site) in its own session, with a minimal environment (no proxies, no credentials from the caller). The
parent waits `timeout` seconds of wall-clock time, then kills the whole process group. Inside the child,
a small runner sets resource limits (address space, CPU seconds, file size, process count, no core
dumps), then disables what a careless program could use to hurt the host before executing it:
destructive os/shutil functions, signalling other processes (os.kill, pidfds) or changing their limits,
priority or CPUs (resource.prlimit, os.setpriority, os.sched_setaffinity), process creation
(os.fork/exec/spawn, subprocess.Popen, multiprocessing's spawn), sockets (socket.socket and friends raise
OSError), opening files for writing or making directories outside its working directory, and reading
other processes' /proc entries (the caller's /proc/PID/environ).
stdout and stderr go to files (capped by the file-size limit) and come back in the result. Whatever the
program does -- hang, crash, exhaust memory, kill itself -- the caller gets success=False and carries on.

THIS IS NOT A SECURITY BOUNDARY. Everything inside the child is best effort against accidents: Python
is dynamic enough (ctypes, gc, reloading modules, raw syscalls) for a determined program to undo any of
it, RLIMIT_NPROC is not enforced for root, and there is no kernel isolation (no seccomp, namespaces,
containers). Run untrusted code from an adversary only inside a real sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MAX_FILE_BYTES = 16 * 2**20  # any single file the child writes, its stdout and stderr included
MAX_OUTPUT_CHARS = 100_000  # of stdout/stderr kept in the result


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


# The child's entry point (run with `python -I -c RUNNER root timeout max_memory`). It reads
# root/program.py, locks itself down, executes the program with cwd root/work, and writes a one-line
# JSON status to root/status.json through a file opened before the lock-down.
RUNNER = r'''
import _posixsubprocess, builtins, io, json, os, resource, shutil, signal, socket, subprocess, sys

root, timeout, max_memory = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
work = os.path.realpath(os.path.join(root, "work"))
with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
    source = f.read()
status_file = open(os.path.join(root, "status.json"), "w", encoding="utf-8")
exit_now = os._exit

pinned = set()  # the limits set here: the program cannot change them (a root program could lift them)

def limit(name, value):
    if hasattr(resource, name):
        pinned.add(getattr(resource, name))
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass

limit("RLIMIT_AS", max_memory)
limit("RLIMIT_DATA", max_memory)
limit("RLIMIT_CPU", int(timeout) + 2)
limit("RLIMIT_FSIZE", int(sys.argv[4]))
limit("RLIMIT_NPROC", 0)
limit("RLIMIT_CORE", 0)

def disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

for name in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "fork", "forkpty", "setuid", "setgid", "chmod",
             "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "popen",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp", "pidfd_open", "setpriority", "sched_setaffinity", "sched_setscheduler",
             "sched_setparam"):
    if hasattr(os, name):
        setattr(os, name, disabled("os." + name))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, disabled("shutil." + name))
subprocess.Popen = disabled("subprocess.Popen")
_posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")  # multiprocessing's spawn and forkserver
if hasattr(signal, "pidfd_send_signal"):
    signal.pidfd_send_signal = disabled("signal.pidfd_send_signal")
if hasattr(resource, "prlimit"):  # the caller's limits (same user) cannot be changed
    resource.prlimit = disabled("resource.prlimit")
real_setrlimit = resource.setrlimit

def guarded_setrlimit(which, limits):  # the limits set above stay; others (RLIMIT_STACK for deep recursion) may move
    if which in pinned:
        disabled("resource.setrlimit of the sandbox's limits")()
    return real_setrlimit(which, limits)

resource.setrlimit = guarded_setrlimit

class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the sandbox")

socket.socket = NoSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, name, disabled("socket." + name))

real_open, real_os_open = builtins.open, os.open
realpath = os.path.realpath

own_proc = realpath("/proc/self")

def inside_work(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    full = realpath(os.fsdecode(path))
    return full == work or full.startswith(work + os.sep)

def check_read(path):
    """Another process's /proc entries (the caller's environ holds what the child's environment left out)."""
    if isinstance(path, int):
        return
    parts = realpath(os.fsdecode(path)).split(os.sep)
    if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and os.sep.join(parts[:3]) != own_proc:
        raise PermissionError(f"reading another process's /proc entries is not allowed: {path!r}")

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside_work(file):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
    check_read(file)
    return real_open(file, mode, *args, **kwargs)

def guarded_os_open(path, flags, *args, **kwargs):
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    if flags & writes and (kwargs.get("dir_fd") is not None or not inside_work(path)):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
    check_read(path)
    return real_os_open(path, flags, *args, **kwargs)

class GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside_work(file):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
        check_read(file)
        super().__init__(file, mode, *args, **kwargs)

def guarded_path_call(name, real):  # os.mkdir (so os.makedirs, Path.mkdir), mkfifo, mknod, utime
    def call(path, *args, **kwargs):
        if kwargs.get("dir_fd") is not None or not inside_work(path):
            raise PermissionError(f"os.{name} outside the sandbox directory is not allowed: {path!r}")
        return real(path, *args, **kwargs)
    return call

for name in ("mkdir", "mkfifo", "mknod", "utime"):
    if hasattr(os, name):
        setattr(os, name, guarded_path_call(name, getattr(os, name)))

builtins.open = io.open = guarded_open
io.FileIO = GuardedFileIO
os.open = guarded_os_open
builtins.exit = builtins.quit = disabled("exit()")

status = {"ok": True, "error": None, "memory": False}
scope = {"__name__": "program", "__builtins__": builtins}  # not "__main__": as HumanEval's harness, main blocks skip
try:
    exec(compile(source, "program.py", "exec"), scope)
except SystemExit as e:  # even exit(0): leaving early skips the tests that follow the completion
    status = {"ok": False, "error": f"SystemExit: {e.code}", "memory": False}
except MemoryError:
    status = {"ok": False, "error": "MemoryError", "memory": True}
except BaseException as e:
    status = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000], "memory": False}
scope.clear()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException as e:  # output past the file size limit: the status is still reported
        if status["ok"]:
            status = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000], "memory": False}
try:
    status_file.write(json.dumps(status))
    status_file.close()
except BaseException:
    exit_now(3)
exit_now(0 if status["ok"] else 1)
'''


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_OUTPUT_CHARS)
    except OSError:
        return ""


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """True once the child has exited, False at the deadline. On Linux the child is left unreaped (a zombie)
    so that its pid, which is also its process-group id, cannot be reused before we kill the group."""
    if not hasattr(os, "waitid"):  # macOS: reap directly
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False
    delay = 0.001
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.02)
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(program: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 2**20) -> ExecutionResult:
    """Run `program` in a sandboxed child process; see the module docstring for what that does and does not mean."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    work = os.path.join(root, "work")
    os.mkdir(work)
    try:
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": work, "TMPDIR": work,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", "-c", RUNNER, root, str(timeout), str(int(max_memory_bytes)), str(MAX_FILE_BYTES)]
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = not _wait_unreaped(proc, time.monotonic() + timeout)
            _kill_group(proc.pid)  # the whole group: the program and anything it left behind
            proc.wait()
        stdout, stderr = _read(out_path), _read(err_path)
        if timed_out:
            return ExecutionResult(False, stdout, stderr, f"timed out after {timeout:g} s", timeout=True)
        try:
            status = json.loads(_read(os.path.join(root, "status.json")))
        except ValueError:
            return ExecutionResult(False, stdout, stderr, _describe_exit(proc.returncode, timeout),
                                   timeout=proc.returncode == -signal.SIGXCPU)
        return ExecutionResult(bool(status["ok"]), stdout, stderr, status["error"],
                               memory_exceeded=bool(status["memory"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _describe_exit(returncode: int, timeout: float) -> str:
    """An error line for a child that died without writing its status."""
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return f"CPU time limit exceeded (timeout {timeout:g} s)"
        if sig == signal.SIGXFSZ:
            return f"file size limit exceeded ({MAX_FILE_BYTES} bytes)"
        try:
            return f"killed by signal {signal.Signals(sig).name}"
        except ValueError:  # a number without a name (a real-time signal)
            return f"killed by signal {sig}"
    return f"exited with code {returncode} without reporting a result"
