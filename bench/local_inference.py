"""Local completion: peak memory and speed of dslm-generate's path (torch, fp32) against
dslm-complete's (ONNX Runtime, fp32 and int8 weights) and llama.cpp's (GGUF, q8_0 and f16
weights), side by side in one run, on held-out lines of code; and what each export costs in
exactness.

    python bench/local_inference.py [SOURCE | --untrained PRESET] [--lines 40] [--max-new-tokens 24] \\
        [--threads 2] [--json OUT]

SOURCE is a checkpoint, a run or an export folder (as dslm-export takes); its run's shards
(--shards for an export folder) give the held-out lines: the val split's documents per
language, a line start sampled as dslm-eval's exact match does, the code before it as the
prompt. Without SOURCE, --untrained PRESET (e.g. code-33m) is that model at its initialization
with a FIM tokenizer of its vocabulary (complete_latency.untrained_source), and the lines are
drawn from shards of standard-library packages the tokenizer was not trained on (HELDOUT_PACKAGES):
untrained weights cost what trained ones cost per token, but seldom end a line, so most lines
run to --max-new-tokens and greedy agreement means little. The ONNX and GGUF exports are
written to a temporary folder.

Each path runs in a fresh process of its own that loads the model and completes every line in
turn (one sequence at a time, greedy, stopping at the end of the line), and reports the peak
resident memory of the whole process (VmHWM, the kernel's high-water mark: interpreter,
libraries, weights, buffers) and tokens per second over the completions. The ONNX and llama.cpp
processes import no torch (checked). The machine's 1-minute load average before and after each
process says whether other work shared the cores. llama.cpp runs the GGUF file through
llama-cpp-python (dslm_eval.gguf_model.GgufModel, which keeps the logits of every position, as
the ONNX graph computes them for every prompt token), fed the prompt ids dslm-complete feeds the
int8 export (Completer.prompt_ids, computed in the parent: its time leaves out the prompt's
encoding, a few ms a line) and stopped as it stops (<eos>, or a newline in the text of the new
tokens, decoded by dslm's tokenizer). int8 runs twice: as dslm-complete runs it, and with ONNX
Runtime's default memory patterns, which dslm-complete turns off
(dslm_local.onnx_model.session_options).

Exactness, measured here in the parent: the largest |logit| difference between ONNX fp32 and
torch over whole prompts; the share of lines whose greedy completion equals torch's; the
int8 export's top-1 agreement with fp32 on every token of the held-out lines (teacher-forced);
and the share of prompts that llama.cpp's own tokenizer (GgufModel.tokenize, with <bos>)
encodes into dslm's ids.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODES = (
    "torch fp32",
    "onnx fp32",
    "onnx int8",
    "onnx int8, memory patterns on",
    "llama.cpp q8_0",
    "llama.cpp f16",
)
LLAMA_CPP = "llama.cpp "
"""The prefix of the llama.cpp modes; the rest is the GGUF type (dslm-export --type)."""
HELDOUT_PACKAGES = ("multiprocessing", "xml", "http", "concurrent")
"""Standard-library packages, none of complete_latency.TOKENIZER_PACKAGES, whose files give an
untrained model's held-out lines."""


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------ the measured processes


def torch_worker(source: str, lines: list[dict], max_new_tokens: int, threads: int) -> dict:
    """dslm-generate's path: the model loaded as it loads it, one line at a time."""
    import torch

    from dslm_eval.generate import PromptFraming, generate
    from dslm_eval.load import load_for_eval
    from dslm_local.decoding import GenerationConfig, cut_at_stop

    torch.set_num_threads(threads)
    loaded = load_for_eval(source)
    frame = PromptFraming(loaded.tokenizer, loaded.framing)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_tokens=frame.stop_tokens, stop_strings=("\n",))
    start, texts, new_tokens = time.perf_counter(), [], 0
    for line in lines:
        new = generate(loaded.model, [frame.ids(line["prompt"])], cfg, decode=frame.decode)[0]
        new_tokens += len(new)
        texts.append(cut_at_stop(frame.decode(new), cfg.stop_strings))
    return {"seconds": time.perf_counter() - start, "new_tokens": new_tokens, "texts": texts}


