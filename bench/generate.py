"""Greedy decoding speed: dslm with its KV cache, dslm recomputing the whole sequence for every
token, and `transformers` GPT2LMHeadModel.generate (its KV cache) on the export of the same model.

    python bench/generate.py [TARGET] [--batch-size 8] [--prompt-len 64] [--new-tokens 64]
        [--repeats 5] [--device cpu] [--threads N]

TARGET is a checkpoint, a run directory or a `dslm-export` folder (dslm's side loads it with
dslm_eval.load.load_for_eval; `transformers` loads the export, written to a temporary folder for a
checkpoint). Without one, a randomly initialised `tiny` model is exported and used.

All three decode the same random prompts (one batch of equal length, no stop token) in this one
process. Each is run once untimed (warm-up), then --repeats times in turn (dslm cached, dslm
recomputing, transformers, ...), so drift hits all alike; tokens/s is batch x new tokens over
the median time. The greedy tokens of dslm and transformers are compared sequence by sequence.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import git_commit  # bench/provenance.py, beside this script
from safetensors.torch import save_file

from dslm.data.tokens import SPECIAL_TOKENS
from dslm.hf import hf_config, hf_state_dict
from dslm.model import GPT, ModelConfig
from dslm.model_source import resolve_source
from dslm_eval.generate import generate
from dslm_eval.load import load_for_eval
from dslm_local.decoding import GenerationConfig


def write_hf_folder(model: GPT, folder: Path) -> Path:
    """The model files dslm-export writes (transformers needs no tokenizer for token ids)."""
    save_file(
        hf_state_dict(model.state_dict(), model.cfg), str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    return folder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"


def seconds_of(run: Callable[[], list[list[int]]], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def runners(model: GPT, hf, prompts: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], list[list[int]]]]:
    """Each side's greedy decoding of `prompts` (B, T) -> new tokens per row."""
    as_lists = prompts.tolist()
    settings = dict(max_new_tokens=new_tokens, stop_tokens=(), batch_size=len(as_lists))
    return {
        "dslm, KV cache": lambda: generate(model, as_lists, GenerationConfig(**settings)),
        "dslm, recomputing": lambda: generate(model, as_lists, GenerationConfig(use_cache=False, **settings)),
        # eos_token_id=None: no early stop, as dslm's stop_tokens=()
        "transformers generate": lambda: hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )[:, prompts.size(1) :].tolist(),
    }


def load_models(target: Path | None, device: torch.device, tmp: Path):
    """(dslm model, transformers model, description) of the same weights, on `device`."""
    from transformers import GPT2LMHeadModel  # test-only dependency: imported when the benchmark runs

    if target is None:
        torch.manual_seed(0)
        model, what = GPT(ModelConfig(preset="tiny")).eval(), "random tiny model"
    else:
        model, what = load_for_eval(target, device).model, str(target)
    exported = target is not None and resolve_source(target).kind == "hf"
    hf = GPT2LMHeadModel.from_pretrained(target if exported else write_hf_folder(model, tmp))
    return model.to(device), hf.to(device).eval(), what


def time_sides(
    sides: dict[str, Callable[[], list[list[int]]]], repeats: int, device: torch.device
) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """Each side's tokens (from its warm-up run) and its median seconds over `repeats` runs in turn."""
    tokens = {name: run() for name, run in sides.items()}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            seconds[name].append(seconds_of(run, device))
    return tokens, {name: statistics.median(times) for name, times in seconds.items()}


def report(tokens: dict[str, list[list[int]]], seconds: dict[str, float], new: int) -> None:
    rate = {name: new / s for name, s in seconds.items()}
    for name in seconds:
        print(f"  {name:<22} {rate[name]:>10,.0f} tokens/s  ({seconds[name]:.3f} s)")
    cached, recomputed, hf = rate["dslm, KV cache"], rate["dslm, recomputing"], rate["transformers generate"]
    print(
        f"ratios: dslm cached / transformers = {cached / hf:.2f}; dslm cached / recomputing = {cached / recomputed:.2f}"
    )
    ours, theirs = tokens["dslm, KV cache"], tokens["transformers generate"]
    agree = sum(a == b for a, b in zip(ours, theirs))
    same_tokens = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b))
    print(
        f"greedy tokens vs transformers: {agree} of {len(ours)} sequences agree, {len(ours) - agree} disagree "
        f"({same_tokens} of {new} tokens the same); cached == recomputing: {ours == tokens['dslm, recomputing']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", type=Path, help="checkpoint, run directory or export (default: random tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model, hf, what = load_models(args.target, device, Path(tmp))
    cfg = model.cfg
    if args.prompt_len + args.new_tokens > cfg.block_size:
        p.error(f"--prompt-len + --new-tokens must fit model.block_size={cfg.block_size}")
    # ids past the special tokens (<pad> <unk> <bos> <eos> ...), as in text
    prompts = torch.randint(
        len(SPECIAL_TOKENS),
        cfg.vocab_size,
        (args.batch_size, args.prompt_len),
        generator=torch.Generator().manual_seed(1),
    ).to(device)
    tokens, seconds = time_sides(runners(model, hf, prompts, args.new_tokens), args.repeats, device)
    stamp = f"{datetime.date.today()} commit {git_commit('dslm', 'eval')}"
    print(f"{stamp} | {device_name(device)} | torch {torch.__version__}")
    print(
        f"model: {what} ({cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, fp32); "
        f"batch {args.batch_size} x prompt {args.prompt_len} + {args.new_tokens} new tokens; "
        f"median of {args.repeats} after a warm-up"
    )
    report(tokens, seconds, args.batch_size * args.new_tokens)


if __name__ == "__main__":
    main()
