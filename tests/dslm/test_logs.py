"""Who prints where (dslm/logs.py): each command, run as a user runs it, prints dslm's own lines;
what DeepSpeed and torch print goes to the run's logs/rankR.log (dslm-train) or shows with
--verbose; a bad input on two ranks is one error line; long phases say what they do first."""

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from dslm.logs import LibraryOutput, first_to_report
from dslm.ops import extensions_dir, op_build_current
from dslm.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OP = "deepspeed_shm_comm"
LIBRARY_LINES = (
    "Setting accelerator to CPU",
    "built successfully",
    "[WARNING]",
    "[INFO]",
    "FutureWarning",
    "Processing zero checkpoint",
    "Reconstructed fp32 state dict",
    "Loading checkpoint shards",
    "MPU is not provided",
    "*** 1. Extracting ZeRO fragments",
    "ld returned",
    "[torch.onnx]",
)
"""Marks of what DeepSpeed, torch and the tools they run print: the accelerator DeepSpeed picked,
its op build and the linker of its op probes, zero_to_fp32, its universal converter and
checkpoint loader, torch.distributed's deprecation warning on every rank, the ONNX exporter."""


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment with `extra`: the ninja on its PATH builds DeepSpeed's op, as in
    every other test (two ninja versions on one build folder would each rebuild what the other built)."""
    return {**os.environ, **extra}


def library_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(mark in line for mark in LIBRARY_LINES)]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(shards: Path, runs: Path, name: str, max_steps: int, *extra: str) -> list[str]:
    return [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        "train.micro_batch_size=2",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=1",
        "train.log_interval=1",
        f"train.checkpoint_interval={max_steps}",
        "train.val_interval=0",
        *extra,
    ]


def start_ranks(args: list[str], world_size: int, cwd: Path) -> list[tuple[int, str, str]]:
    """dslm-train on `world_size` ranks started as srun or torchrun start them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), each with its own output files: (exit status, stdout, stderr) per rank."""
    port, procs = unused_port(), []
    for rank in range(world_size):
        env = user_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        with open(cwd / f"rank{rank}.out", "w") as out, open(cwd / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([BIN / "dslm-train", *args], cwd=cwd, env=env, stdout=out, stderr=err))
    return [
        (proc.wait(timeout=900), (cwd / f"rank{rank}.out").read_text(), (cwd / f"rank{rank}.err").read_text())
        for rank, proc in enumerate(procs)
    ]


def run(command: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=user_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def zero2_run(tiny_shards, tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """A ZeRO-2 run trained on 2 ranks to its tag at step 2, and each rank's output."""
    runs = tmp_path_factory.mktemp("runs")
    return runs / "t", start_ranks(train_args(tiny_shards[0], runs, "t", 2), 2, runs)


@pytest.mark.slow
def test_two_ranks_print_dslms_lines_and_log_the_libraries_and_a_resume_says_it_converts(zero2_run, tiny_shards):
    run_dir, ranks = zero2_run
    for rank, (status, out, err) in enumerate(ranks):
        assert status == 0, out[-2000:] + err[-3000:]
        assert library_lines(out + err) == []
        log = RunDir(run_dir).rank_log(rank).read_text()
        for line in (
            "Setting accelerator to CPU",
            "built successfully",
            "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated",
        ):
            assert line in log, (rank, log)
    assert "engine: 2 ranks on cpu" in ranks[0][1] and ranks[1][1] == ""  # dslm's lines: rank 0's

    resumed = run(
        [BIN / "dslm-train", *train_args(tiny_shards[0], run_dir.parent, "t", 4), "--resume", "auto"], run_dir.parent
    )
    said = resumed.stdout.splitlines()
    converting = f"converting {run_dir / 'checkpoints' / 'global_step2'} to DeepSpeed's universal form"
    assert [line.startswith(converting) for line in said].index(True) < said.index(
        "engine: 1 rank on cpu, backend gloo, ZeRO stage 2, bfloat16 weights, AdamW"
    )  # before it starts
    assert "universal form: 100%" in resumed.stderr and library_lines(resumed.stdout + resumed.stderr) == []
    log = RunDir(run_dir).rank_log(0).read_text()
    assert "*** 1. Extracting ZeRO fragments" in log and "MPU is not provided" in log
    assert log.count("==== dslm-train") == 2, "each start appends to the rank's log"


