"""`dslm-shard build` split over tasks: tokens/s of 1 and 2 tasks, each stage and the merge timed
on its own, against a one-process build of the same corpus in the same run.

    python bench/shard_tasks.py [--corpus-mb 20] [--launcher slurm|local] [--work DIR] [--json FILE]

The corpus is the standard library's source files that the build's filters keep, copied to
`--corpus-mb` (each copy unique), plus an exact copy of every 10th file so that dedup has work.
Every process runs with `--workers 0` (filter and tokenize in the process itself, on one thread):
one task is one core, so tokens/s per core compares the runs. The baseline is `dslm-shard build --workers 0`
without --tasks, on one core. A split build is its three stages, each run as N tasks at once, then
`dslm-shard merge`; each is timed wall to wall.

--launcher slurm runs each stage as one `srun --nodes N --ntasks N` (task K = SLURM_PROCID) on the
cluster that SLURM_CONF names (slurm/testcluster/start.sh: two nodes on this machine), so it
pays SLURM's start-up per stage as a real cluster does; local runs the N tasks as processes here.
Order: baseline, 1 task, 2 tasks. The run fails if a split build's per-source counts differ from
the baseline's.

`--paper-tokens`, `--paper-nodes` and `--paper-cores` turn the measured per-core rates into the
wall time of a build of that size (default: FineWeb's 100BT sample on 64 nodes of 32 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shards_throughput import kept_stdlib_texts, write_corpus  # bench/shards_throughput.py, beside this script

from dslm.data.manifest import Manifest
from dslm_shards.build import train_and_save_tokenizer
from dslm_shards.sources import CodeSource
from dslm_shards.tasks import STAGES

BIN = Path(sys.executable).parent
ONE_CORE = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
"""The environment of every build here: `--workers 0` then tokenizes on one thread (tokenizers'
batch encoding otherwise spreads over every core)."""


def stage_command(args: list[str], tasks: int, stage: str) -> str:
    """The shell command of one stage for the task whose index is in $K."""
    quoted = " ".join(f"'{a}'" for a in args)
    return f"{BIN / 'dslm-shard'} build {quoted} --tasks {tasks} --task $K --stage {stage}"


def run_stage(args: list[str], tasks: int, stage: str, launcher: str) -> float:
    """Wall seconds of one stage, all its tasks at once."""
    started = time.monotonic()
    command = stage_command(args, tasks, stage)
    if launcher == "slurm":
        subprocess.run(
            [
                "srun",
                f"--nodes={tasks}",
                f"--ntasks={tasks}",
                "--ntasks-per-node=1",
                "--cpus-per-task=1",
                "bash",
                "-c",
                f"K=$SLURM_PROCID; {command}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=ONE_CORE,
        )
    else:
        procs = [
            subprocess.Popen(["bash", "-c", command], env={**ONE_CORE, "K": str(k)}, stdout=subprocess.DEVNULL)
            for k in range(tasks)
        ]
        if any(p.wait() for p in procs):
            raise SystemExit(f"stage {stage} failed")
    return time.monotonic() - started


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=ONE_CORE)
    return time.monotonic() - started


def build_args(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return [
        "--source",
        f"code:{corpus}",
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        "1024",
        "--samples-per-shard",
        "1000",
        "--workers",
        "0",
    ]


def split_build(corpus: Path, tokenizer: Path, out: Path, tasks: int, launcher: str) -> dict[str, float]:
    seconds = {stage: run_stage(build_args(corpus, tokenizer, out), tasks, stage, launcher) for stage in STAGES}
    seconds["merge"] = timed([str(BIN / "dslm-shard"), "merge", str(out)])
    return seconds


def rates(tokens: int, seconds: dict[str, float], cores: int) -> dict[str, float]:
    total = sum(seconds.values())
    return {
        "seconds": seconds,
        "total_s": total,
        "tokens_per_s": tokens / total,
        "tokens_per_s_per_core": tokens / total / cores,
        **{
            f"{stage}_tokens_per_core_s": tokens / s / cores
            for stage, s in seconds.items()
            if stage in ("digests", "write", "baseline")
        },
    }


def on_paper(result: dict, tokens: float, nodes: int, cores: int) -> dict[str, float]:
    """Hours of a build of `tokens` on nodes x cores, one task per core, from the 2-task run's
    per-core rates of its digests and write stages; dedup and merge as measured (they are a small,
    fixed share here: see RESULTS.md for why they stay so)."""
    two = result["tasks_2"]
    all_cores = nodes * cores
    digests_h = tokens / (two["digests_tokens_per_core_s"] * all_cores) / 3600
    write_h = tokens / (two["write_tokens_per_core_s"] * all_cores) / 3600
    return {
        "tokens": tokens,
        "nodes": nodes,
        "cores_per_node": cores,
        "digests_h": digests_h,
        "write_h": write_h,
        "total_h": digests_h + write_h,
        "one_core_days": tokens / result["baseline"]["tokens_per_s"] / 86400,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=20)
    p.add_argument("--launcher", choices=("slurm", "local"), default="slurm" if shutil.which("srun") else "local")
    p.add_argument("--work", type=Path, help="where the corpus and builds go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--paper-tokens", type=float, default=100e9)
    p.add_argument("--paper-nodes", type=int, default=64)
    p.add_argument("--paper-cores", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shard_tasks_")) if args.work is None else args.work
    shutil.rmtree(work, ignore_errors=True)
    corpus = work / "corpus"
    files = kept_stdlib_texts()
    write_corpus(corpus, files, int(args.corpus_mb * 1e6))
    for rel, _ in files[::10]:  # exact duplicates, in other folders of the file order
        shutil.copy(corpus / "copy0" / rel, corpus / "copy0" / f"{rel}.dup.py")
    tokenizer = work / "tokenizer.json"
    train_and_save_tokenizer([CodeSource(spec="corpus", root=corpus)], 8000, 20_000_000, tokenizer)

    result: dict = {"launcher": args.launcher, "corpus_mb": args.corpus_mb}
    baseline_s = timed([str(BIN / "dslm-shard"), "build", *build_args(corpus, tokenizer, work / "baseline")])
    one = Manifest.load(work / "baseline")
    tokens = sum(st.tokens for st in one.sources.values())
    result["tokens"] = tokens
    result["baseline"] = rates(tokens, {"baseline": baseline_s}, 1)
    for tasks in (1, 2):
        out = work / f"tasks_{tasks}"
        result[f"tasks_{tasks}"] = rates(tokens, split_build(corpus, tokenizer, out, tasks, args.launcher), tasks)
        if Manifest.load(out).sources != one.sources:
            raise SystemExit(f"the {tasks}-task build's counts differ from the one-process build's")
    result["speedup_2_over_1_task"] = result["tasks_2"]["tokens_per_s"] / result["tasks_1"]["tokens_per_s"]
    result["paper"] = on_paper(result, args.paper_tokens, args.paper_nodes, args.paper_cores)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
