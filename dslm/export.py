"""dslm-export: a checkpoint as a Hugging Face GPT-2 folder (model.safetensors, config.json,
tokenizer.json) that `transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads, with the same
logits as dslm's model.

The block is GPT-2's, so the weights map one to one (Linear weights transposed into GPT-2's
Conv1D layout), except the output head's bias, which the model cards count and GPT-2 lacks. It
is folded into the final LayerNorm and the head exactly: a LayerNorm's normalized output sums to
zero, so one hidden dimension k is a linear function of the others and the head can take its
weight over to them; dimension k is then set to the constant 1 (gain 0, bias 1) and its column
of the head carries the bias. k is the dimension whose move perturbs the head least. The logits
are the same up to float rounding; the last hidden state differs in dimension k.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dslm.checkpoint import load_fp32_weights
from dslm.cli import run_command
from dslm.config import CONFIG_NAME, load_config, run_of
from dslm.data.manifest import Manifest
from dslm.errors import DslmError
from dslm.model import ModelConfig
from shards.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS

LINEAR_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
"""dslm's Linear layers in a block -> GPT-2's Conv1D layers (weights stored transposed)."""


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",  # GELU with the tanh approximation, as dslm's MLP
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def fold_head_bias(gain: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gain, shift, weight) of a final LayerNorm and a bias-free head with the same logits as
    `weight @ (gain * n + shift) + bias` for every normalized n (which sums to zero)."""
    gain, shift, weight, bias = (t.double() for t in (gain, shift, weight, bias))
    k = int(torch.argmin(gain.abs() * weight.norm(dim=0)))
    others = torch.arange(len(gain)) != k
    if gain[others].abs().min() < 1e-6:
        raise DslmError("cannot fold the output head's bias: a final LayerNorm gain is zero")
    moved = torch.outer(weight[:, k], gain[k] / gain)  # head weight taken over from k, per dimension
    new_weight = weight - moved
    new_weight[:, k] = bias + weight[:, k] * shift[k] + (moved[:, others] * shift[others]).sum(dim=1)
    new_gain, new_shift = gain.clone(), shift.clone()
    new_gain[k], new_shift[k] = 0.0, 1.0
    return new_gain.float(), new_shift.float(), new_weight.float()


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict for dslm's `weights` (padded vocab rows dropped; a tied head
    is written as its own tensor, since folding the bias changes it)."""
    vocab = cfg.vocab_size
    out = {"transformer.wte.weight": weights["wte.weight"][:vocab], "transformer.wpe.weight": weights["wpe.weight"]}
    for i in range(cfg.n_layer):
        for part in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                out[f"transformer.h.{i}.{part}.{kind}"] = weights[f"blocks.{i}.{part}.{kind}"]
        for ours, theirs in LINEAR_NAMES.items():
            out[f"transformer.h.{i}.{theirs}.weight"] = weights[f"blocks.{i}.{ours}.weight"].t()
            out[f"transformer.h.{i}.{theirs}.bias"] = weights[f"blocks.{i}.{ours}.bias"]
    gain, shift, head = weights["ln_f.weight"], weights["ln_f.bias"], weights["lm_head.weight"][:vocab]
    if "lm_head.bias" in weights:
        gain, shift, head = fold_head_bias(gain, shift, head, weights["lm_head.bias"][:vocab])
    out.update({"transformer.ln_f.weight": gain, "transformer.ln_f.bias": shift, "lm_head.weight": head})
    return {name: t.float().contiguous() for name, t in out.items()}


def tokenizer_config() -> dict:
    """Lets `AutoTokenizer.from_pretrained(OUT)` load tokenizer.json with dslm's special tokens."""
    pad, unk, bos, eos = SPECIAL_TOKENS[:4]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad, "unk_token": unk, "bos_token": bos,
            "eos_token": eos, "additional_special_tokens": SPECIAL_TOKENS[4:], "model_max_length": None}


def export(tag_dir: Path, out: Path, cfg: ModelConfig, tokenizer: Path) -> None:
    """Write the HF folder under a temporary name, then rename it into place."""
    if out.exists():
        raise DslmError(f"{out} already exists; remove it or name another folder")
    weights = load_fp32_weights(tag_dir, cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(hf_state_dict(weights, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    tmp.rename(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dslm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, runs/NAME/checkpoints/global_stepN")
    p.add_argument("out", type=Path, nargs="?", help="where to write (default: runs/NAME/export/stepN)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    tag_dir = args.checkpoint
    if (found := run_of(tag_dir)) is None:
        raise DslmError(f"{tag_dir} is not a checkpoint of a run (runs/NAME/checkpoints/global_stepN)")
    run_dir, step = found
    cfg = load_config(run_dir / CONFIG_NAME, [])
    manifest = Manifest.load(cfg.data.shards)
    out = args.out or run_dir / "export" / f"step{step}"
    export(tag_dir, out, cfg.model, Path(cfg.data.shards) / manifest.tokenizer)
    print(f"wrote {out} (GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-export", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
