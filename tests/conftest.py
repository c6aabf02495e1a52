"""Shared fixtures: a small real corpus (stdlib source files) sharded once per test session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import torch

from dslm.checkpoint.format import TrainState, rng_file, rng_state, seal
from dslm.data.manifest import Manifest
from dslm.model import GPT, ModelConfig
from dslm.run_dir import tag_for
from dslm_shards.build import ShardConfig, build_shards, train_and_save_tokenizer
from dslm_shards.sources import CodeSource

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY_VOCAB = 512
TINY_SEQ_LEN = 64


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """A copy of two stdlib packages: real Python, a few hundred KB."""
    root = tmp_path_factory.mktemp("corpus")
    for package in ("json", "email"):
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, code_corpus) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("shards")
    sources = [CodeSource(spec=f"code:{code_corpus}", root=code_corpus)]
    train_and_save_tokenizer(sources, TINY_VOCAB, sample_bytes=10**9, out=out / "tokenizer.json")
    cfg = ShardConfig(
        out=out, tokenizer=out / "tokenizer.json", seq_len=TINY_SEQ_LEN, samples_per_shard=200, val_fraction=0.1
    )
    return out, build_shards(cfg, sources).manifest


@pytest.fixture(scope="session")
def other_shards(tmp_path_factory, tiny_shards) -> tuple[Path, Manifest]:
    """Shards of other real Python (two more stdlib packages) with tiny_shards' tokenizer and
    seq_len: a second source to mix with it."""
    corpus, out = tmp_path_factory.mktemp("other_corpus"), tmp_path_factory.mktemp("other")
    for package in ("logging", "concurrent"):
        shutil.copytree(STDLIB / package, corpus / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(tiny_shards[0] / "tokenizer.json", out / "tokenizer.json")
    cfg = ShardConfig(
        out=out, tokenizer=out / "tokenizer.json", seq_len=TINY_SEQ_LEN, samples_per_shard=200, val_fraction=0.1
    )
    return out, build_shards(cfg, [CodeSource(spec=f"code:{corpus}", root=corpus)]).manifest


@pytest.fixture(scope="session")
def fim_shards(tmp_path_factory, code_corpus) -> Path:
    """Shards of the code corpus built with fill-in-the-middle (--fim-rate 0.5), and their tokenizer
    with the FIM tokens."""
    from dslm.data.fim import FimConfig

    out = tmp_path_factory.mktemp("fim_shards")
    sources = [CodeSource(spec=f"code:{code_corpus}", root=code_corpus)]
    train_and_save_tokenizer(sources, TINY_VOCAB, sample_bytes=10**9, out=out / "tokenizer.json", fim=True)
    cfg = ShardConfig(
        out=out,
        tokenizer=out / "tokenizer.json",
        seq_len=TINY_SEQ_LEN,
        samples_per_shard=200,
        val_fraction=0.1,
        fim=FimConfig(rate=0.5),
    )
    build_shards(cfg, sources)
    return out


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory, code_corpus, tiny_shards) -> tuple[Path, Manifest]:
    """Thousands of one-sample shards of 17 tokens with tiny_shards' tokenizer: more than a process
    may open under `ulimit -n 256`."""
    out = tmp_path_factory.mktemp("many")
    shutil.copy(tiny_shards[0] / "tokenizer.json", out / "tokenizer.json")
    cfg = ShardConfig(out=out, tokenizer=out / "tokenizer.json", seq_len=16, samples_per_shard=1, val_fraction=0.02)
    return out, build_shards(cfg, [CodeSource(spec=f"code:{code_corpus}", root=code_corpus)]).manifest


def line_pairs(corpus: Path) -> list[dict[str, str]]:
    """Instruction records from real code: each non-blank line of the corpus's files asks for the
    one to three lines after it, so responses (the loss-masked targets) differ in length."""
    records = []
    for path in sorted(corpus.rglob("*.py")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for i in range(0, len(lines) - 4, 7):
            records.append(
                {
                    "instruction": f"After `{lines[i].strip()}`, write what follows.",
                    "output": "\n".join(lines[i + 1 : i + 2 + i % 3]),
                }
            )
    return records


@pytest.fixture(scope="session")
def sft_shards(tmp_path_factory, code_corpus, tiny_shards) -> tuple[Path, Manifest]:
    """Instruction shards (template instruct, loss masks) with tiny_shards' tokenizer and seq_len:
    examples of uneven lengths, so that samples hold uneven numbers of targets."""
    from dslm_shards.sft import SftConfig, build_sft_shards

    root = tmp_path_factory.mktemp("sft")
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in line_pairs(code_corpus)))
    cfg = SftConfig(
        out=root / "shards",
        tokenizer=tiny_shards[0] / "tokenizer.json",
        template="instruct",
        sources=[str(records)],
        seq_len=TINY_SEQ_LEN,
        samples_per_shard=200,
        val_fraction=0.1,
    )
    return cfg.out, build_sft_shards(cfg)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shm_tmp() -> Path:
    """A fresh folder in /dev/shm (tmpfs, where DeepSpeed's all-reduce buffers live), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="dslm-test-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder)


HOLD = """
import ctypes, os, sys
path, how = sys.argv[1:]
fd = os.open(path, os.O_RDONLY)
if how == "map":  # mapped, its descriptor closed, as a C program may do (Python's mmap keeps a copy of it)
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = libc.mmap(None, os.fstat(fd).st_size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    assert address not in (None, ctypes.c_void_p(-1).value)  # MAP_FAILED
    os.close(fd)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def hold_open():
    """hold_open(path, how="open"|"map") starts a process that holds `path` open, or only mapped,
    until the test ends (as a live run holds its all-reduce buffers and a live build its lock);
    returns the process once it holds the file."""
    processes = []

    def start(path: Path, how: str = "open") -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield start
    for process in processes:
        process.stdin.close()
        process.wait()


@contextmanager
def launched(command: list, timeout: float = 900, **kwargs) -> Iterator[subprocess.Popen]:
    """A launch (the deepspeed launcher and its ranks) in a session of its own, its output in
    .stdout. All of it is killed at the end of the block if still running, and after `timeout`
    seconds, a safety net only (its output then ends): subprocess.run's timeout kills the launcher
    alone and leaves its ranks running."""
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )
    safety_net = threading.Timer(timeout, kill_group, (process,))
    safety_net.start()
    try:
        yield process
    finally:
        safety_net.cancel()
        kill_group(process)
        process.wait()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process's group (a launch: the launcher and its ranks), unless it has ended."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)


def run_launch(command: list, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run a launch to its end (killed after `timeout` seconds: status -9)."""
    with launched(command, timeout, **kwargs) as process:
        output = process.stdout.read()
    return subprocess.CompletedProcess(command, process.returncode, output)


class Logs:
    """Reading the log of a job or process that is still writing it."""

    @staticmethod
    def read(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""  # progress bars cut UTF-8 sequences

    @staticmethod
    def wait_for(path: Path, text: str, alive: Callable[[], bool], timeout: float = 300) -> None:
        """Until `text` is in the log, failing if `alive()` stops holding or time runs out."""
        end = time.monotonic() + timeout
        while text not in Logs.read(path):
            assert time.monotonic() < end and alive(), f"{text!r} never appeared in {path}:\n{Logs.read(path)[-3000:]}"
            time.sleep(0.2)


@pytest.fixture
def logs() -> type[Logs]:
    return Logs


def paused_ranks(proc: subprocess.Popen, ranks: int) -> list[psutil.Process]:
    """The `ranks` dslm-train ranks under `proc` (or `proc` itself, when it is the one rank), found
    by the RANK their launcher gave them, once each has stopped itself where DSLM_TEST_PAUSE told
    it to (dslm.stop.test_pause); send them SIGCONT to go on. Fails when `proc` ends first."""

    def is_rank(p: psutil.Process) -> bool:
        return "RANK" in p.environ() or (ranks == 1 and p.pid == proc.pid)

    while True:
        assert proc.poll() is None, f"the run ended before it paused: {proc.communicate()}"
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            found = [p for p in tree if is_rank(p) and (p.pid == proc.pid or not is_rank(p.parent()))]  # not workers
            if len(found) == ranks and all(p.status() == psutil.STATUS_STOPPED for p in found):
                return found
        except psutil.Error:  # a short-lived child (a compiler, a zombie) went meanwhile
            pass
        time.sleep(0.05)


@pytest.fixture
def paused() -> Callable[[subprocess.Popen, int], list[psutil.Process]]:
    return paused_ranks


def trained_looking_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT whose biases and LayerNorms are off their init values, as after training (the export
    folds the head bias into the final LayerNorm, which a zero bias would not test)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture
def trained_looking() -> Callable[..., GPT]:
    return trained_looking_model


def write_tag(run_dir: Path, step: int, state: dict, sealed: bool = True) -> Path:
    """A ZeRO-0 fp32 tag as DeepSpeed writes it (the module's weights in mp_rank_00_model_states.pt)."""
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save(state, tag_dir / "mp_rank_00_model_states.pt")
    torch.save(rng_state(), tag_dir / rng_file(0))
    if sealed:
        seal(tag_dir, TrainState(step=step, world_size=1))
    return tag_dir


@pytest.fixture
def write_checkpoint() -> Callable[..., Path]:
    return write_tag


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_shards) -> Path:
    """A run directory of the `tiny` preset whose one sealed tag (step 5) holds weights no seed
    produces (its init, every tensor perturbed): the `train.init_from` base for tests in which
    weights loaded from a checkpoint and weights initialized again must differ."""
    from dslm.config import load_config, save_config

    cfg = load_config(
        None,
        [
            "name=base",
            f"runs_dir={tmp_path_factory.mktemp('base')}",
            "model.preset=tiny",
            f"data.shards={tiny_shards[0]}",
        ],
    )
    save_config(cfg)
    torch.manual_seed(7)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    write_tag(cfg.run_dir.path, 5, {"module": model.state_dict(), "global_steps": 5})
    return cfg.run_dir.path


def sharp_run(runs_dir: Path, shards: Path, name: str, step: int) -> tuple[Path, GPT]:
    """A run directory with one sealed tag at `step` of a trained-looking 2-layer model whose head
    is scaled up, so that its next-token choices are not near-ties that float rounding could flip."""
    from dslm.config import RunConfig, save_config
    from dslm.data.loader import DataConfig

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=256, vocab_size=TINY_VOCAB, block_size=96)
    model = trained_looking_model(cfg, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    run = RunConfig(name=name, runs_dir=str(runs_dir), model=cfg, data=DataConfig(shards=str(shards)))
    save_config(run)
    write_tag(run.run_dir.path, step, {"module": model.state_dict(), "global_steps": step})
    return run.run_dir.path, model


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory, tiny_shards) -> tuple[Path, GPT, Path, Path]:
    """(sharp_run with a tag at step 7, its model, its fp32 and int8 ONNX exports)."""
    from dslm.export import main as export_main

    run, model = sharp_run(tmp_path_factory.mktemp("runs"), tiny_shards[0], "onnx", 7)
    export_main([str(run), "--format", "onnx"])
    export_main([str(run), "--format", "onnx", "--int8"])
    return run, model, run / "export" / "step7-onnx", run / "export" / "step7-onnx-int8"


@pytest.fixture(scope="session")
def gguf_exports(tmp_path_factory, tiny_shards) -> tuple[Path, GPT, dict[str, Path]]:
    """(sharp_run with a tag at step 9, its model, its GGUF export folders by --type)."""
    from dslm.export import main as export_main

    run, model = sharp_run(tmp_path_factory.mktemp("runs"), tiny_shards[0], "gguf", 9)
    for type in ("f32", "f16", "q8_0"):
        export_main([str(run), "--format", "gguf", "--type", type])
    return run, model, {type: run / "export" / f"step9-gguf-{type}" for type in ("f32", "f16", "q8_0")}
