"""dslm-export: a checkpoint as a Hugging Face GPT-2 folder (model.safetensors, config.json,
tokenizer.json) that `transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads, with the same
logits as dslm's model.

The block is GPT-2's, so the weights map one to one, except the output head's bias, which the
model cards count and GPT-2 lacks: it is folded exactly into the final LayerNorm and the head
(dslm.hf says how). The logits are the same up to float rounding.

The tokenizer encodes as dslm does: `AutoTokenizer.from_pretrained(OUT)(prompt)` gives the ids
dslm-generate feeds a forward model without a template, <bos> first and special tokens written
in the prompt kept as text (dslm.hf.hf_tokenizer, dslm.hf.tokenizer_config).

--format onnx writes an ONNX graph with a KV cache instead (dslm.onnx_export), from a checkpoint,
a run (its best, else latest checkpoint) or an export folder; --int8 quantizes its weights. The
folder (model.onnx, config.json, tokenizer files) is what `dslm-complete` runs, with ONNX Runtime
and no torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from dslm.checkpoint import load_model_weights, seal_problem
from dslm.cli import ArgumentParser, run_command
from dslm.config import CONFIG_NAME, Origin, load_config, run_of
from dslm.data.manifest import Manifest
from dslm.data.templates import Framing
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import atomic_path, check_creatable, sha256_file
from dslm.hf import (export_tokenizer_sha256, generation_config, hf_config, hf_state_dict, hf_tokenizer,
                     tokenizer_config)
from dslm.logs import VERBOSE_HELP, LibraryOutput
from dslm.lora import LoraConfig
from dslm.model import ModelConfig
from dslm.onnx_export import export_onnx
from dslm.weights import chosen_checkpoint, framing_of, model_from, read_weights, source_kind


def export(tag_dir: Path, out: Path, cfg: ModelConfig, tokenizer: Path, framing: Framing = Framing(),
           lora: LoraConfig | None = None) -> None:
    """Write the HF folder under a temporary name, then rename it into place; config.json records
    the model's framing (dslm.hf.DIRECTION_KEY). `lora`: the run's train.lora, whose adapters are
    merged into the weights. Raises DslmError when `out` exists or cannot be created."""
    check_new_folder(out)
    if (problem := seal_problem(tag_dir, checksums=True)) is not None:
        raise DslmError(f"cannot export {tag_dir}: {problem}")
    weights = load_model_weights(tag_dir, cfg, lora or LoraConfig())
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, framing), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(framing), indent=2) + "\n")
        save_file(hf_state_dict(weights, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # safetensors writes it 0600
        write_tokenizer_files(tmp, tokenizer, framing)


def check_new_folder(out: Path) -> None:
    """DslmError, before any weights are read, when the export folder `out` exists or a folder
    above it is a file."""
    if out.exists():
        raise DslmError(f"{out} already exists; remove it or name another folder")
    check_creatable(out)


def write_tokenizer_files(folder: Path, tokenizer: Path, framing: Framing = Framing(), source_sha256: str = "") -> None:
    """tokenizer.json (dslm's `tokenizer` with the post-processor of dslm.hf.hf_tokenizer for
    `framing`) and tokenizer_config.json (recording `source_sha256`, the training tokenizer's, by
    default `tokenizer`'s sha256) in `folder`. Raises DslmError when `tokenizer` is not a
    tokenizer.json."""
    config = tokenizer_config(source_sha256 or sha256_file(tokenizer), framing)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_tokenizer(load_text_tokenizer(tokenizer), framing).save(str(folder / "tokenizer.json"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="SOURCE",
                   help="a checkpoint folder, runs/NAME/checkpoints/global_stepN (--format onnx: also runs/NAME "
                        "or an export folder)")
    p.add_argument("out", type=Path, nargs="?",
                   help="where to write (default: runs/NAME/export/stepN, stepN-onnx or stepN-onnx-int8; for an "
                        "export folder X, X-onnx or X-onnx-int8 beside it)")
    p.add_argument("--format", choices=("hf", "onnx"), default="hf",
                   help="hf: safetensors for transformers; onnx: a graph with a KV cache for dslm-complete "
                        "(default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="--format onnx: int8 weights (ONNX Runtime's dynamic "
                                                       "quantization), about 4x smaller")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_intermixed_args(argv)  # OUT may follow the options
    if args.int8 and args.format != "onnx":
        p.error("--int8 goes with --format onnx")
    return args


def run_hf(tag_dir: Path, out: Path | None) -> None:
    if (found := run_of(tag_dir)) is None:
        raise DslmError(f"{tag_dir} is not a checkpoint of a run (runs/NAME/checkpoints/global_stepN)")
    run_dir, step = found
    cfg = load_config(run_dir / CONFIG_NAME, [])
    manifest = Manifest.load(cfg.data.shards)
    out = out or run_dir / "export" / f"step{step}"
    export(tag_dir, out, cfg.model, manifest.tokenizer_file(cfg.data.shards),
           Framing(cfg.data.direction, manifest.template), cfg.train.lora)
    print(f"wrote {out} (GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def run_onnx(source: Path, out: Path | None, int8: bool) -> None:
    out, origin = write_onnx(source, out, int8)
    step = f", step {origin.step}" if origin.step is not None else ""
    print(f"wrote {out} from {origin.path}{step} (dslm-complete {out} --prompt ...)")


def write_onnx(source: Path, out: Path | None, int8: bool) -> tuple[Path, Origin]:
    """The ONNX export of `source` (a tag, a run: its chosen_checkpoint, or an export folder) at
    `out`, by default runs/NAME/export/stepN-onnx[-int8], or beside an export folder. Raises
    DslmError, before reading any weights, when the folder exists. Returns the folder and where
    the weights came from."""
    suffix = "-onnx-int8" if int8 else "-onnx"
    if source_kind(source) == "export":
        tag, tokenizer, sha256 = source, source / "tokenizer.json", export_tokenizer_sha256(source)
        out = out or source.absolute().with_name(source.absolute().name + suffix)
    else:
        tag = chosen_checkpoint(source) if source_kind(source) == "run" else source
        run_dir, step = run_of(tag)
        shards = load_config(run_dir / CONFIG_NAME, []).data.shards
        tokenizer, sha256 = Manifest.load(shards).tokenizer_file(shards), ""
        out = out or run_dir / "export" / f"step{step}{suffix}"
    check_new_folder(out)
    cfg, weights, origin = read_weights(tag)
    framing = framing_of(source)
    export_onnx(model_from(cfg, weights, origin.path), out, framing, int8,
                lambda folder: write_tokenizer_files(folder, tokenizer, framing, sha256))
    return out, origin


def run(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        run_onnx(args.checkpoint, args.out, args.int8)
    else:
        run_hf(args.checkpoint, args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with LibraryOutput("dslm-export", args.verbose):
        run_command("dslm-export", lambda: run(args))


if __name__ == "__main__":
    main()