@pytest.mark.slow
def test_eval_generate_and_export_print_their_own_lines_and_the_libraries_only_with_verbose(zero2_run, tmp_path):
    run_dir, _ = zero2_run
    tag = run_dir / "checkpoints" / "global_step2"
    prompt = ["--prompt", "def", "--max-new-tokens", "3"]
    commands = {
        "eval": [BIN / "dslm-eval", tag, "--metrics", "perplexity"],
        "generate": [BIN / "dslm-generate", tag, *prompt],
        "export": [BIN / "dslm-export", tag, tmp_path / "hf"],
        "onnx": [BIN / "dslm-export", tag, tmp_path / "onnx", "--format", "onnx"],
    }
    printed = {name: run(command, tmp_path) for name, command in commands.items()}
    for name, proc in printed.items():
        assert library_lines(proc.stdout + proc.stderr) == [], name
    assert printed["generate"].stdout.startswith("def")
    assert printed["onnx"].stderr.startswith("exporting the model to ONNX with torch.onnx")
    assert "onnx export: 100%" in printed["onnx"].stderr

    verbose = run([BIN / "dslm-generate", tag, *prompt, "--verbose"], tmp_path)
    assert verbose.stdout == printed["generate"].stdout, "the libraries print on stderr, the results stay alone"
    for line in ("Setting accelerator to CPU", "Processing zero checkpoint", "Reconstructed fp32 state dict"):
        assert line in verbose.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, error, logged",
    [
        ("train.freeze_blocks=5", "train.freeze_blocks=5 is more than the model's 2 blocks (model.n_layer)", False),
        ("model.block_size=4", "but model.block_size=4; rebuild the shards with --seq-len 4", True),
    ],
)
def test_a_bad_input_on_two_ranks_is_one_error_line(tiny_shards, tmp_path, override, error, logged):
    """A config that cannot be is refused before the run directory exists; one that the shards
    refuse is refused after each rank's log is open, and each rank's log has the line too."""
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(unused_port()), REPO / "dslm/train.py"]
    args = train_args(tiny_shards[0], tmp_path, "t", 2, override)
    proc = subprocess.run([*launch, *args], cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "dslm-train: error:" in line]
    assert len(errors) == 1 and error in errors[0], proc.stderr[-3000:]
    if logged:
        assert all(errors[0] in RunDir(tmp_path / "t").rank_log(rank).read_text() for rank in (0, 1))
    else:
        assert not (tmp_path / "t").exists()


def test_an_error_is_printed_by_the_first_rank_of_a_launch_to_report_it(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert first_to_report("x") and first_to_report("x"), "a single process always prints"
    # ranks started by one launcher (here this process's parent): the same error once, another one too
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "20001")
    assert first_to_report("x")
    assert not first_to_report("x")
    assert first_to_report("y"), "an error only one rank sees is printed by it"
    monkeypatch.setenv("MASTER_PORT", "20002")
    assert first_to_report("x"), "another launch prints its errors again"
    # ranks that srun starts have no launcher in common: SLURM's step names the launch
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert first_to_report("x") and not first_to_report("x")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert first_to_report("x"), "a requeued job is another launch"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / f"dslm-{os.getuid()}-reported").write_text("not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "elsewhere"))
    assert first_to_report("z") and first_to_report("z"), "when it cannot be known, printed twice, never lost"


def test_library_output_keeps_the_terminal_for_dslm_and_the_rest_for_the_log(capfd, tmp_path):
    log = tmp_path / "logs" / "rank0.log"
    with LibraryOutput("prog") as output:
        os.write(1, b"before the log is named\n")
        output.keep_in(log)
        print("dslm's line")
        print("a library's print", file=sys.__stdout__, flush=True)
        os.write(2, b"C++ on descriptor 2\n")
        subprocess.run(["echo", "a child process"], check=True)
        warnings.warn("a library's warning", FutureWarning)
        logging.getLogger("some.library").warning("a library's record")
    out, err = capfd.readouterr()
    assert out == "dslm's line\n" and err == ""
    kept = log.read_text()
    for line in (
        "before the log is named",
        "a library's print",
        "C++ on descriptor 2",
        "a child process",
        "FutureWarning: a library's warning",
        "a library's record",
    ):
        assert line in kept
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n", "descriptors 1 and 2 are back"


def test_a_crash_shows_what_the_libraries_printed_before_its_traceback(capfd, tmp_path):
    with pytest.raises(RuntimeError), LibraryOutput("prog"):
        os.write(2, b"the library's last words\n")
        raise RuntimeError("a bug")
    assert capfd.readouterr().err == "prog: what DeepSpeed and torch printed:\nthe library's last words\n"
    with pytest.raises(RuntimeError), LibraryOutput("prog") as output:
        output.keep_in(tmp_path / "rank0.log")
        raise RuntimeError("a bug")
    assert capfd.readouterr().err == f"prog: what DeepSpeed and torch printed is in {tmp_path / 'rank0.log'}\n"
    with pytest.raises(SystemExit), LibraryOutput("prog"):
        os.write(2, b"noise before a one-line error\n")
        raise SystemExit(2)
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_an_op_build_is_announced_before_it_starts_and_not_when_it_is_up_to_date(
    zero2_run, tiny_shards, tmp_path, monkeypatch
):
    extensions, built = tmp_path / "extensions", extensions_dir() / OP  # where the 2-rank run built it
    if op_build_current(built):  # that build, less its library: ninja only relinks it
        shutil.copytree(built, extensions / OP, ignore=shutil.ignore_patterns("lock"))
        (extensions / OP / f"{OP}.so").unlink()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    assert not op_build_current(extensions / OP)

    first, again = (
        run(
            [BIN / "dslm-train", *train_args(tiny_shards[0], tmp_path, name, 1)],
            tmp_path,
            TORCH_EXTENSIONS_DIR=str(extensions),
        )
        for name in ("first", "again")
    )
    building = f"building DeepSpeed's {OP} op in {extensions / OP} (once per install, about a minute)..."
    assert first.stdout.splitlines()[0] == building and library_lines(first.stdout + first.stderr) == []
    assert "built successfully" in RunDir(tmp_path / "first").rank_log(0).read_text()
    assert "building" not in again.stdout and op_build_current(extensions / OP)
    shutil.rmtree(extensions / OP)
    assert not op_build_current(extensions / OP)
