"""The code sandbox: results, output capture, timeouts, memory limits, and the best-effort guards."""

import signal
import socket
import time

import pytest

from nanochat_jax.execution import MAX_FILE_BYTES, MAX_OUTPUT_CHARS, execute_code


def test_success_captures_stdout_and_stderr():
    r = execute_code("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert (r.success, r.stdout, r.stderr, r.error, r.timeout, r.memory_exceeded) == (True, "45\n", "warn\n", None, False, False)


def test_main_blocks_do_not_run():
    """As in HumanEval's own harness (exec with fresh globals), a completion's `if __name__ == "__main__":` demo
    (say, reading input() from a closed stdin) is not run."""
    r = execute_code("def f():\n    return 1\nif __name__ == '__main__':\n    input()\nassert f() == 1")
    assert r.success, r.error


def test_exception_reported_with_partial_stdout():
    r = execute_code("print('before')\nraise ValueError('boom')")
    assert not r.success and r.stdout == "before\n" and r.error == "ValueError: boom"


def test_syntax_error_reported():
    r = execute_code("def f(:\n    pass")
    assert not r.success and r.error.startswith("SyntaxError") and "line 1" in r.error


def test_exit_codes():
    r = execute_code("import sys; sys.exit(2)")
    assert not r.success and r.error == "SystemExit: 2"
    # a wrong completion that exits before the tests run (even with status 0) must not pass
    wrong = "def add(a, b):\n    return a - b\n"
    tests = "\nassert add(1, 2) == 3\n"
    assert not execute_code(wrong + tests).success
    for leave in ("import sys\nsys.exit(0)\n", "raise SystemExit\n"):
        r = execute_code(wrong + leave + tests)
        assert not r.success and r.error.startswith("SystemExit"), leave
    # leaving without a report (e.g. skipping the tests that come after) is never a success
    r = execute_code("import os; os._exit(0)\nassert False")
    assert not r.success and "without reporting a result" in r.error


@pytest.mark.parametrize("program", ["while True: pass", "import time\ntime.sleep(60)"])
def test_hang_is_killed_within_timeout(program):
    t0 = time.monotonic()
    r = execute_code(program, timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timeout and not r.success and elapsed < 1.0 + 2.0


def test_memory_bomb_is_stopped():
    t0 = time.monotonic()
    r = execute_code("chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))", timeout=20, max_memory_bytes=128 * 2**20)
    assert r.memory_exceeded and not r.success and not r.timeout and r.error == "MemoryError"
    assert time.monotonic() - t0 < 20
    # the same allocation fits under a larger limit
    assert execute_code("x = bytearray(2**26)\nprint(len(x))", max_memory_bytes=512 * 2**20).stdout == f"{2**26}\n"


def test_crash_does_not_take_the_caller_down():
    r = execute_code("import ctypes\nctypes.string_at(0)")
    assert not r.success and r.error == "killed by signal SIGSEGV"
    r = execute_code("import signal\nsignal.raise_signal(signal.SIGRTMIN + 6)")  # a signal without a name
    assert not r.success and r.error == f"killed by signal {signal.SIGRTMIN + 6}"


def test_writes_stay_inside_a_deleted_temp_dir(tmp_path):
    r = execute_code("import os\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\nprint(os.getcwd())")
    assert r.success and r.stdout.startswith("ok\n")
    workdir = r.stdout.splitlines()[1]
    assert workdir != str(tmp_path) and not __import__("os").path.exists(workdir)


@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('x')",
    "open({p!r}, mode='a').write('x')",
    "import pathlib; pathlib.Path({p!r}).write_text('x')",
    "import os; os.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "open('../../' + {p!r}.lstrip('/'), 'w').write('x')",
    "import io; io.FileIO({p!r}, 'w').write(b'x')",
    "import os; d = os.open({d!r}, os.O_RDONLY); os.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d))",
    "import os; os.makedirs({p!r})",
    "import pathlib; pathlib.Path({p!r}).mkdir()",
    "import os; os.mkfifo({p!r})",
])
def test_writing_outside_is_refused(tmp_path, how):
    target = tmp_path / "escaped.txt"
    r = execute_code(how.format(p=str(target), d=str(tmp_path)))
    assert not r.success and r.error.startswith("PermissionError") and not target.exists()


def test_directories_inside_the_sandbox_still_work():
    r = execute_code("import os, pathlib\nos.makedirs('a/b')\npathlib.Path('a/f').touch()\nprint(sorted(os.listdir('a')))")
    assert r.success and r.stdout == "['b', 'f']\n"