def onnx_worker(folder: str, lines: list[dict], max_new_tokens: int, threads: int, mem_pattern: bool) -> dict:
    """dslm-complete's path (dslm_local only: no torch)."""
    from dslm_local.complete import Completer
    from dslm_local.decoding import GenerationConfig
    from dslm_local.onnx_model import OnnxModel

    completer = Completer(
        OnnxModel(folder, threads, mem_pattern), GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=("\n",))
    )
    start = time.perf_counter()
    texts = [completer.complete(line["prompt"], keep_last=True) for line in lines]
    return {"seconds": time.perf_counter() - start, "new_tokens": completer.new_tokens, "texts": texts}


def llama_worker(folder: str, lines: list[dict], max_new_tokens: int, threads: int) -> dict:
    """llama.cpp's path (dslm_eval.gguf_model and dslm_local only: no torch), each line's prompt
    as the ids dslm-complete feeds (its "ids")."""
    from dslm_eval.gguf_model import GgufModel
    from dslm_local.decoding import Stopper, cut_at_stop
    from dslm_local.tokens import load_text_tokenizer

    config = json.loads((Path(folder) / "config.json").read_text())
    tokenizer = load_text_tokenizer(Path(folder) / "tokenizer.json")
    stopper = Stopper(frozenset([config["eos_token_id"]]), ("\n",), tokenizer.decode)
    with GgufModel(next(Path(folder).glob("*.gguf")), config["n_positions"], threads) as model:
        start, texts, new_tokens = time.perf_counter(), [], 0
        for line in lines:
            new = stopper.output(model.greedy(line["ids"], max_new_tokens, stopped=stopper.stopped))
            new_tokens += len(new)
            texts.append(cut_at_stop(tokenizer.decode(new), stopper.stop_strings))
        return {"seconds": time.perf_counter() - start, "new_tokens": new_tokens, "texts": texts}


def worker(args: argparse.Namespace) -> None:
    lines = [json.loads(line) for line in Path(args.lines_file).read_text().splitlines()]
    if args.worker == "torch fp32":
        result = torch_worker(args.target, lines, args.max_new_tokens, args.threads)
    elif args.worker.startswith(LLAMA_CPP):
        result = llama_worker(args.target, lines, args.max_new_tokens, args.threads)
    else:
        result = onnx_worker(
            args.target, lines, args.max_new_tokens, args.threads, mem_pattern="patterns on" in args.worker
        )
    result |= {"peak_rss_mb": peak_rss_mb(), "imported_torch": "torch" in sys.modules}
    print(json.dumps(result))


def run_worker(mode: str, target: Path, lines_file: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "--worker",
        mode,
        str(target),
        "--lines-file",
        str(lines_file),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--threads",
        str(args.threads),
    ]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"load_average": [load_before, os.getloadavg()[0]]}


# ------------------------------------------------------------------ the parent


def heldout_lines(source: Path, shards: str | None, n: int, seed: int = 0) -> list[dict]:
    """{"language", "prompt", "target"} of up to n held-out lines per language (dslm-eval's exact
    match sampling), from the val split of the shards the source was trained on."""
    from dslm.data.loader import ShardSamples
    from dslm.data.manifest import Manifest
    from dslm.data.tokens import load_text_tokenizer
    from dslm.model_source import resolve_source
    from dslm_eval.code_tasks import LANGUAGES, ExactMatchConfig, build_exact_match_tasks
    from dslm_eval.heldout import LabeledSamples, heldout_documents

    root = resolve_source(source).shards(shards and Path(shards))
    manifest = Manifest.load(root)
    samples = LabeledSamples(ShardSamples(root, manifest, "val"))
    docs = heldout_documents(samples, load_text_tokenizer(manifest.tokenizer_file(root)), set(LANGUAGES), 50)
    tasks = build_exact_match_tasks(docs, ExactMatchConfig(samples_per_language=n, seed=seed, context_chars=2000))
    return [{"language": t.language, "prompt": t.prompt, "target": t.target} for t in tasks]


