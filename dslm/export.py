"""dslm-export: a checkpoint, a run or an export folder as a Hugging Face GPT-2 folder
(model.safetensors, config.json, tokenizer.json) that
`transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads, with the same logits as dslm's model.

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

--format gguf writes one GGUF file for llama.cpp and Ollama (dslm.gguf_export), --type f32, f16 or
q8_0, with a Modelfile for `ollama create` beside it.

Every export folder also holds its model card, README.md, with the loss curve beside it
(dslm.model_card), written from what the run recorded.

Every export's config.json records the checkpoint it came from (dslm.hf.ORIGIN_KEY). --check then
compares the folder with it (`dslm-eval OUT --parity`): bits per byte on the run's held-out val
samples and top-1 next-token agreement, printed as a table and recorded as OUT/parity.json; outside
the format's bounds it exits non-zero with one line naming what failed, and the folder stays.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dslm.checkpoint.weights import model_from, read_weights
from dslm.cli import ArgumentParser, run_command
from dslm.config import Origin
from dslm.data.templates import IM_END, IM_START, Framing, get_template, role_marker
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import atomic_path, check_creatable, sha256_file
from dslm.gguf_export import GGUF_NAME, GGUF_TYPES, check_exportable, write_gguf
from dslm.hf import (
    export_tokenizer_sha256,
    generation_config,
    hf_config,
    hf_state_dict,
    hf_tokenizer,
    recorded_origin,
    runtime_config,
    tokenizer_config,
)
from dslm.logs import VERBOSE_HELP, LibraryOutput
from dslm.model import ModelConfig
from dslm.model_card import write_model_card
from dslm.model_source import ModelSource, resolve_source
from dslm.onnx_export import export_onnx


def export(source: str | Path, out: Path | None = None) -> Path:
    """Write the HF folder of `source` (a tag, a run: its chosen tag, or an HF export) at `out`, by
    default runs/NAME/export/stepN of its run (beside an export outside a run, as X-hf); a LoRA
    run's adapters are merged into the weights. Raises DslmError, before reading any weights, when
    `out` exists or a folder above it is a file."""
    found = resolve_source(source)
    found.need_weights()
    out = out or default_out(found, "")
    check_new_folder(out)
    cfg, weights, origin = read_weights(source)
    write_hf(
        out,
        cfg,
        weights,
        found.tokenizer_file(),
        found.framing(),
        training_sha256(found),
        origin_record(found, origin),
        found,
    )
    return out


def write_hf(
    out: Path,
    cfg: ModelConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: Path,
    framing: Framing = Framing(),
    source_sha256: str = "",
    origin: dict | None = None,
    source: ModelSource | None = None,
) -> None:
    """The HF folder of a model of `cfg` with `weights` (as dslm.checkpoint.weights reads them), written under
    a temporary name, then renamed into place; config.json records the model's framing
    (dslm.hf.DIRECTION_KEY) and the checkpoint it came from (`origin`, dslm.hf.ORIGIN_KEY), tokenizer
    files as write_tokenizer_files writes them; with the `source` the weights were read from, its
    model card (dslm.model_card)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, framing, origin), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(framing), indent=2) + "\n")
        save_file(hf_state_dict(weights, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # safetensors writes it 0600
        write_tokenizer_files(tmp, tokenizer, framing, source_sha256)
        if source is not None:
            write_model_card(tmp, source, "hf")


def origin_record(source: ModelSource, origin: Origin) -> dict:
    """What an export of `source` records as the checkpoint it came from (dslm.hf.ORIGIN_KEY): the
    tag read (absolute), or for an export, the checkpoint it records (itself when it records none)."""
    if source.is_export and (recorded := recorded_origin(source.path)):
        return recorded
    return {"path": str(Path(origin.path).absolute()), "step": origin.step}


def training_sha256(source: ModelSource) -> str:
    """sha256 of the tokenizer the model at `source` was trained with (an export records it)."""
    return export_tokenizer_sha256(source.path) if source.is_export else sha256_file(source.tokenizer_file())


def default_out(source: ModelSource, suffix: str) -> Path:
    """dslm-export's folder for `source` when OUT is not given: runs/NAME/export/stepN`suffix` of a
    tag or run (its chosen tag's step), else beside the export folder (its name + `suffix`, or
    "-hf")."""
    if source.is_export:
        return source.path.absolute().with_name(source.path.absolute().name + (suffix or "-hf"))
    tag = resolve_source(source.chosen_tag())
    return tag.run.export(tag.step, suffix)


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
    p = ArgumentParser(prog="dslm-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="SOURCE",
        help="a checkpoint (runs/NAME/checkpoints/global_stepN), a run directory (its best, else latest "
        "checkpoint) or an HF export folder",
    )
    p.add_argument(
        "out",
        type=Path,
        nargs="?",
        help="where to write (default: runs/NAME/export/stepN, stepN-onnx, stepN-onnx-int8 or stepN-gguf-TYPE; "
        "for an export folder X, X-hf, X-onnx, X-onnx-int8 or X-gguf-TYPE beside it)",
    )
    p.add_argument(
        "--format",
        choices=("hf", "onnx", "gguf"),
        default="hf",
        help="hf: safetensors for transformers; onnx: a graph with a KV cache for dslm-complete; gguf: one file "
        "for llama.cpp and Ollama (default: %(default)s)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="--format onnx: int8 weights (ONNX Runtime's dynamic quantization), about 4x smaller",
    )
    p.add_argument(
        "--type",
        choices=tuple(GGUF_TYPES),
        help="--format gguf: the weights' type: f32, f16 (half the size) or q8_0 (llama.cpp's 8-bit blocks, "
        "about a quarter) (default: f16)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="after writing, compare the export with its checkpoint (dslm-eval OUT --parity): print the parity "
        "table, record OUT/parity.json, exit non-zero outside the format's bounds (the folder stays)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        metavar="N",
        help="--check: held-out tokens scored, in whole val samples (default: dslm-eval's --parity-tokens default)",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_intermixed_args(argv)  # OUT may follow the options
    if args.check_tokens is not None and args.check_tokens < 1:
        p.error(f"--check-tokens {args.check_tokens} must be at least 1")
    if args.int8 and args.format != "onnx":
        p.error("--int8 goes with --format onnx")
    if args.check_tokens is not None and not args.check:
        p.error("--check-tokens goes with --check")
    if args.type and args.format != "gguf":
        p.error("--type goes with --format gguf")
    args.type = args.type or "f16"
    return args


def run_hf(source: Path, out: Path | None) -> Path:
    out = export(source, out)
    print(f"wrote {out} (GPT2LMHeadModel.from_pretrained({str(out)!r}))", flush=True)
    return out


def run_onnx(source: Path, out: Path | None, int8: bool) -> Path:
    out, origin = write_onnx(source, out, int8)
    step = f", step {origin.step}" if origin.step is not None else ""
    print(f"wrote {out} from {origin.path}{step} (dslm-complete {out} --prompt ...)", flush=True)
    return out


def check(out: Path, tokens: int | None) -> None:
    """`dslm-eval OUT --parity` (dslm_eval.parity; dslm imports nothing of dslm_eval): its table on
    stdout; `tokens`: its --parity-tokens, None for its default. Raises DslmError with dslm-eval's
    one line when the export fails its bounds or cannot be checked."""
    command = [sys.executable, "-m", "dslm_eval.cli", str(out), "--parity"]
    command += ["--parity-tokens", str(tokens)] if tokens is not None else []
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)  # descriptor 1 is LibraryOutput's: its table goes to sys.stdout
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"dslm-eval exited with status {done.returncode}"]
        raise DslmError(f"--check: {lines[-1].removeprefix('dslm-eval: error: ')}")


def write_onnx(source: Path, out: Path | None, int8: bool) -> tuple[Path, Origin]:
    """The ONNX export of `source` (a tag, a run: its chosen tag, or an HF export folder) at `out`,
    by default runs/NAME/export/stepN-onnx[-int8], or beside an export folder. Raises DslmError,
    before reading any weights, when the folder exists or a folder above it is a file. Returns the folder and where the weights
    came from."""
    found = resolve_source(source)
    found.need_weights()
    out = out or default_out(found, "-onnx-int8" if int8 else "-onnx")
    check_new_folder(out)
    cfg, weights, origin = read_weights(source)
    framing, tokenizer, sha256 = found.framing(), found.tokenizer_file(), training_sha256(found)

    def write_files(folder: Path) -> None:
        write_tokenizer_files(folder, tokenizer, framing, sha256)
        write_model_card(folder, found, "onnx-int8" if int8 else "onnx")

    export_onnx(model_from(cfg, weights, origin.path), out, framing, int8, write_files, origin_record(found, origin))
    return out, origin


def write_gguf_folder(source: Path, out: Path | None, type: str) -> tuple[Path, Origin]:
    """The GGUF export of `source` (a tag, a run: its chosen tag, or an HF export folder) at `out`,
    by default runs/NAME/export/stepN-gguf-TYPE, or beside an export folder: GGUF_NAME, config.json
    (dslm.hf.runtime_config), the tokenizer files and a Modelfile (`ollama_modelfile`). Raises
    DslmError, before reading any weights, when the folder exists, a folder above it is a file or
    the model reads text backward (dslm.gguf_export.check_exportable). Returns the folder and where
    the weights came from."""
    found = resolve_source(source)
    found.need_weights()
    framing, tokenizer, sha256 = found.framing(), found.tokenizer_file(), training_sha256(found)
    check_exportable(framing)
    out = out or default_out(found, f"-gguf-{type}")
    check_new_folder(out)
    cfg, weights, origin = read_weights(source)
    name = GGUF_NAME.format(type=type)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(
            json.dumps(runtime_config(cfg, framing, origin_record(found, origin)), indent=2) + "\n"
        )
        write_tokenizer_files(tmp, tokenizer, framing, sha256)
        write_gguf(tmp / name, cfg, weights, load_text_tokenizer(tokenizer), framing, type)
        (tmp / "Modelfile").write_text(ollama_modelfile(name, framing, cfg.block_size))
        write_model_card(tmp, found, f"gguf-{type}")
    return out, origin


def ollama_modelfile(name: str, framing: Framing, context: int) -> str:
    """An Ollama Modelfile for the GGUF file `name` beside it (`ollama create NAME -f Modelfile`):
    greedy decoding, as dslm-complete's default; the model's `context` in tokens (llama.cpp aborts
    past the positions the model has, and Ollama's default is longer); the prompt framed as the model was trained
    (Ollama adds <bos> as the file asks): as it is for a model of documents; for a model tuned with
    a template, the given block, then the target block's opening markers, stopping at its close
    (what dslm-generate --template feeds; a template with reversed words, which Ollama's template
    language cannot reverse, takes its prompt reversed word by word, as the comment says)."""
    lines = [f"FROM ./{name}", "PARAMETER temperature 0", f"PARAMETER num_ctx {context}"]
    if not framing.template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        return "\n".join(lines) + "\n"
    template = get_template(framing.template)
    given, target = (
        f"{IM_START}{role_marker(template.given(framing.direction))}",
        f"{IM_START}{role_marker(template.target(framing.direction))}",
    )
    if template.reverse_words:
        lines.insert(0, f"# the {template.name} template: write the prompt with its words in reverse order")
    lines += [f'TEMPLATE """{given}{{{{ .Prompt }}}}{IM_END}{target}"""', f"PARAMETER stop {IM_END}"]
    return "\n".join(lines) + "\n"


def run_gguf(source: Path, out: Path | None, type: str) -> Path:
    out, origin = write_gguf_folder(source, out, type)
    step = f", step {origin.step}" if origin.step is not None else ""
    print(f"wrote {out} from {origin.path}{step} (llama-cli -m {out / GGUF_NAME.format(type=type)} -p ...)", flush=True)
    return out


def card_format(args: argparse.Namespace) -> str:
    """The export's format as dslm.model_card names it: hf, onnx, onnx-int8 or gguf-TYPE."""
    if args.format == "gguf":
        return f"gguf-{args.type}"
    return "onnx-int8" if args.int8 else args.format


def run(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        out = run_onnx(args.checkpoint, args.out, args.int8)
    elif args.format == "gguf":
        out = run_gguf(args.checkpoint, args.out, args.type)
    else:
        out = run_hf(args.checkpoint, args.out)
    if args.check:
        try:
            check(out, args.check_tokens)
        finally:  # the card shows the parity table, passed or not
            write_model_card(out, resolve_source(args.checkpoint), card_format(args))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with LibraryOutput("dslm-export", args.verbose):
        run_command("dslm-export", lambda: run(args))


if __name__ == "__main__":
    main()