def test_the_callers_environment_cannot_be_read_from_proc():
    r = execute_code("import os\nprint(open('/proc/%d/environ' % os.getppid()).read())")
    assert not r.success and r.error.startswith("PermissionError: reading another process's /proc entries")
    r = execute_code("print(len(open('/proc/self/status').read()) > 0)")  # its own entries stay readable
    assert r.success and r.stdout == "True\n"


def test_the_caller_cannot_be_signalled_through_a_pidfd():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        r = execute_code("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGUSR1)")
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not r.success and "disabled in the sandbox" in r.error and not received


@pytest.mark.parametrize("how", [
    "resource.prlimit(os.getppid(), resource.RLIMIT_CORE, (0, 0))",  # (with RLIMIT_CPU the caller could be killed)
    "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "os.sched_setaffinity(os.getppid(), {min(os.sched_getaffinity(0))})",
    "os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
])
def test_the_callers_limits_priority_and_cpus_cannot_be_changed(how):
    import os
    import resource

    before = (resource.getrlimit(resource.RLIMIT_CORE), os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0))
    r = execute_code(f"import os, resource\n{how}")
    assert not r.success and "disabled in the sandbox" in r.error
    assert (resource.getrlimit(resource.RLIMIT_CORE), os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)) == before


def test_a_program_may_raise_its_stack_limit():
    """The sandbox's own limits are fixed, not the others: the usual deep-recursion preamble still runs."""
    r = execute_code("import resource, sys\nsoft, hard = resource.getrlimit(resource.RLIMIT_STACK)\n"
                     "resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))\nsys.setrecursionlimit(10**5)\n"
                     "print(resource.getrlimit(resource.RLIMIT_STACK)[0] == hard)")
    assert r.success and r.stdout == "True\n", r.error
    r = execute_code("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 1))")
    assert not r.success and "disabled in the sandbox" in r.error


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_cannot_start_a_process(tmp_path, method):
    marker = tmp_path / "child_ran"
    child = f"open({str(marker)!r}, 'w')"
    r = execute_code(f"import multiprocessing as mp\np = mp.get_context({method!r}).Process(target=exec, "
                     f"args=({child!r},))\np.start()\np.join()")
    assert not r.success and "disabled in the sandbox" in r.error and not marker.exists()


@pytest.mark.parametrize("how", [
    "import os; os.remove({p!r})",
    "import os; os.rename({p!r}, {p!r} + '.moved')",
    "import shutil; shutil.rmtree({d!r})",
    "import subprocess; subprocess.run(['rm', {p!r}])",
    "import os; os.system('rm ' + {p!r})",
    "import os; os.kill(os.getpid(), 9)",
])
def test_destructive_calls_are_refused(tmp_path, how):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    r = execute_code(how.format(p=str(keep), d=str(tmp_path)))
    assert not r.success and "disabled in the sandbox" in r.error
    assert keep.read_text() == "precious"


def test_network_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for program in [f"import socket; socket.create_connection(('127.0.0.1', {port}))",
                        f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
                        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/')"]:
            r = execute_code(program)
            assert not r.success and "disabled in the sandbox" in r.error
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    finally:
        server.close()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_output_flood_stops_at_the_file_size_limit_and_is_cut_in_the_result(stream):
    t0 = time.monotonic()
    r = execute_code(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 999 + '\\n')", timeout=20)
    assert time.monotonic() - t0 < 10  # stopped by RLIMIT_FSIZE (16 MiB written), not by the timeout
    assert not r.success and not r.timeout and r.error == "OSError: [Errno 27] File too large"
    assert len(getattr(r, stream)) == MAX_OUTPUT_CHARS and getattr(r, stream).startswith("x" * 999 + "\n")


def test_a_file_never_grows_past_the_file_size_limit():
    r = execute_code("import os\nf = open('big', 'wb')\ntry:\n    f.write(b'x' * (MAX + 1))\n    f.flush()\n"
                     "except OSError as e:\n    print(e)\nprint(os.path.getsize('big'))".replace("MAX", str(MAX_FILE_BYTES)))
    assert r.stdout == f"[Errno 27] File too large\n{MAX_FILE_BYTES}\n"


def test_one_huge_allocation_and_a_runaway_recursion_are_plain_errors():
    r = execute_code("x = bytearray(2**40)", max_memory_bytes=256 * 2**20)
    assert not r.success and r.memory_exceeded and r.error == "MemoryError"
    r = execute_code("def f():\n    return f()\nf()")
    assert not r.success and not r.memory_exceeded and r.error.startswith("RecursionError: maximum recursion depth")