def untrained(preset: str, folder: Path) -> tuple[Path, Path]:
    """An export folder of `preset` at its initialization (complete_latency.untrained_source) and
    shards of HELDOUT_PACKAGES built with its tokenizer, half of their files in the val split."""
    from complete_latency import BIN, STDLIB, untrained_source  # beside this script

    source, shards = untrained_source(preset, folder), folder / "shards"
    packages = [arg for package in HELDOUT_PACKAGES for arg in ("--source", f"code:{STDLIB / package}")]
    build = [BIN / "dslm-shard", "build", *packages, "--tokenizer", folder / "tokenizer.json", "--out", shards]
    subprocess.run([*build, "--val-fraction", "0.5", "--workers", "0"], check=True, stdout=subprocess.DEVNULL)
    return source, shards


def prompt_ids(int8: Path, gguf: Path, lines: list[dict], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """The ids dslm-complete feeds the int8 export for each line's prompt (Completer.prompt_ids: the
    code nearest the cursor that fits beside max_new_tokens), and the share of prompts that
    llama.cpp's tokenizer encodes, with <bos>, into dslm's ids for the whole prompt."""
    from dslm_eval.gguf_model import GgufModel
    from dslm_local.complete import Completer
    from dslm_local.decoding import GenerationConfig
    from dslm_local.onnx_model import OnnxModel

    completer = Completer(OnnxModel(int8), GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=("\n",)))
    ids = [completer.prompt_ids(line["prompt"], keep_last=True) for line in lines]
    bos, tokenizer = completer.model.config.bos_token_id, completer.tokenizer
    with GgufModel(gguf, completer.model.config.block_size, 1) as llama:
        same = sum(
            llama.tokenize(line["prompt"], add_bos=True)
            == [bos, *tokenizer.encode(line["prompt"], add_special_tokens=False).ids]
            for line in lines
        )
    return ids, same / len(lines)


def exactness(source: Path, fp32: Path, int8: Path, lines: list[dict]) -> dict:
    """max |logit| difference ONNX fp32 vs torch, and int8's top-1 agreement with fp32, over the
    prompt and target of each line (its last 256 tokens)."""
    import numpy as np
    import torch

    from dslm_eval.load import load_for_eval
    from dslm_local.onnx_model import OnnxModel

    loaded = load_for_eval(source)
    full, small = OnnxModel(fp32), OnnxModel(int8)
    block = loaded.model.cfg.block_size
    worst, agree, total = 0.0, 0, 0
    for line in lines:
        target_len = len(loaded.tokenizer.encode(line["target"]).ids)
        ids = loaded.tokenizer.encode(line["prompt"] + line["target"]).ids[-block:]
        with torch.no_grad():
            reference = loaded.model(torch.tensor([ids]))[0].numpy()
        full.reset(), small.reset()
        logits32, logits8 = full.forward(ids), small.forward(ids)
        worst = max(worst, float(np.abs(logits32 - reference).max()))
        tail = slice(len(ids) - target_len - 1, len(ids) - 1)  # the positions that predict the target's tokens
        agree += int((logits32[tail].argmax(-1) == logits8[tail].argmax(-1)).sum())
        total += target_len
    return {"max_abs_logit_diff_fp32": worst, "int8_top1_agreement": agree / max(total, 1), "target_tokens": total}


