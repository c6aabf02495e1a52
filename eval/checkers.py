"""The sandbox for generated code: compile-only checkers (Python `compile()`, `gcc -fsyntax-only`,
`javac`) and, for HumanEval's unit tests, Python programs that are run.

Every check runs the real tool in a subprocess with a wall-clock limit (the whole process group is
killed), an address-space limit (for javac: the JVM heap, see _JVM_FLAGS), a CPU-time and file-size
backstop, no core dumps, stdin from /dev/null, a fixed environment, and a throwaway directory that
is deleted afterwards. Compile checks never run the code. A program that is run (`run_python`) is
isolated further, with Linux namespaces (`_ISOLATE_THEN_EXEC`): no network, every file system
read-only but its throwaway directory, a bounded number of processes, no privileges, and a PID
namespace whose processes all end with it, so nothing it forks outlives its time limit.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dslm.errors import DslmError

MAX_OUTPUT_BYTES = 16384
"""Tool output kept per check: enough for the first error (javac may warn about JDK-internal API
first), bounded for a flood."""
MAX_FILE_BYTES = 64 << 20
"""RLIMIT_FSIZE: bounds the captured output file and anything the tool writes (javac's classes)."""
JAVA_BATCH = 16
"""Files compiled in one JVM by `check_java_many`: javac's JVM start-up, the bulk of a small file's
check, is paid once per batch."""

# rlimits are set by a tiny exec wrapper rather than `preexec_fn`, which Python documents as
# unsafe with threads (checks run on a thread pool). A limit of -1 is left as it is. Python
# ignores SIGPIPE and SIGXFSZ and exec would pass that on: the tool gets the defaults back, so
# writing past RLIMIT_FSIZE stops it.
_SET_LIMITS = """\
import os, resource, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE")
for name, soft, hard in zip(names, map(int, sys.argv[1:5]), map(int, sys.argv[5:9])):
    if soft >= 0:
        kind = getattr(resource, name)
        old_hard = resource.getrlimit(kind)[1]
        cap = lambda v: v if old_hard == resource.RLIM_INFINITY else min(v, old_hard)
        resource.setrlimit(kind, (cap(soft), cap(hard)))
"""
_LIMIT_THEN_EXEC = _SET_LIMITS + "os.execvp(sys.argv[9], sys.argv[9:])\n"

SANDBOX_UNAVAILABLE = 125
"""_ISOLATE_THEN_EXEC's exit status when this machine refuses the namespaces it needs."""
MAX_PROCESSES = 64
"""RLIMIT_NPROC inside a run program's user namespace: a fork bomb gets EAGAIN past it."""

# Before the limits: new user, mount, PID and network namespaces (unshare(2)). The user namespace
# maps this user to uid 1000, so exec drops the capabilities it holds there (it cannot undo the
# rest), and no_new_privs keeps setuid files from giving any back. The mount namespace makes every
# mount read-only (mount_setattr(2), recursive) except a bind mount of the working directory. The
# network namespace holds only a loopback device that is down. The first child becomes the PID
# namespace's init and execs the program; when it ends, or the group is killed on time, the kernel
# kills every process left in the namespace, even one that left the process group.
_ISOLATE_THEN_EXEC = (
    """\
import ctypes, os, resource, signal, struct, sys
def isolate():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    def need(ok, what):
        if not ok:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    uid, gid, here = os.getuid(), os.getgid(), os.getcwd().encode()
    need(libc.unshare(0x10000000 | 0x20000 | 0x20000000 | 0x40000000) == 0, "unshare")  # USER NS PID NET
    for name, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    need(libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0, "private mounts")  # MS_REC | MS_PRIVATE
    need(libc.mount(here, here, None, 0x1000, None) == 0, "bind mount")  # MS_BIND
    read_only = struct.pack("QQQQ", 1, 0, 0, 0)  # struct mount_attr: attr_set = MOUNT_ATTR_RDONLY
    writable = struct.pack("QQQQ", 0, 1, 0, 0)  # attr_clr = MOUNT_ATTR_RDONLY
    # mount_setattr(2) is syscall 442 on every architecture (Linux 5.12+); -100: AT_FDCWD
    need(libc.syscall(442, -100, b"/", 0x8000, read_only, 32) == 0, "mount_setattr")  # AT_RECURSIVE
    need(libc.syscall(442, -100, here, 0, writable, 32) == 0, "mount_setattr")
    os.chdir(here)  # the new mount, not the one beneath it
    need(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    resource.setrlimit(resource.RLIMIT_NPROC, (%(processes)d, %(processes)d))
try:
    isolate()
except (OSError, AttributeError) as e:  # AttributeError: a C library without unshare (not Linux)
    print(f"sandbox unavailable: {e}", flush=True)
    os._exit(%(unavailable)d)
"""
    % {"unavailable": SANDBOX_UNAVAILABLE, "processes": MAX_PROCESSES}
    + _SET_LIMITS
    + """\
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[9], sys.argv[9:])
status = os.waitpid(pid, 0)[1]
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""
)

# Anchored at line starts: gcc and javac echo source lines, which may mention these words.
_OUT_OF_MEMORY = re.compile(
    r"^(?:MemoryError\b"  # Python
    r"|\S*cc1\S*: out of memory|virtual memory exhausted"  # gcc (cc1 is its compiler proper)
    r"|java\.lang\.OutOfMemoryError|The system is out of resources)",  # javac
    re.MULTILINE,
)

# gcc's and javac's diagnostic line "DIR/FILE:LINE[:COL]: [fatal ]error: ..." without the
# throwaway DIR; echoed source lines that mention "error" come after it.
_ERROR_LINE = re.compile(r"^(?:\S*/)?(\S+?:\d+:(?:\d+:)? (?:fatal )?error: .*)$", re.MULTILINE)

# Reads bytes, so an encoding declaration counts as it does for the interpreter. A MemoryError is
# left to end the process: run_limited reports it as "memory".
_PYTHON_CHECK = """\
import sys
try:
    compile(open(sys.argv[1], "rb").read(), "<completion>", "exec")
except SyntaxError as e:
    print(f"line {e.lineno}: {e.msg}")
    sys.exit(1)
except (ValueError, RecursionError) as e:  # NUL bytes; nesting too deep for the compiler
    print(f"{type(e).__name__}: {e}")
    sys.exit(1)
"""

# -fsyntax-only: preprocess, parse and type-check; no code is generated, nothing is written.
# -std=gnu11: a fixed dialect, so results do not move with gcc's default (gnu17 in gcc 12), with
# the GNU extensions real C code uses. -w: warnings never change the verdict, only errors do.
# One error and no echoed source lines: the reason is the first error. gcc 14 turns implicit
# declarations and int-conversion into errors: compare rates on one gcc version (recorded in the
# results' settings).
GCC_FLAGS = (
    "-fsyntax-only",
    "-std=gnu11",
    "-w",
    "-fmax-errors=1",
    "-fno-diagnostics-show-caret",
    "-fdiagnostics-color=never",
)

# RLIMIT_AS breaks the JVM (it reserves gigabytes of address space up front), so javac's memory
# limit is its heap, -Xmx. SerialGC and C1-only JIT start faster for short runs; -UsePerfData
# keeps the JVM from writing /tmp/hsperfdata files.
_JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData")
JAVAC_OPTIONS = ("-proc:none", "-Xlint:none", "-encoding", "UTF-8")

_JAVA_PUBLIC_TYPE = re.compile(
    r"\bpublic\s+(?:(?:abstract|final|static|strictfp|sealed|non-sealed)\s+)*"
    r"(?:class|interface|enum|record|@\s*interface)\s+([A-Za-z_$][\w$]*)"
)
_JAVA_TYPE = re.compile(r"\b(?:class|interface|enum|record)\s+([A-Za-z_$][\w$]*)")
_JAVA_HEADER = re.compile(r"\s*(?:(?:package|import)\b[^;]*;\s*)*")
_JAVA_PACKAGE = re.compile(r"\s*package\s+([\w.]+)\s*;")

_LITERALS = {
    # Preprocessor lines (with continuations), comments, strings and char literals. An unclosed
    # string ends at the line end, an unclosed comment at the end of the text.
    "c": re.compile(
        r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*|//[^\n]*|/\*[\s\S]*?(?:\*/|\Z)"
        r"|\"(?:\\[\s\S]|[^\"\\\n])*\"?|'(?:\\[\s\S]|[^'\\\n])*'?",
        re.MULTILINE,
    ),
    # Java adds text blocks ("""...""") and has no preprocessor.
    "java": re.compile(
        r"\"\"\"[\s\S]*?(?:\"\"\"|\Z)|//[^\n]*|/\*[\s\S]*?(?:\*/|\Z)"
        r"|\"(?:\\[\s\S]|[^\"\\\n])*\"?|'(?:\\[\s\S]|[^'\\\n])*'?"
    ),
}


@dataclass(frozen=True)
class CheckerLimits:
    """Time and memory limits of each compile check (`check_python`, `check_c`, `check_java`,
    `check_java_many`). Raises DslmError for a value out of its range."""

    timeout_s: float = 10.0
    """Wall-clock seconds per check, > 0; the tool's whole process group is killed after it. Java
    checks (check_java, check_java_many) run in one JVM per batch, which gives each file timeout_s
    and is itself killed after timeout_s x (files + 1) overall, one more for start-up (a JVM
    restarted after a timeout counts the files left). A CPU-time rlimit of ceil(wall-clock limit)
    x CPU count + 1 s backs each limit up."""
    memory_mb: int = 1024
    """Memory limit in MiB (memory_mb << 20 bytes), >= 64: the address-space limit (RLIMIT_AS) for
    Python and gcc; the JVM heap (-Xmx{memory_mb}m) for javac, which gets no RLIMIT_AS."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise DslmError(f"checker timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise DslmError(f"checker memory_mb must be at least 64 (the tools need that much), got {self.memory_mb}")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str
    """"ok", "syntax error: ...", "compile error: ...", "timeout", "memory", "output limit",
    "exit N" or "signal N"; dslm_eval.code_tasks adds "empty: ..." for a completion it does not compile."""
    output: str = ""
    """The tool's output (stdout and stderr), cut to MAX_OUTPUT_BYTES."""


def run_limited(
    cmd: Sequence[str], cwd: Path, timeout_s: float, memory_bytes: int | None, isolated: bool = False
) -> CheckResult:
    """Run `cmd` in `cwd` under the limits; ok when it exits 0. `memory_bytes=None`: no RLIMIT_AS.
    `isolated`: in the namespaces of _ISOLATE_THEN_EXEC (for code that is run); raises DslmError
    when this machine refuses them."""
    # CPU time is a backstop for a process the wall clock fails to stop: it allows every core.
    cpu_s = math.ceil(timeout_s) * (os.cpu_count() or 1) + 1
    soft = [-1 if memory_bytes is None else memory_bytes, cpu_s, MAX_FILE_BYTES, 0]
    hard = [soft[0], cpu_s + 1, MAX_FILE_BYTES, 0]
    script = _ISOLATE_THEN_EXEC if isolated else _LIMIT_THEN_EXEC
    wrapper = [sys.executable, "-I", "-S", "-c", script, *map(str, soft + hard), *cmd]
    # A fixed environment: results do not depend on the caller's CPATH, JAVA_TOOL_OPTIONS or locale.
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "TMPDIR": str(cwd)}
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: a flood fills no memory and cannot block
        proc = subprocess.Popen(
            wrapper,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = None
        out.seek(0)
        output = out.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace")
    if isolated and returncode == SANDBOX_UNAVAILABLE and output.startswith("sandbox unavailable"):
        raise DslmError(
            f"generated programs run only in a sandbox of Linux namespaces (user, mount, PID, network) and this "
            f"machine refuses one ({output.strip().removeprefix('sandbox unavailable: ')}); on Ubuntu allow "
            f"unprivileged user namespaces (sysctl kernel.apparmor_restrict_unprivileged_userns=0)"
        )
    return CheckResult(ok=returncode == 0, reason=run_reason(returncode, output), output=output)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (the tool and any children it started) and reap the tool."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_reason(returncode: int | None, output: str) -> str:
    if returncode is None or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGXFSZ:
        return "output limit"
    if _OUT_OF_MEMORY.search(output):
        return "memory"
    return f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"


def compile_failure(result: CheckResult, kind: str) -> CheckResult:
    """A tool's plain error exit as `kind`: its first error line; limits and crashes stay as they are."""
    if result.ok or not result.reason.startswith("exit "):
        return result
    found = _ERROR_LINE.search(result.output)
    first = found[1] if found else (result.output.strip().splitlines() or [result.reason])[0]
    return CheckResult(ok=False, reason=f"{kind}: {first.strip()}", output=result.output)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DslmError(f"{name} not found on PATH: it is needed to check generated code")
    return path


def check_file(code: str, filename: str, tool: list[str], kind: str, limits: CheckerLimits) -> CheckResult:
    """Run `tool` on `code` saved as `filename` in a throwaway directory, under the limits; a plain
    error exit is reported as `kind` with the first error."""
    with tempfile.TemporaryDirectory(prefix="dslm-check-") as tmp:
        Path(tmp, filename).write_text(code, encoding="utf-8")
        result = run_limited([*tool, filename], Path(tmp), limits.timeout_s, limits.memory_mb << 20)
    return compile_failure(result, kind)


def check_python(code: str, limits: CheckerLimits = CheckerLimits()) -> CheckResult:
    """`compile(code, "<completion>", "exec")` in a fresh interpreter (this one's version); never exec."""
    return check_file(code, "completion.py", [sys.executable, "-I", "-S", "-c", _PYTHON_CHECK], "syntax error", limits)


def run_python(code: str, limits: CheckerLimits = CheckerLimits()) -> CheckResult:
    """Run `code` as a program (this interpreter, isolated from the environment and site-packages)
    in the sandbox: ok when it exits 0; a failed test is "exit 1" with its traceback in the output.
    Raises DslmError where this machine refuses the sandbox's namespaces."""
    with tempfile.TemporaryDirectory(prefix="dslm-run-") as tmp:
        Path(tmp, "program.py").write_text(code, encoding="utf-8")
        cmd = [sys.executable, "-I", "-S", "program.py"]
        return run_limited(cmd, Path(tmp), limits.timeout_s, limits.memory_mb << 20, isolated=True)


def require_sandbox(limits: CheckerLimits = CheckerLimits()) -> None:
    """DslmError where this machine refuses the sandbox that `run_python` needs (an empty program
    runs in it): called before anything is generated for programs that could never run."""
    run_python("", limits)


def run_python_many(codes: Sequence[str], limits: CheckerLimits, workers: int) -> list[CheckResult]:
    """`run_python` on `workers` threads (each program a sandboxed subprocess); results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, limits), codes))


def check_c(code: str, limits: CheckerLimits = CheckerLimits()) -> CheckResult:
    """`gcc -fsyntax-only` (see GCC_FLAGS): parses and type-checks, writes and runs nothing."""
    return check_file(code, "completion.c", [require_tool("gcc"), *GCC_FLAGS], "compile error", limits)


def check_java(code: str, limits: CheckerLimits = CheckerLimits()) -> CheckResult:
    """javac on `code` saved as its public type's file (a bare member is wrapped in a class)."""
    return check_java_many([code], limits)[0]


def javac_options(source: Path) -> list[str]:
    return ["-d", str(source.parent.parent / "classes"), *JAVAC_OPTIONS]


def write_java_source(root: Path, code: str) -> Path:
    """Save `code` as root/src/NAME.java, NAME its public top-level type (javac requires it) or
    else its first one; a snippet with no type declaration is wrapped in `class Snippet { ... }`
    after its package and import lines."""
    masked = blank_literals(code, "java")
    top = top_level(masked)
    if (declared := _JAVA_PUBLIC_TYPE.search(top) or _JAVA_TYPE.search(top)) is not None:
        name, text = declared[1], code
    else:
        header_end = _JAVA_HEADER.match(masked).end()
        name, text = "Snippet", f"{code[:header_end]}class Snippet {{\n{code[header_end:]}\n}}\n"
    source = root / "src" / f"{name}.java"
    source.parent.mkdir(parents=True)
    source.write_text(text, encoding="utf-8")
    return source


def blank_literals(code: str, language: str, strings: bool = True) -> str:
    """`code` with comments, string and char literals (and C preprocessor lines) blanked to spaces:
    same length and line breaks, so offsets match and braces in them no longer count. With
    strings=False, string and char literals are kept: only what is no code is blanked."""

    def blank(m: re.Match) -> str:
        if not strings and m[0][0] in "\"'":
            return m[0]
        return re.sub(r"[^\n]+", lambda s: " " * len(s[0]), m[0])

    return _LITERALS[language].sub(blank, code)


def top_level(masked: str) -> str:
    """The parts of blanked code outside every brace pair (braces inside are blanked too)."""
    kept, depth = [], 0
    for ch in masked:
        if ch == "{":
            depth += 1
        kept.append(ch if depth == 0 or ch == "\n" else " ")
        if ch == "}":
            depth = max(0, depth - 1)
    return "".join(kept)


# Each job is compiled as its own javac task through javax.tools (JSR 199): the compiler behind
# the javac command, with the same options, so one JVM start serves a batch and no job sees
# another's classes. A job line is "PACKAGE\tSOURCE\tOPTION...". A file in a JDK module's package
# ("package java.util;") compiles only as part of that module (else: "package exists in another
# module"), so such a job gets --patch-module from the JDK's module table. Output: "INDEX\tSTATUS"
# per job, diagnostics in javac.out beside the job's source. After a timeout the JVM exits (a
# javac task cannot be stopped); `run_javac_jobs` goes on with the rest in a new JVM.
_BATCH_JAVAC = """\
import java.io.*;
import java.lang.module.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.*;
import java.util.*;
import java.util.concurrent.*;
import javax.tools.*;

public class BatchJavac {
    public static void main(String[] args) throws Exception {
        long timeoutMs = Long.parseLong(args[0]);
        List<String> jobs = Files.readAllLines(Path.of(args[1]), StandardCharsets.UTF_8);
        Map<String, String> moduleOf = new HashMap<>();
        for (ModuleReference ref : ModuleFinder.ofSystem().findAll())
            for (String pkg : ref.descriptor().packages()) moduleOf.put(pkg, ref.descriptor().name());
        JavaCompiler javac = ToolProvider.getSystemJavaCompiler();
        ExecutorService worker = Executors.newSingleThreadExecutor(r -> {
            Thread t = new Thread(r, "javac");
            t.setDaemon(true);
            return t;
        });
        for (int i = 0; i < jobs.size(); i++) {
            String[] job = jobs.get(i).split("\\t");
            Path source = Path.of(job[1]);
            List<String> options = new ArrayList<>(Arrays.asList(job).subList(2, job.length));
            if (moduleOf.containsKey(job[0]))
                options.addAll(List.of("--patch-module", moduleOf.get(job[0]) + "=" + source.getParent()));
            Future<Boolean> task = worker.submit(() -> compile(javac, source, options));
            String status;
            try {
                status = task.get(timeoutMs, TimeUnit.MILLISECONDS) ? "ok" : "error";
            } catch (TimeoutException e) {
                System.out.println(i + "\\ttimeout");
                System.exit(0);
                return;
            } catch (ExecutionException e) {
                status = e.getCause() instanceof VirtualMachineError ? "memory" : "crash";
            }
            System.out.println(i + "\\t" + status);
            System.out.flush();
        }
        System.exit(0);
    }

    static boolean compile(JavaCompiler javac, Path source, List<String> options) throws IOException {
        try (Writer out = Files.newBufferedWriter(source.resolveSibling("javac.out"), StandardCharsets.UTF_8);
             StandardJavaFileManager files = javac.getStandardFileManager(null, null, StandardCharsets.UTF_8)) {
            return javac.getTask(out, files, null, options, null, files.getJavaFileObjects(source)).call();
        }
    }
}
"""


def check_java_many(codes: Sequence[str], limits: CheckerLimits = CheckerLimits()) -> list[CheckResult]:
    """`check_java` for many snippets in one JVM, each still its own javac compilation: the
    verdicts are those of single checks, faster: javac's JVM start-up, the bulk of a small file's
    check, is paid once."""
    java = Path(os.path.realpath(require_tool("javac"))).with_name("java")  # the JDK of the javac on PATH
    with tempfile.TemporaryDirectory(prefix="dslm-javac-") as tmp:
        root = Path(tmp)
        sources = [write_java_source(root / f"job{i}", code) for i, code in enumerate(codes)]
        jobs = [(java_package(code), source, javac_options(source)) for code, source in zip(codes, sources)]
        results = run_javac_jobs(java, root, jobs, limits)
    return [compile_failure(r, "compile error") for r in results]


def java_package(code: str) -> str:
    found = _JAVA_PACKAGE.match(blank_literals(code, "java"))
    return found[1] if found else ""


def run_javac_jobs(
    java: Path, root: Path, jobs: list[tuple[str, Path, list[str]]], limits: CheckerLimits
) -> list[CheckResult]:
    """Run BatchJavac on `jobs` (package, source, options) until each has a result, starting a new
    JVM after a job that timed out or killed it."""
    (root / "BatchJavac.java").write_text(_BATCH_JAVAC, encoding="utf-8")
    results: list[CheckResult | None] = [None] * len(jobs)
    while pending := [i for i, r in enumerate(results) if r is None]:
        lines = ["\t".join([jobs[i][0], str(jobs[i][1]), *jobs[i][2]]) + "\n" for i in pending]
        (root / "jobs.txt").write_text("".join(lines), encoding="utf-8")
        cmd = [
            str(java),
            f"-Xmx{limits.memory_mb}m",
            *_JVM_FLAGS,
            "BatchJavac.java",
            str(math.ceil(limits.timeout_s * 1000)),
            "jobs.txt",
        ]
        # The JVM's own limit allows each job its time, plus one for start-up.
        run = run_limited(cmd, root, limits.timeout_s * (len(pending) + 1), None)
        statuses = dict(line.split("\t") for line in run.output.splitlines() if re.fullmatch(r"\d+\t\w+", line))
        for k, i in enumerate(pending):
            if (status := statuses.get(str(k))) is not None:
                results[i] = job_result(status, jobs[i][1])
        if results[pending[0]] is None:  # the JVM died before its first answer: charge that job
            results[pending[0]] = CheckResult(ok=False, reason="exit 1" if run.ok else run.reason, output=run.output)
    return results  # type: ignore[return-value]


def job_result(status: str, source: Path) -> CheckResult:
    out = source.parent / "javac.out"
    output = out.read_bytes()[:MAX_OUTPUT_BYTES].decode("utf-8", "replace") if out.exists() else ""
    if status == "memory":
        return CheckResult(ok=False, reason="memory", output=output)
    returncode = {"ok": 0, "error": 1, "crash": 4, "timeout": None}[status]  # as the javac command exits
    return CheckResult(ok=status == "ok", reason=run_reason(returncode, output), output=output)


CHECKERS: dict[str, Callable[[str, CheckerLimits], CheckResult]] = {
    "python": check_python,
    "c": check_c,
    "java": check_java,
}
TOOLS = {"python": None, "c": "gcc", "java": "javac"}


def check_many(language: str, codes: Sequence[str], limits: CheckerLimits, workers: int) -> list[CheckResult]:
    """Check `codes` on `workers` threads (each check is a subprocess); results in input order.
    Java goes in batches of JAVA_BATCH per JVM."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if language == "java":
            batches = [codes[i : i + JAVA_BATCH] for i in range(0, len(codes), JAVA_BATCH)]
            return [r for batch in pool.map(lambda b: check_java_many(b, limits), batches) for r in batch]
        check = CHECKERS[language]
        return list(pool.map(lambda code: check(code, limits), codes))


def tool_version(language: str) -> str:
    """The checker's tool and version, recorded with results (verdicts depend on them)."""
    if language == "python":
        return f"python {sys.version.split()[0]}"
    tool = require_tool(TOOLS[language])
    cmd = [tool, "-dumpfullversion"] if language == "c" else [tool, "-version"]
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    version = (out.stdout + out.stderr).strip().splitlines()[-1]
    return f"gcc {version}" if language == "c" else version
