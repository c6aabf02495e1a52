"""Editor latency: one single-line completion through `dslm-complete --stdio` (the model loaded
once, as an editor plugin drives it), p50/p95 over --requests requests at cursors in real files.

    python bench/complete_latency.py [EXPORT] [--requests 50] [--lines-before 300] [--max-new-tokens 16] \\
        [--threads 2] [--json OUT]

EXPORT is an ONNX export (dslm-export --format onnx [--int8]). Without it, the script makes an int8
one of untrained --preset weights (default code-33m) in a temporary folder: a FIM tokenizer of the
preset's vocabulary trained on a few standard-library packages, the model at its initialization
written as an export folder (safetensors, config.json with dslm_fim), and `dslm-export --format
onnx --int8` of that. Untrained weights cost what trained ones cost per token; what differs is
where a completion ends: an untrained model seldom writes the end of the line, so most requests
run to --max-new-tokens, and the figures are those of that many new tokens (the replies' new
tokens are reported).

Each request is a standard-library Python file of at least --lines-before + 20 lines (a file
each), the cursor in the middle of the first line with code at or after line --lines-before:
the whole text goes in the request, as an editor sends its buffer, and dslm-complete keeps the
code nearest the cursor that fits the context (both sides for a FIM model). Timed in this
process: from writing a request's line to reading its reply (the round trip an editor waits);
from the server's replies, its own time_ms. The first reply, which follows the model's loading,
is reported apart and left out of the percentiles. The machine's 1-minute load average before
and after the requests says whether other work shared the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
BIN = Path(sys.executable).parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOKENIZER_PACKAGES = ("json", "email", "asyncio", "importlib", "logging", "unittest")
"""Standard-library packages the untrained model's tokenizer is trained on (a few MB of Python)."""


def untrained_export(preset: str, folder: Path) -> Path:
    """An int8 ONNX export of `preset` at its initialization, with a FIM tokenizer of its
    vocabulary, written by dslm-export under `folder`."""
    out = folder / "untrained-onnx-int8"
    export = [BIN / "dslm-export", untrained_source(preset, folder), out, "--format", "onnx", "--int8"]
    subprocess.run(export, check=True, stdout=subprocess.DEVNULL)
    return out


def untrained_source(preset: str, folder: Path) -> Path:
    """`preset` at its initialization as an export folder, folder/untrained, with a FIM tokenizer
    of its vocabulary trained on TOKENIZER_PACKAGES (also at folder/tokenizer.json)."""
    from safetensors.torch import save_file

    from dslm.data.templates import Framing
    from dslm.export import write_tokenizer_files
    from dslm.hf import hf_config, hf_state_dict
    from dslm.model import GPT, ModelConfig
    from dslm_shards.tokenizer import train_tokenizer

    cfg = ModelConfig(preset=preset)
    texts = [
        path.read_text(errors="replace") for pkg in TOKENIZER_PACKAGES for path in sorted((STDLIB / pkg).rglob("*.py"))
    ]
    tokenizer_file = folder / "tokenizer.json"
    train_tokenizer(texts, cfg.vocab_size, fim=True).save(str(tokenizer_file))
    source, framing = folder / "untrained", Framing(fim=True)
    source.mkdir()
    model = GPT(cfg)
    save_file(hf_state_dict(model.state_dict(), cfg), str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps(hf_config(cfg, framing)))
    write_tokenizer_files(source, tokenizer_file, framing)
    return source


def cursor_requests(n: int, lines_before: int, seed: int = 0) -> list[dict]:
    """`n` requests, one per standard-library file of at least lines_before + 20 lines (drawn with
    `seed`), the cursor mid-line on the first line with code at or after line `lines_before`."""
    files = [p for p in sorted(STDLIB.glob("**/*.py")) if "test" not in p.parts and "site-packages" not in p.parts]
    random.Random(seed).shuffle(files)
    requests = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        row = next((i for i in range(lines_before - 1, len(lines) - 20) if lines[i].strip()), None)
        if row is None:
            continue
        indent = len(lines[row]) - len(lines[row].lstrip())
        column = indent + (len(lines[row]) - indent) // 2 + 1
        requests.append({"id": str(path.relative_to(STDLIB)), "text": text, "line": row + 1, "column": column})
        if len(requests) == n:
            return requests
    raise SystemExit(
        f"only {len(requests)} standard-library files have {lines_before + 20} lines; lower --lines-before"
    )