def device_line(threads: int) -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {threads} threads per process"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, nargs="?", help="a checkpoint, run or export folder")
    p.add_argument("--untrained", metavar="PRESET", help="without TARGET: PRESET at its initialization")
    p.add_argument("--shards", help="the shards whose val split gives the lines (default: the run's)")
    p.add_argument("--lines", type=int, default=40, help="held-out lines per language (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each path (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--lines-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if (args.target is None) == (args.untrained is None):
        p.error("give TARGET or --untrained PRESET")
    sys.path.insert(0, str(HERE.parents[1]))
    from provenance import git_commit  # bench/provenance.py, beside this script

    from dslm.export import write_gguf_folder, write_onnx

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's lines
        if args.target is None:
            args.target, args.shards = untrained(args.untrained, Path(tmp))
        lines = heldout_lines(args.target, args.shards, args.lines)
        (fp32, _), (int8, _) = (
            write_onnx(args.target, Path(tmp) / "fp32", False),
            write_onnx(args.target, Path(tmp) / "int8", True),
        )
        gguf = {
            mode: write_gguf_folder(args.target, Path(tmp) / mode, mode.removeprefix(LLAMA_CPP))[0]
            for mode in MODES[4:]
        }
        ids, same_ids = prompt_ids(int8, next(gguf[MODES[4]].glob("*.gguf")), lines, args.max_new_tokens)
        lines_file = Path(tmp) / "lines.jsonl"
        lines_file.write_text("".join(json.dumps(line | {"ids": i}) + "\n" for line, i in zip(lines, ids)))
        targets = {"torch fp32": args.target, "onnx fp32": fp32, "onnx int8": int8, MODES[3]: int8, **gguf}
        results = {mode: run_worker(mode, targets[mode], lines_file, args) for mode in MODES}
        sizes = {
            "onnx fp32": sum(f.stat().st_size for f in fp32.iterdir() if f.name.startswith("model.onnx")),
            "onnx int8": sum(f.stat().st_size for f in int8.iterdir() if f.name.startswith("model.onnx")),
        } | {mode: sum(f.stat().st_size for f in folder.glob("*.gguf")) for mode, folder in gguf.items()}
        exact = exactness(args.target, fp32, int8, lines) | {"llama_tokenizer_agreement": same_ids}
    report(args, lines, results, sizes, exact, git_commit("dslm", "local", "eval", "bench"))


def report(args, lines, results, sizes, exact, commit) -> None:
    torch_texts = results["torch fp32"]["texts"]
    print(
        f"local_inference: {args.target}, {len(lines)} held-out lines, up to {args.max_new_tokens} new tokens each; "
        f"{device_line(args.threads)}; {datetime.date.today()}; commit {commit}"
    )
    print("| path | model file | peak RSS (MiB) | tokens/s | greedy = torch | torch imported | load average |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        same = sum(a == b for a, b in zip(r["texts"], torch_texts)) / len(torch_texts)
        size = sizes.get(mode.split(",")[0])
        print(
            f"| {mode} | {f'{size / 2**20:.1f} MiB' if size else '-'} | {r['peak_rss_mb']:.1f} | "
            f"{r['new_tokens'] / r['seconds']:.1f} | {same:.1%} | {r['imported_torch']} | "
            f"{r['load_average'][0]:.1f} to {r['load_average'][1]:.1f} |"
        )
    print(
        f"ONNX fp32 vs torch: max |logit difference| {exact['max_abs_logit_diff_fp32']:.2e}; int8 vs fp32: top-1 "
        f"agreement {exact['int8_top1_agreement']:.2%} over {exact['target_tokens']} target tokens; llama.cpp's "
        f"tokenizer = dslm's on {exact['llama_tokenizer_agreement']:.1%} of the prompts"
    )
    if args.json:
        summary = {mode: {k: v for k, v in r.items() if k != "texts"} for mode, r in results.items()}
        args.json.write_text(json.dumps({"results": summary, "sizes": sizes, **exact, "commit": commit}, indent=2))


if __name__ == "__main__":
    main()
