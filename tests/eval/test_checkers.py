"""The checkers against the real tools run directly, and their limits on hostile input."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dslm.errors import DslmError
from dslm_eval import checkers
from dslm_eval.checkers import (
    MAX_OUTPUT_BYTES,
    CheckerLimits,
    blank_literals,
    check_c,
    check_java,
    check_java_many,
    check_python,
    run_limited,
    run_python,
    run_python_many,
    write_java_source,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
needs_javac = pytest.mark.skipif(shutil.which("javac") is None, reason="a JDK (javac) is not installed")
LIMITS = CheckerLimits(timeout_s=20, memory_mb=512)  # generous time: CI machines are shared
# A child that a time limit must stop cannot finish: it blocks (sleeping, or opening a FIFO that
# nothing writes), so no machine is fast enough to beat the limit, and, using no CPU, it cannot
# trip the CPU-time backstop either: "timeout" then means the wall clock stopped it.
NEVER_ENDS = "import time\nwhile True: time.sleep(60)"
STOP_SLACK_S = 10
"""Seconds a test allows past a time limit for the kill and the reap, which take milliseconds
unless a shared machine stalls."""

PYTHON = [
    ("def f(x):\n    return x + 1\n", True),
    ("class A:\n    '''Doc.'''\n    x: int = 1\n\n    async def g(self):\n        await self.h()\n", True),
    ("match point:\n    case (0, y):\n        pass\n", True),
    ("def f(:\n    pass\n", False),
    ("if x\n    pass\n", False),
    ("def f():\nreturn 1\n", False),
    ("return 1\n", False),  # found by the compiler, not the parser
    ("x = (1,\n", False),
]
C = [
    ("int add(int a, int b) { return a + b; }\n", True),
    ("#include <stdio.h>\nint main(void) {\n    printf(\"{%c}\\n\", '}');\n    return 0;\n}\n", True),
    ("typedef struct { int x; } P;\nstatic int get(const P *p) { return p->x; }\n", True),
    ("int f(void) { return 1 }\n", False),
    ("int f(void) { return y; }\n", False),
    ("#include <no_such_header_dslm.h>\n", False),
    ("int f(void) {\n", False),
]
JDK_PROBE = "package java.util;\npublic class DslmProbe {\n    int f() { return new ArrayList<String>().size(); }\n}\n"
PATCH_JAVA_BASE = ("--patch-module", "java.base={src}")  # a JDK package compiles as part of its module
JAVA = [  # (the file name javac wants, source, compiles, javac's extra options)
    (
        "Foo.java",
        "import java.util.*;\npublic class Foo {\n    int n(List<String> xs) { return xs.size(); }\n}\n",
        True,
        (),
    ),
    ("Point.java", "public record Point(int x, int y) {\n    int sum() { return x + y; }\n}\n", True, ()),
    ("DslmProbe.java", JDK_PROBE, True, PATCH_JAVA_BASE),
    ("Bar.java", 'public class Bar {\n    void f() { int x = "s"; }\n}\n', False, ()),
    ("Baz.java", "public class Baz {\n    void f( }\n", False, ()),
    ("Qux.java", "class Qux {\n    int f() { }\n}\n", False, ()),
    ("DslmProbe.java", JDK_PROBE.replace("size()", "sighs()"), False, PATCH_JAVA_BASE),
]


def run_tool(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=900).returncode == 0


def direct_javac(tmp: Path, name: str, code: str, options: tuple[str, ...]) -> bool:
    (tmp / "src").mkdir(parents=True)
    (tmp / "src" / name).write_text(code)
    fast_start = ["-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC"]  # JVM start-up only, no effect on verdicts
    options = [option.format(src=tmp / "src") for option in options]
    return run_tool(["javac", *fast_start, "-d", str(tmp / "classes"), "-proc:none", *options, str(tmp / "src" / name)])


@pytest.mark.parametrize("code,valid", PYTHON)
def test_python_checker_agrees_with_py_compile(tmp_path, code, valid):
    (tmp_path / "snippet.py").write_text(code)
    assert run_tool([sys.executable, "-m", "py_compile", str(tmp_path / "snippet.py")]) == valid
    result = check_python(code, LIMITS)
    assert result.ok == valid
    assert result.reason == "ok" if valid else result.reason.startswith("syntax error: line ")


@needs_gcc
@pytest.mark.parametrize("code,valid", C)
def test_c_checker_agrees_with_gcc(tmp_path, code, valid):
    (tmp_path / "snippet.c").write_text(code)
    assert run_tool(["gcc", "-fsyntax-only", "-std=gnu11", "-w", str(tmp_path / "snippet.c")]) == valid
    result = check_c(code, LIMITS)
    assert result.ok == valid
    assert result.reason == "ok" if valid else result.reason.startswith("compile error: completion.c:")


@needs_javac
def test_java_checkers_agree_with_javac(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        direct = list(
            pool.map(lambda i: direct_javac(tmp_path / str(i), JAVA[i][0], JAVA[i][1], JAVA[i][3]), range(len(JAVA)))
        )
    assert direct == [valid for _, _, valid, _ in JAVA]
    batch = check_java_many([code for _, code, _, _ in JAVA], LIMITS)
    assert [r.ok for r in batch] == direct
    # each file's own error, though all were compiled in one JVM
    failed_in = [r.reason.split(":")[1].strip() for r in batch if not r.ok]
    assert failed_in == ["Bar.java", "Baz.java", "Qux.java", "DslmProbe.java"]
    assert batch[3].reason == "compile error: Bar.java:2: error: incompatible types: String cannot be converted to int"


@needs_javac
def test_bare_java_members_are_wrapped_in_a_class():
    snippets = [
        "int twice(int x) { return 2 * x; }\n",
        "import java.util.List;\n\nint size(List<String> xs) { return xs.size(); }\n",
        "int twice(int x) { return 2 * y; }\n",
    ]
    assert [r.ok for r in check_java_many(snippets, LIMITS)] == [True, True, False]


def test_java_file_is_named_for_its_public_top_level_type(tmp_path):
    code = "class Helper {\n    public static class Inner {}\n}\n\npublic final class Main {}\n"
    assert write_java_source(tmp_path / "a", code).name == "Main.java"
    assert write_java_source(tmp_path / "b", "// public class Fake\nclass Plain {}\n").name == "Plain.java"
    wrapped = write_java_source(tmp_path / "c", "import java.util.List;\nvoid f() {}\n")
    assert wrapped.read_text() == "import java.util.List;\nclass Snippet {\nvoid f() {}\n\n}\n"


def test_blank_literals_keeps_offsets_and_hides_braces():
    code = "int f() { /* { */ char c = '{'; s = \"}{\"; // }\n#define X {\n}\n"
    masked = blank_literals(code, "c")
    assert len(masked) == len(code) and masked.count("\n") == code.count("\n")
    assert masked.count("{") == masked.count("}") == 1
    java = 'String s = """\n  { "\n  """; int x = 1;'
    assert "{" not in blank_literals(java, "java") and "int x = 1;" in blank_literals(java, "java")


def test_generated_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    assert check_python(f"open({str(marker)!r}, 'w').write('ran')\n", LIMITS).ok
    assert not marker.exists()


@needs_gcc
def test_c_constructor_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    code = (
        "#include <stdio.h>\n__attribute__((constructor)) static void hook(void) {\n"
        f'    fclose(fopen("{marker}", "w"));\n}}\nint main(void) {{ return 0; }}\n'
    )
    assert check_c(code, LIMITS).ok
    assert not marker.exists()


@needs_javac
def test_java_static_initializer_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    code = (
        "public class Init {\n    static {\n"
        f'        try {{ new java.io.File("{marker}").createNewFile(); }} catch (java.io.IOException e) {{ }}\n'
        "    }\n}\n"
    )
    assert check_java(code, LIMITS).ok
    assert not marker.exists()


def test_a_hanging_process_is_stopped_at_the_time_limit(tmp_path):
    start = time.monotonic()
    result = run_limited([sys.executable, "-c", NEVER_ENDS], tmp_path, timeout_s=1.0, memory_bytes=512 << 20)
    assert (result.ok, result.reason) == (False, "timeout")
    assert time.monotonic() - start < 1.0 + STOP_SLACK_S


def test_the_whole_process_group_is_killed(tmp_path):
    # The parent records the grandchild's pid once Popen has started it, so only the parent's own
    # start (well under a second) must fit in the time limit.
    parent = (
        f"import subprocess, sys\ngrandchild = subprocess.Popen([sys.executable, '-c', {NEVER_ENDS!r}])\n"
        f"open('pid', 'w').write(str(grandchild.pid))\n{NEVER_ENDS}"
    )
    assert run_limited([sys.executable, "-c", parent], tmp_path, timeout_s=5.0, memory_bytes=None).reason == "timeout"
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + STOP_SLACK_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for its reaper is dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("code", ["bytearray(8 * 2**30)", "x = []\nwhile True: x.append(bytearray(2**20))"])
def test_a_memory_flood_is_stopped(tmp_path, code):
    start = time.monotonic()
    result = run_limited([sys.executable, "-c", code], tmp_path, timeout_s=20, memory_bytes=512 << 20)
    assert (result.ok, result.reason) == (False, "memory")
    assert time.monotonic() - start < 10


def test_an_output_flood_is_stopped_and_cut(tmp_path):
    result = run_limited(["yes", "flood"], tmp_path, timeout_s=20, memory_bytes=512 << 20)
    assert (result.ok, result.reason) == (False, "output limit")
    assert len(result.output) == MAX_OUTPUT_BYTES


@needs_gcc
def test_a_gcc_macro_bomb_is_stopped():
    # Object-like macros expand lazily: ten levels stream 10**10 ";" tokens. gcc keeps each
    # expansion's location, so the memory limit or the time limit stops it, whichever comes first
    # on this machine; either way it never finishes.
    levels = "".join(f"#define X{i} {' '.join([f'X{i - 1}'] * 10)}\n" for i in range(1, 10))
    start = time.monotonic()
    result = check_c("#define X0 ;;;;;;;;;;\n" + levels + "X9\n", CheckerLimits(timeout_s=2, memory_mb=512))
    assert not result.ok and result.reason in ("timeout", "memory")
    assert time.monotonic() - start < 2 + STOP_SLACK_S


@needs_gcc
def test_a_gcc_that_cannot_finish_is_stopped_at_the_time_limit(tmp_path):
    # gcc opens the included FIFO and waits for a writer that never comes. (A macro bomb is no
    # such input: gcc keeps every expansion's location, so it runs out of memory within seconds,
    # and which limit comes first depends on the machine.)
    never_written = tmp_path / "never_written.h"
    os.mkfifo(never_written)
    start = time.monotonic()
    result = check_c(f'#include "{never_written}"\n', CheckerLimits(timeout_s=2, memory_mb=512))
    assert (result.ok, result.reason) == (False, "timeout")
    assert time.monotonic() - start < 2 + STOP_SLACK_S


# The real JVM and javac of the JDK on PATH, except that each job's source is first replaced by a
# FIFO nothing writes: javac blocks opening it. BatchJavac's last argument is its job list, one
# "PACKAGE<TAB>SOURCE<TAB>OPTION..." line per file. Redone at each JVM start, so a start killed
# between the unlink and the mkfifo leaves nothing the next one trips on.
_BLOCKING_JAVA = """\
#!{python}
import os, sys
from pathlib import Path
for line in open(sys.argv[-1], encoding="utf-8"):
    source = Path(line.split("\\t")[1])
    source.unlink(missing_ok=True)
    os.mkfifo(source)
os.execv({java!r}, [{java!r}, *sys.argv[1:]])
"""


def blocking_jdk(bin_dir: Path) -> Path:
    """A bin folder to put first on PATH. check_java_many runs the `java` beside the `javac` it
    finds: here the real javac is run as it is, and `java` is _BLOCKING_JAVA."""
    real_javac = Path(os.path.realpath(shutil.which("javac")))
    real_java = str(real_javac.with_name("java"))
    bin_dir.mkdir()
    (bin_dir / "javac").write_text(f'#!/bin/sh\nexec "{real_javac}" "$@"\n')
    (bin_dir / "java").write_text(_BLOCKING_JAVA.format(python=sys.executable, java=real_java))
    for tool in ("javac", "java"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@needs_javac
def test_a_javac_batch_past_its_time_still_answers_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{blocking_jdk(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    # Whether BatchJavac gives up on the file or run_limited kills its JVM first (that depends on
    # how fast the JVM starts), the file is charged the timeout and a new JVM takes the rest.
    results = check_java_many([JAVA[0][1], JAVA[2][1]], CheckerLimits(timeout_s=0.2, memory_mb=256))
    assert [(r.ok, r.reason) for r in results] == [(False, "timeout"), (False, "timeout")]


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0}, {"timeout_s": -1.0}, {"memory_mb": 16}])
def test_limits_reject_bad_values(kwargs):
    with pytest.raises(DslmError):
        CheckerLimits(**kwargs)


# ------------------------------------------------------------------- running programs


@pytest.fixture
def started(monkeypatch) -> list[int]:
    """The pids of the processes run_limited starts (each leads its own process group)."""
    pids = []
    popen = subprocess.Popen

    def recording(*args, **kwargs):
        process = popen(*args, **kwargs)
        pids.append(process.pid)
        return process

    monkeypatch.setattr(subprocess, "Popen", recording)
    return pids


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def process_with(marker: str) -> bool:
    return any(marker in " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))


def wait_gone(alive) -> None:
    """Until alive() is False: killed processes end, and init reaps them, within moments."""
    deadline = time.monotonic() + STOP_SLACK_S
    while alive():
        assert time.monotonic() < deadline, "a process survived its time limit"
        time.sleep(0.1)


def test_a_program_that_passes_its_tests_is_ok_and_one_that_fails_says_why():
    assert run_python("assert sum([1, 2]) == 3\nprint('fine')\n", LIMITS).ok
    failed = run_python("def f(x):\n    return x\n\nassert f(1) == 2\n", LIMITS)
    assert not failed.ok and failed.reason == "exit 1" and "AssertionError" in failed.output


def test_a_program_that_loops_forever_is_killed_on_time(started):
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", CheckerLimits(timeout_s=1.0, memory_mb=512))
    assert result.reason == "timeout" and time.monotonic() - start < 1.0 + STOP_SLACK_S
    wait_gone(lambda: group_alive(started[-1]))


def test_a_fork_bomb_is_killed_with_all_its_processes(started):
    """Five rounds of fork: 32 processes that each wait forever, one of them in a session of its own
    (out of the process group): the time limit ends every one."""
    marker = f"dslm-fork-bomb-{os.getpid()}-{time.monotonic_ns()}"
    code = (
        "import os, sys, time\n"
        "for _ in range(5):\n"
        "    os.fork()\n"
        "if os.getpid() % 7 == 0:\n"
        "    os.setsid()\n"
        f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
    )
    result = run_python(code, CheckerLimits(timeout_s=2.0, memory_mb=512))
    assert result.reason == "timeout", result
    wait_gone(lambda: group_alive(started[-1]))
    wait_gone(lambda: process_with(marker))


def test_a_program_cannot_write_outside_its_folder(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_python(f"open({str(outside)!r}, 'w').write('out')\n", LIMITS)
    assert not result.ok and "Read-only file system" in result.output, result
    assert not outside.exists()
    assert run_python("open('inside.txt', 'w').write('in')\nassert open('inside.txt').read() == 'in'\n", LIMITS).ok


def test_a_program_has_no_network():
    """A listener on this machine's loopback is out of reach, and so is the internet."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        result = run_python(code, LIMITS)
        assert not result.ok and ("ConnectionRefusedError" in result.output or "OSError" in result.output), result
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()
    internet = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)\n", LIMITS)
    assert not internet.ok and "unreachable" in internet.output, internet


def test_programs_run_in_parallel_keep_their_order():
    codes = [f"assert {i} % 3 != 0\n" for i in range(9)]
    assert [r.ok for r in run_python_many(codes, LIMITS, workers=2)] == [i % 3 != 0 for i in range(9)]


def test_a_machine_that_refuses_the_sandbox_runs_nothing_and_says_so_in_one_line(monkeypatch):
    refused = "import sys\nprint('sandbox unavailable: unshare: Operation not permitted')\nsys.exit(125)\n"
    monkeypatch.setattr(checkers, "_ISOLATE_THEN_EXEC", refused)
    with pytest.raises(DslmError, match=r"refuses one \(unshare: Operation not permitted\)") as error:
        run_python("print('ran')\n", LIMITS)
    assert "\n" not in str(error.value)