def measure(export: Path, requests: list[dict], args: argparse.Namespace) -> tuple[float, list[dict]]:
    """Start dslm-complete --stdio, send the requests one at a time, each after the reply to the
    last. Returns the seconds from the start to the first reply, and each reply with its round
    trip (round_trip_ms) added."""
    command = [BIN / "dslm-complete", export, "--stdio", "--threads", str(args.threads)]
    command += ["--max-new-tokens", str(args.max_new_tokens)]
    start = time.perf_counter()
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    replies, first = [], 0.0
    try:
        for request in requests:
            sent = time.perf_counter()
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            reply = json.loads(server.stdout.readline())
            received = time.perf_counter()
            if "error" in reply:
                raise SystemExit(f"{request['id']}: {reply['error']}")
            replies.append({**reply, "round_trip_ms": (received - sent) * 1000})
            first = first or received - start
        server.stdin.close()
        if server.wait(timeout=60):
            raise SystemExit(f"dslm-complete --stdio ended with status {server.returncode}")
    finally:
        server.kill()
    return first, replies


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(first_s: float, replies: list[dict]) -> dict:
    """The first reply's time, and the percentiles of the others' round trips and server times."""
    timed = replies[1:]
    trips, server = [r["round_trip_ms"] for r in timed], [r["time_ms"] for r in timed]
    return {
        "requests": len(timed),
        "first_reply_s": first_s,
        "round_trip_ms": {"p50": percentile(trips, 50), "p95": percentile(trips, 95), "max": max(trips)},
        "server_ms": {"p50": percentile(server, 50), "p95": percentile(server, 95)},
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in timed),
        "new_tokens_mean": statistics.mean(r["new_tokens"] for r in timed),
    }


def cpu_model() -> str:
    """lscpu's model name, else the platform's."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, nargs="?", help="an ONNX export (default: an untrained --preset, int8)")
    p.add_argument("--preset", default="code-33m", help="without EXPORT: the model's sizes (default: %(default)s)")
    p.add_argument("--requests", type=int, default=50, help="timed requests, after a first one (default: %(default)s)")
    p.add_argument("--lines-before", type=int, default=300, help="the cursor's line, about (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="dslm-complete --threads (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from provenance import git_commit  # bench/provenance.py, beside this script

    requests = cursor_requests(args.requests + 1, args.lines_before)
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or untrained_export(args.preset, Path(tmp))
        load_before = os.getloadavg()[0]
        first_s, replies = measure(export, requests, args)
        load_after = os.getloadavg()[0]
    figures = summary(first_s, replies) | {
        "model": str(args.export) if args.export else f"{args.preset}, untrained, FIM, int8 ONNX",
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "date": str(datetime.date.today()),
        "commit": git_commit("local", "bench"),
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report(f: dict) -> None:
    print(
        f"complete_latency: {f['model']}; {f['requests']} requests after a first, up to {f['max_new_tokens']} new "
        f"tokens, one line; {f['cpu']}, {f['threads']} threads, 1-minute load average {f['load_average'][0]} before "
        f"and {f['load_average'][1]} after; {f['date']}; commit {f['commit']}"
    )
    print("| first reply (load + 1) | round trip p50 | p95 | max | server p50 | p95 | prompt tokens | new tokens |")
    print("|---|---|---|---|---|---|---|---|")
    trip, server = f["round_trip_ms"], f["server_ms"]
    print(
        f"| {f['first_reply_s']:.2f} s | {trip['p50']:.1f} ms | {trip['p95']:.1f} ms | {trip['max']:.1f} ms | "
        f"{server['p50']:.1f} ms | {server['p95']:.1f} ms | {f['prompt_tokens_mean']:.0f} | {f['new_tokens_mean']:.1f} |"
    )


if __name__ == "__main__":
    main()
