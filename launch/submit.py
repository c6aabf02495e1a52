"""dslm-submit: training, evaluation and sharding jobs through submitit, on SLURM or on this machine.

  dslm-submit train --nodes 2 --gpus-per-node 8 --time 24:00:00 launch/recipes/RECIPE.yaml [key=value ...]
  dslm-submit eval --gpus-per-node 1 runs/NAME [dslm-eval options ...]
  dslm-submit train --executor local --tasks-per-node 2 ... --wait      # this machine, 2 ranks
  dslm-submit shard --tasks 64 --cpus-per-task 32 --source ... --tokenizer T --out OUT [dslm-shard build options ...]

Every task runs `dslm-train` (or `dslm-eval`) as a child process, with RANK, WORLD_SIZE and the
rendezvous (the job's first host, a port from the job id) from the job's environment: no ssh,
hostfile or pdsh. Before the time limit (`--signal-delay` seconds) or on preemption the scheduler
sends submitit's SIGUSR2: the ranks agree at the next step, checkpoint together and stop, and the
job is requeued and resumes from that checkpoint (`--resume if-any`: a job requeued before its
first checkpoint starts fresh), at most `--max-requeues` times. A rank that stops answering
(train.collective_timeout_s) or a failed rendezvous (dslm-train's exit status 69) requeues the
job the same way. The port is DSLM_MASTER_PORT, else one from the job id and its restart count
below Linux's ephemeral range (dslm.engine.rendezvous_port). submitit's logs (one per task) go to
runs/NAME/submitit/.

`shard` runs `dslm-shard build` as N tasks per stage (digests, dedup, write), each task one process
on one node: on SLURM one job array per stage, each held by afterok until the array before has
succeeded, then `dslm-shard merge OUT` as one job; on the local executor the stages run one after
the other from this process. Every argument dslm-submit does not know (spelled in full) is dslm-shard
build's, checked here before anything is submitted; a task stopped on SIGUSR2 is requeued and
carries on. Logs go to OUT/submitit/.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit
from submitit.core.utils import UncompletedJobError

from dslm.cli import ArgumentParser, run_command
from dslm.compat import has_method, require
from dslm.errors import DslmError
from dslm.files import check_creatable
from dslm_local.cli import counted
from dslm_local.errors import EXIT_RETRY, EXIT_STOPPED

PROG = "dslm-submit"
EXECUTORS = ("auto", "slurm", "local")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class SlurmConfig:
    """Where and how a job runs; the fields are dslm-submit's options. Raises DslmError for a value
    out of its range."""

    executor: str = "auto"
    """"slurm" (sbatch through submitit), "local" (processes on this machine) or "auto" (--executor;
    slurm when `sbatch` is on the PATH, else local: resolved on creation)."""
    nodes: int = 1
    """Nodes the job runs on, >= 1 (--nodes); the local executor takes only 1."""
    gpus_per_node: int = 0
    """GPUs per node, >= 0 (--gpus-per-node): SLURM's --gpus-per-node; the local executor makes
    GPUs 0 .. N-1 visible (none for 0). 0 runs CPU ranks."""
    tasks_per_node: int = 0
    """Ranks (processes) per node, >= 0 (--tasks-per-node); 0 means one per GPU (one per node
    without GPUs). The world size is nodes x ranks per node."""
    time_min: int = 24 * 60
    """Time limit in minutes, >= 1 (--time, in SLURM's formats, rounded up to whole minutes); the
    local executor enforces it too."""
    partition: str | None = None
    """SLURM partition (--partition); None: the cluster's default. Not used by the local executor."""
    cpus_per_task: int | None = None
    """CPU cores per task, i.e. per rank (--cpus-per-task); None: SLURM's default. Not used by the
    local executor. Not checked: sbatch judges the value."""
    max_requeues: int = 3
    """Requeues after a timeout or preemption before the job gives up, >= 0 (--max-requeues); the
    run stays resumable with --resume auto."""
    signal_delay_s: int = 120
    """Seconds before the time limit that the ranks are told to checkpoint and stop, >= 0
    (--signal-delay)."""
    extra: dict[str, str] = field(default_factory=dict)
    """More sbatch options from `--slurm KEY=VALUE` (e.g. account=X, qos=high): sbatch's option name
    without the leading dashes, and its value; each becomes `#SBATCH --KEY=VALUE`, not checked.
    Not used by the local executor."""

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise DslmError(f"--executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.executor == "auto":
            self.executor = "slurm" if shutil.which("sbatch") else "local"
        if self.executor == "slurm" and not shutil.which("sbatch"):
            raise DslmError(
                "--executor slurm: sbatch is not on the PATH (use --executor local on a machine without SLURM)"
            )
        if self.executor == "local" and self.nodes != 1:
            raise DslmError(f"--executor local runs on this machine only: --nodes {self.nodes} needs SLURM")
        for name in ("nodes", "time_min"):
            if getattr(self, name) < 1:
                raise DslmError(f"--{name.replace('_min', '').replace('_', '-')} must be at least 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise DslmError("--cpus-per-task must be at least 1")
        for name in ("gpus_per_node", "tasks_per_node", "max_requeues", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise DslmError(f"--{name.replace('_s', '').replace('_', '-')} must not be negative")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


def parse_minutes(text: str) -> int:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise DslmError(f"--time {text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM or MM:SS
        seconds = a * 60 + (b or 0)
    return max(1, -(-seconds // 60))


# --- what runs in every task -------------------------------------------------------------------


def rank_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """torch.distributed's variables for this task, from the scheduler's environment."""
    from dslm.engine import rendezvous_port  # deepspeed: only in the tasks

    return {
        "RANK": str(job.global_rank),
        "LOCAL_RANK": str(job.local_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": os.environ.get("DSLM_MASTER_PORT")
        or str(rendezvous_port(int(re.sub(r"\D", "", job.job_id) or 0), int(os.environ.get("SLURM_RESTART_COUNT", 0)))),
    }


def start_child(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the child and reap it from a thread, so that its exit status can be awaited by
    polling `returncode`, which takes no lock (submitit's signal handler, which runs in the main
    thread at any moment, waits for the child too)."""
    process = subprocess.Popen(argv, env=env, preexec_fn=die_with_task)
    threading.Thread(target=process.wait, daemon=True).start()
    return process


def die_with_task() -> None:
    """In the child, before exec: get SIGKILL when the task process dies (the local executor
    kills only the processes it started, which would leave the child running)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_status(process: subprocess.Popen) -> int:
    while process.returncode is None:
        time.sleep(0.2)
    return process.returncode


@dataclass
class ChildJob:
    """A submitit task that runs one dslm command in a child process. On the timeout or
    preemption signal, submitit calls `checkpoint` on rank 0: the child is stopped and waited
    for, and the returned submission is what the requeued job runs."""

    argv: list[str]
    max_requeues: int
    requeues: int = 0
    in_group: bool = True
    """The child is a rank of a process group (dslm-train, dslm-eval): it gets RANK, WORLD_SIZE and
    the rendezvous. False for a command that runs alone (a dslm-shard task)."""
    stop_signal = signal.SIGTERM

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        print(f"{PROG}: {job} (requeue {self.requeues}): {shlex.join(self.command())}", flush=True)
        self.child = start_child(self.command(), {**os.environ, **(rank_env(job) if self.in_group else {})})
        status = exit_status(self.child)
        name = Path(self.argv[0]).name
        if status in (EXIT_STOPPED, EXIT_RETRY) and job.global_rank != 0:
            return status  # the ranks stopped together at a checkpoint: rank 0's task requeues the job
        if status == EXIT_RETRY:  # a hung rank or a failed rendezvous: requeue as on the timeout signal
            print(f"{PROG}: {name} exited with {status} (a rank or the rendezvous failed): requeueing", flush=True)
            os.kill(os.getpid(), signal.SIGUSR2)  # submitit's handler calls `checkpoint` and requeues
            time.sleep(60)  # the handler exits this process
        if status == EXIT_STOPPED:
            raise DslmError(
                f"{name} stopped at a checkpoint on a signal submitit does not handle (SIGTERM: "
                f"preemption?); the job resumes if SLURM requeues it, else resubmit with --resume auto"
            )
        if status != 0:
            raise DslmError(f"{name} exited with status {status}")
        return status

    def command(self) -> list[str]:
        return self.argv

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        if getattr(self, "child", None) is not None and self.child.returncode is None:
            self.child.send_signal(self.stop_signal)
            print(f"{PROG}: stopping {self.argv[0]} ({self.stop_signal.name})", flush=True)
            exit_status(self.child)
        if self.requeues >= self.max_requeues:
            print(f"{PROG}: not requeued: --max-requeues {self.max_requeues} reached; resubmit to go on", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(replace(self, requeues=self.requeues + 1))


@dataclass
class TrainJob(ChildJob):
    """dslm-train on every rank; a requeued job resumes from the run's newest intact checkpoint."""

    # dslm-train checkpoints at the next step and exits 75 on SIGUSR1 (dslm.stop)
    stop_signal = signal.SIGUSR1

    def command(self) -> list[str]:
        requeued = self.requeues > 0 or int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0
        if requeued and "--resume" not in self.argv:  # from the newest intact checkpoint, else fresh
            return [*self.argv, "--resume", "if-any"]
        return self.argv


# --- submission --------------------------------------------------------------------------------


def make_executor(cfg: SlurmConfig, folder: Path, name: str, after: str | None = None) -> submitit.Executor:
    """submitit's executor for `cfg`, its logs in `folder`; on SLURM, a job named `name` that starts
    once job `after` (every task of it, for an array) has succeeded (sbatch --dependency=afterok),
    and is ended by SLURM when that job failed instead of waiting in the queue for ever. DslmError
    when a folder above `folder` is a file (dslm.files.check_creatable)."""
    check_creatable(folder)
    if cfg.executor == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(
            timeout_min=cfg.time_min,
            tasks_per_node=cfg.ranks_per_node,
            gpus_per_node=cfg.gpus_per_node,
            signal_delay_s=cfg.signal_delay_s,
            stderr_to_stdout=True,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
    executor.update_parameters(
        job_name=name,
        nodes=cfg.nodes,
        ntasks_per_node=cfg.ranks_per_node,
        gpus_per_node=cfg.gpus_per_node,
        time=cfg.time_min,
        signal_delay_s=cfg.signal_delay_s,
        partition=cfg.partition,
        cpus_per_task=cfg.cpus_per_task,
        stderr_to_stdout=True,
        # one rank dying ends every task of the job instead of leaving the others in a collective
        srun_args=["--kill-on-bad-exit=1"],
        dependency=f"afterok:{after}" if after else None,
        additional_parameters={**({"kill_on_invalid_dep": "yes"} if after else {}), **cfg.extra},
    )
    return executor


def describe(executor: submitit.Executor, cfg: SlurmConfig, job: ChildJob, folder: Path) -> str:
    """What --dry-run prints: the command every task runs and, on SLURM, the sbatch script."""
    lines = [
        executor_line(cfg),
        f"logs: {folder}",
        f"each task: RANK=... WORLD_SIZE={cfg.nodes * cfg.ranks_per_node} {shlex.join(job.command())}",
    ]
    if isinstance(executor, submitit.SlurmExecutor):
        lines += ["sbatch script:", sbatch_script(executor)]
    return "\n".join(lines)


def executor_line(cfg: SlurmConfig) -> str:
    return (
        f"executor: {cfg.executor}, {counted(cfg.nodes, 'node')} x {counted(cfg.ranks_per_node, 'task')}, "
        f"{counted(cfg.gpus_per_node, 'GPU')} per node, {cfg.time_min} min, at most "
        f"{counted(cfg.max_requeues, 'requeue')}"
    )


def sbatch_script(executor: submitit.SlurmExecutor) -> str:
    """The sbatch script submitit would submit, from its own private text builder (submitit has no
    public way to show it): checked to exist with the signature it had in the pinned version."""
    require(
        "submitit",
        "SlurmExecutor has _make_submission_file_text(command, uid) and _submitit_command_str",
        has_method(executor, "_make_submission_file_text", ("command", "uid"))
        and isinstance(getattr(executor, "_submitit_command_str", None), str),
    )
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit_array(executor: submitit.Executor, jobs: list[ChildJob]) -> list[submitit.Job]:
    """`jobs` as one job array on SLURM (one plain job when there is one; processes when local).
    Raises DslmError with sbatch's own line when it refuses the job (a bad partition or option)."""
    try:
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    except submitit.core.utils.FailedJobError as e:
        raise DslmError(f"the job was not submitted: {refusal(e)}") from None
    return submitted


def refusal(e: Exception) -> str:
    """sbatch's error line in submitit's report of a refused submission."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else repr(e))


def task_log(folder: Path, job: submitit.Job) -> Path:
    """The log of a job's first task (ARRAYID_K_0_log.out for the array element K)."""
    return folder / f"{job.job_id}_0_log.out"


def wait_for(job: submitit.Job, log: Path, name: str = "") -> None:
    """Until `job` ends; one line and exit status 1 if it failed (`name` says which job it is)."""
    label = f"{name} (job {job.job_id})" if name else f"job {job.job_id}"
    try:
        job.results()  # one per task
    except (submitit.core.utils.FailedJobError, UncompletedJobError) as e:
        print(f"{PROG}: {label} failed: {failure(e, log)} (log: {log})", file=sys.stderr)
        raise SystemExit(1) from e
    print(f"{PROG}: {label} finished", flush=True)


def failure(e: Exception, log: Path) -> str:
    """Why a job failed, in one line: the child's own error line (a dslm command says `PROG: error:
    ...`) in the log of its first task, or of another (dslm-train's ranks print an error they share
    once, in whichever rank's log: dslm.logs), else the last line of what submitit reports (its
    trace, before the paths of the logs)."""
    for path in [log, *sorted(log.parent.glob(log.name.replace("_0_log.out", "_*_log.out")))]:
        text = path.read_text(errors="replace") if path.exists() else ""
        if errors := [line for line in text.splitlines() if line.startswith("dslm-") and ": error: " in line]:
            return errors[-1]
    reported = str(e).split("\n\n---")[0].strip()
    return reported.splitlines()[-1] if reported else type(e).__name__


def wait_in_order(jobs: list[tuple[str, submitit.Job]], folder: Path) -> None:
    """Wait for each (name, job) in turn; when one fails, cancel the others (one held by afterok on
    a failed job would wait in the queue for ever) and exit 1."""
    for i, (name, job) in enumerate(jobs):
        try:
            wait_for(job, task_log(folder, job), name)
        except SystemExit:
            for _, other in jobs[i + 1 :]:
                other.cancel(check=False)
            raise


# --- the command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    launcher = launcher_parser(ranks=True)
    train = sub.add_parser("train", parents=[launcher], help="a training run (dslm-train on every rank)")
    train.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (default: the recipe's ds_config)")
    train.add_argument("--resume", metavar="auto|if-any|CHECKPOINT", help="as dslm-train --resume")
    train.add_argument("args", nargs="*", metavar="[RECIPE] key=value", help="a YAML recipe, then overrides")
    evaluation = sub.add_parser("eval", parents=[launcher], help="dslm-eval over a run's checkpoints (one task)")
    evaluation.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    evaluation.add_argument("eval_args", nargs=argparse.REMAINDER, metavar="...", help="dslm-eval options")
    add_shard_parser(sub)
    args, build_args = p.parse_known_args(argv)
    if build_args and args.kind != "shard":
        p.error(f"unrecognized arguments: {' '.join(build_args)}")
    args.build_args = build_args  # shard: every argument dslm-submit does not know is dslm-shard build's
    return args


def launcher_parser(ranks: bool) -> argparse.ArgumentParser:
    """The options of where and how a job runs, as a parent parser; `ranks`: with the shape of a
    multi-rank job (--nodes, --gpus-per-node, --tasks-per-node)."""
    launcher = argparse.ArgumentParser(add_help=False)
    g = launcher.add_argument_group("where the job runs")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="auto",
        help="slurm (sbatch via submitit), local (this machine), auto: slurm when sbatch is on the PATH",
    )
    if ranks:
        g.add_argument("--nodes", type=int, default=1, help="(default: %(default)s)")
        g.add_argument("--gpus-per-node", type=int, default=0, help="(default: %(default)s)")
        g.add_argument(
            "--tasks-per-node", type=int, default=0, help="ranks per node (default: one per GPU, 1 without GPUs)"
        )
    g.add_argument("--time", default="24:00:00", help="time limit, in SLURM's formats (default: %(default)s)")
    g.add_argument("--partition")
    g.add_argument("--cpus-per-task", type=int, help="SLURM's --cpus-per-task (default: the cluster's)")
    g.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="requeues on timeout or preemption before giving up (default: %(default)s)",
    )
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="SECONDS",
        help="checkpoint and stop this long before the time limit (default: %(default)s)",
    )
    g.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. account=myproj or qos=high (repeatable)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    g.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")
    return launcher


def add_shard_parser(sub: argparse._SubParsersAction) -> None:
    shard = sub.add_parser(
        "shard",
        parents=[launcher_parser(ranks=False)],
        allow_abbrev=False,
        usage=f"{PROG} shard --tasks N [options] DSLM-SHARD-BUILD-ARGUMENTS ...",
        help="a distributed dslm-shard build: N tasks per stage (SLURM job arrays), then the merge",
        description="Run `dslm-shard build` as N tasks per stage (digests, dedup, write; each stage after "
        "the one before) and then `dslm-shard merge OUT`. Every argument not listed here, in "
        "full, is dslm-shard build's (see dslm-shard build --help); dslm-submit gives each task "
        "its --tasks, --task and --stage, and clears an earlier build in OUT itself on "
        "--overwrite. SLURM: one job array per stage and the merge, chained by afterok, each "
        "task on one node with --cpus-per-task cores. Local: the stages run one after the "
        "other, each task with --workers cores/N unless given, and dslm-submit waits for them.",
    )
    shard.add_argument(
        "--tasks",
        type=int,
        action="append",
        required=True,
        metavar="N",
        help="tasks per stage, >= 1; each one reads and writes its part of OUT",
    )
    shard.set_defaults(nodes=1, gpus_per_node=0, tasks_per_node=1)  # every task is one process


def slurm_config(args: argparse.Namespace) -> SlurmConfig:
    bad = [kv for kv in args.slurm if "=" not in kv]
    if bad:
        raise DslmError(f"--slurm {bad[0]!r} is not KEY=VALUE")
    return SlurmConfig(
        executor=args.executor,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time_min=parse_minutes(args.time),
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay,
        extra=dict(kv.split("=", 1) for kv in args.slurm),
    )


def bin_of(command: str) -> str:
    """The console script beside this interpreter (the tasks run this environment's dslm)."""
    return str(Path(sys.executable).parent / command)


def train_job(args: argparse.Namespace, cfg: SlurmConfig) -> tuple[TrainJob, Path, str]:
    from dslm.train import parse_args as train_args  # torch: only for train jobs
    from dslm.train import resolve_config

    recipe = [a for a in args.args if "=" not in a]
    if len(recipe) > 1:
        raise DslmError(f"one recipe at most, got {' '.join(recipe)}")
    argv = (["--config", recipe[0]] if recipe else []) + [a for a in args.args if "=" in a]
    argv += (["--deepspeed", args.deepspeed] if args.deepspeed else []) + (
        ["--resume", args.resume] if args.resume else []
    )
    run_cfg = resolve_config(train_args(argv))  # fails here, not in the queue, on a bad recipe or override
    run_dir = run_cfg.run_dir.path.resolve()
    job = TrainJob(argv=[bin_of("dslm-train"), *argv], max_requeues=cfg.max_requeues)
    return job, run_dir, run_cfg.name


def eval_job(args: argparse.Namespace, cfg: SlurmConfig) -> tuple[ChildJob, Path, str]:
    from dslm.model_source import resolve_source  # torch: only for eval jobs

    target = Path(args.target).resolve()
    if cfg.nodes * cfg.ranks_per_node != 1:
        raise DslmError("dslm-eval runs as one task: leave --nodes and --tasks-per-node at 1")
    source = resolve_source(target)
    source.need_weights()
    home = source.run.path if source.run else target  # the run dslm-eval writes into, else beside the export
    job = ChildJob(argv=[bin_of("dslm-eval"), str(target), *args.eval_args], max_requeues=cfg.max_requeues)
    return job, home, f"{home.name}-eval"


def run(args: argparse.Namespace) -> None:
    cfg = slurm_config(args)
    if args.kind == "shard":
        return run_shard(args, cfg)
    job, run_dir, name = (train_job if args.kind == "train" else eval_job)(args, cfg)
    folder = run_dir / "submitit"
    executor = make_executor(cfg, folder, f"dslm-{name}")
    if args.dry_run:
        print(describe(executor, cfg, job, folder))
        return
    [submitted] = submit_array(executor, [job])
    log = task_log(folder, submitted)
    print(
        f"{PROG}: submitted {args.kind} job {submitted.job_id} ({cfg.executor}, "
        f"{counted(cfg.nodes, 'node')} x {counted(cfg.ranks_per_node, 'task')}) for {run_dir}\n  log:         {log}\n"
        f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}",
        flush=True,
    )
    if args.wait:
        wait_for(submitted, log)


# --- a distributed dslm-shard build ------------------------------------------------------------

TASK_OPTIONS = ("--tasks", "--task", "--stage")
"""dslm-shard build's options that dslm-submit sets for each task."""


@dataclass
class ShardJobs:
    """`dslm-shard build` as `tasks` tasks per stage, every task of a stage after every task of the
    stage before (they share OUT), then `dslm-shard merge OUT`. A task is a ChildJob: requeued on
    the timeout signal, it continues (write) or redoes its stage's part (digests, dedup)."""

    build_args: list[str]
    out: str
    tasks: int
    stages: tuple[str, ...]
    max_requeues: int

    def task(self, stage: str, k: int | str) -> ChildJob:
        argv = [
            bin_of("dslm-shard"),
            "build",
            *self.build_args,
            "--tasks",
            str(self.tasks),
            "--task",
            str(k),
            "--stage",
            stage,
        ]
        return ChildJob(argv=argv, max_requeues=self.max_requeues, in_group=False)

    def merge(self) -> ChildJob:
        argv = [bin_of("dslm-shard"), "merge", self.out]
        return ChildJob(argv=argv, max_requeues=self.max_requeues, in_group=False)

    def steps(self) -> list[tuple[str, list[ChildJob]]]:
        """(name, jobs) in the order they run: each stage's tasks, then the merge."""
        stages = [(stage, [self.task(stage, k) for k in range(self.tasks)]) for stage in self.stages]
        return [*stages, ("merge", [self.merge()])]


def shard_build(args: argparse.Namespace, cfg: SlurmConfig) -> tuple[ShardJobs, bool]:
    """The build asked for, its arguments checked here by dslm-shard's own parser (not in the
    queue); and whether an earlier build in OUT is to be cleared first (--overwrite, which the
    tasks do not get)."""
    from dslm.data.manifest import check_build_tokenizer
    from dslm.data.tokens import load_text_tokenizer
    from dslm_shards.build import all_cores, token_dtype
    from dslm_shards.cli import parser as shard_parser
    from dslm_shards.cli import shard_config
    from dslm_shards.sources import check_tasks, parse_source
    from dslm_shards.tasks import STAGES, refuse_finished

    if len(args.tasks) > 1:
        raise DslmError("--tasks is given once (dslm-submit gives every task its --tasks, --task and --stage)")
    tasks = args.tasks[0]
    check_tasks(tasks)
    refused = [a for a in args.build_args if names_option(a, *TASK_OPTIONS)]
    if refused:
        raise DslmError(
            f"{refused[0]}: dslm-submit gives every task its --tasks, --task and --stage; "
            "leave them out of dslm-shard build's arguments"
        )
    overwrite = any(names_option(a, "--overwrite") for a in args.build_args)
    build_args = [a for a in args.build_args if not names_option(a, "--overwrite")]
    if cfg.executor == "local" and not any(names_option(a, "--workers") for a in build_args):
        build_args = ["--workers", str(max(1, all_cores() // tasks)), *build_args]  # N tasks share the cores
    build = shard_parser().parse_args(["build", *build_args])  # exits 2 with one line on a bad argument
    cfg_build = shard_config(build)  # a value out of range (--seq-len 0)
    check_build_tokenizer(cfg_build.tokenizer, cfg_build.out)  # a bad or replaced tokenizer: here, not in the queue
    token_dtype(load_text_tokenizer(cfg_build.tokenizer).get_vocab_size(), cfg_build.dtype)
    for spec in build.source:
        parse_source(spec, tuple(build.exclude))  # a missing folder, a typo in a KIND: here, not in the queue
    if not overwrite:
        refuse_finished(build.out)
    return ShardJobs(build_args, str(build.out), tasks, STAGES, cfg.max_requeues), overwrite


def names_option(arg: str, *options: str) -> bool:
    """Whether a command-line word names one of `options` (`--opt`, `--opt=V`, or abbreviated as
    argparse allows, from two letters on: a one-letter `--s` or `--t` is ambiguous in dslm-shard)."""
    name = arg.split("=", 1)[0]
    return name.startswith("--") and len(name) >= 4 and any(option.startswith(name) for option in options)


def run_shard(args: argparse.Namespace, cfg: SlurmConfig) -> None:
    """Check the build, then print it (--dry-run), run it here step by step, or submit every step
    to SLURM at once (and with --wait, wait for each job in turn)."""
    from dslm_shards.tasks import clear_build

    build, overwrite = shard_build(args, cfg)
    folder = Path(build.out).resolve() / "submitit"
    if args.dry_run:
        print(describe_shard(build, cfg, folder, overwrite))
        return
    if overwrite:
        clear_build(Path(build.out))
    if cfg.executor == "local":
        return run_steps_here(build, cfg, folder)
    submitted = submit_steps(build, cfg, folder)
    print(submitted_lines(build, submitted, folder), flush=True)
    if args.wait:
        wait_in_order([job for name, jobs in submitted for job in labelled(name, jobs)], folder)


def submit_steps(build: ShardJobs, cfg: SlurmConfig, folder: Path) -> list[tuple[str, list[submitit.Job]]]:
    """Every step at once on SLURM, one job array each, each held until the one before has succeeded."""
    submitted, after = [], None
    for name, jobs in build.steps():
        array = submit_array(make_executor(cfg, folder, f"dslm-shard-{name}", after), jobs)
        submitted.append((name, array))
        after = array_id(array[0])
    return submitted


def run_steps_here(build: ShardJobs, cfg: SlurmConfig, folder: Path) -> None:
    """The local executor knows no dependencies: each step's tasks start once every task of the step
    before has succeeded, and this process waits for them."""
    for name, jobs in build.steps():
        submitted = submit_array(make_executor(cfg, folder, f"dslm-shard-{name}"), jobs)
        print(f"{PROG}: {name}: {counted(len(jobs), 'task')} on this machine, logs in {folder}", flush=True)
        wait_in_order(labelled(name, submitted), folder)


def array_id(job: submitit.Job) -> str:
    return job.job_id.split("_")[0]


def labelled(name: str, jobs: list[submitit.Job]) -> list[tuple[str, submitit.Job]]:
    return [(f"{name} task {k}", job) for k, job in enumerate(jobs)]


def submitted_lines(build: ShardJobs, submitted: list[tuple[str, list[submitit.Job]]], folder: Path) -> str:
    lines, after = [f"{PROG}: submitted the build of {build.out}, {counted(build.tasks, 'task')} per stage:"], ""
    for name, jobs in submitted:
        lines.append(f"  {name + ':':8} job {'array ' if len(jobs) > 1 else ''}{array_id(jobs[0])}{after}")
        after = f", afterok:{array_id(jobs[0])}"
    lines.append(f"  logs:    {folder} (task K of array ID: ID_K_0_log.out)")
    return "\n".join(lines)


def describe_shard(build: ShardJobs, cfg: SlurmConfig, folder: Path, overwrite: bool) -> str:
    """What --dry-run prints for a shard build: each step's command (task K's) and what it waits
    for and, on SLURM, the sbatch script of each step."""
    slurm = cfg.executor == "slurm"
    lines = [f"{executor_line(cfg)}, for each task of each step", f"logs: {folder}"]
    if overwrite:
        lines.append(f"first: the earlier build in {build.out} is cleared, here (--overwrite)")
    lines.append(
        f"steps: {' -> '.join([*build.stages, 'merge'])}, each once every task of the one "
        f"before has succeeded ({'sbatch --dependency=afterok' if slurm else 'dslm-submit waits'})"
    )
    for stage in build.stages:
        lines += [
            f"{stage}: {counted(build.tasks, 'task')}, K = 0 .. {build.tasks - 1}",
            f"  {shlex.join(build.task(stage, 'K').argv)}",
        ]
    lines += ["merge: 1 task", f"  {shlex.join(build.merge().argv)}"]
    if slurm:
        after = None
        for name, jobs in build.steps():
            lines += [f"sbatch script of {name}:", dry_run_script(cfg, folder, name, len(jobs), after)]
            after = f"{name.upper()}_JOB_ID"
    return "\n".join(lines)


def dry_run_script(cfg: SlurmConfig, folder: Path, name: str, tasks: int, after: str | None) -> str:
    """The sbatch script of one step; `after` stands for the id of the step before, known only once
    that one is submitted."""
    executor = make_executor(cfg, folder, f"dslm-shard-{name}", after)
    if tasks > 1:  # what submitit's batch() sets on the copy it submits an array with
        executor.parameters["map_count"] = tasks
    return sbatch_script(executor)


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
