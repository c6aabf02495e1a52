"""dslm-export: a checkpoint as a Hugging Face GPT-2 folder (model.safetensors, config.json,
tokenizer.json) that `transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads, with the same
logits as dslm's model.

The block is GPT-2's, so the weights map one to one, except the output head's bias, which the
model cards count and GPT-2 lacks: it is folded exactly into the final LayerNorm and the head
(dslm.hf says how). The logits are the same up to float rounding.

The tokenizer encodes as dslm does: `AutoTokenizer.from_pretrained(OUT)(prompt)` gives the ids
dslm-generate feeds a forward model without a template, <bos> first and special tokens written
in the prompt kept as text (dslm.hf.hf_tokenizer, dslm.hf.tokenizer_config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from dslm.checkpoint import load_model_weights
from dslm.cli import ArgumentParser, run_command
from dslm.config import CONFIG_NAME, load_config, run_of
from dslm.data.manifest import Manifest
from dslm.data.templates import Framing
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import atomic_path, sha256_file
from dslm.hf import hf_config, hf_state_dict, hf_tokenizer, tokenizer_config
from dslm.lora import LoraConfig
from dslm.model import ModelConfig


def export(tag_dir: Path, out: Path, cfg: ModelConfig, tokenizer: Path, framing: Framing = Framing(),
           lora: LoraConfig | None = None) -> None:
    """Write the HF folder under a temporary name, then rename it into place; config.json records
    the model's framing (dslm.hf.DIRECTION_KEY). `lora`: the run's train.lora, whose adapters are
    merged into the weights. Raises DslmError when `out` exists."""
    if out.exists():
        raise DslmError(f"{out} already exists; remove it or name another folder")
    weights = load_model_weights(tag_dir, cfg, lora or LoraConfig())
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(hf_state_dict(weights, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, framing), indent=2) + "\n")
        write_tokenizer_files(tmp, tokenizer, framing)


def write_tokenizer_files(folder: Path, tokenizer: Path, framing: Framing = Framing()) -> None:
    """tokenizer.json (dslm's `tokenizer` with the post-processor of dslm.hf.hf_tokenizer for
    `framing`) and tokenizer_config.json (recording `tokenizer`'s sha256) in `folder`. Raises
    DslmError when `tokenizer` is not a tokenizer.json."""
    config = tokenizer_config(sha256_file(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_tokenizer(load_text_tokenizer(tokenizer), framing).save(str(folder / "tokenizer.json"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-export", description=__doc__,
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
    export(tag_dir, out, cfg.model, Path(cfg.data.shards) / manifest.tokenizer,
           Framing(cfg.data.direction, manifest.template), cfg.train.lora)
    print(f"wrote {out} (GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-export", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
