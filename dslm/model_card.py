"""The model card in every export folder: README.md in the Hugging Face format (YAML metadata between
`---` lines, then markdown) and the loss curve beside it (loss_curve.png), written from what the
run recorded:

    architecture  the run's config.yaml `model` (an export outside a run: its config.json), the
                  tokenizer.json, the framing (dslm.model_source.ModelSource.framing)
    data          each source in the manifest.json of each shard folder the run read
    training      config.yaml's train.*, the tag's seal (dslm.checkpoint.format.TrainState: steps,
                  samples, wall time, hardware), metrics.csv (final losses, the curve)
    evaluation    dslm-eval's results for the step (runs/NAME/eval/stepN.json, stepN/SET.json) and
                  the export's parity table (parity.json in the folder, from `dslm-export --check`)
    chain         config.yaml's `origin`, then its source's run's, back to a run from random weights
A fact the run did not record (an export made from an export outside a run, a tag written before
dslm recorded its wall time) is said to be "not recorded", never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tokenizers import Tokenizer

from dslm.checkpoint.format import SEAL_NAME, TrainState, sealed_state
from dslm.checkpoint.weights import export_model_config
from dslm.config import RunConfig, read_run_config
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.errors import DslmError
from dslm.files import atomic_path, atomic_write_text
from dslm.logs import libraries
from dslm.metrics import read_rows
from dslm.model import ModelConfig
from dslm.model_source import ModelSource, resolve_source
from dslm.run_dir import RunDir

CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss_curve.png"
PARITY_NAME = "parity.json"
"""The parity table `dslm-export --check` records in the export folder."""
PARITY_ROW_KEYS = {"format", "size_bytes", "bits_per_byte", "delta_pct", "top1_agreement", "passed"}
"""What the card reads of each row of a parity table."""
NOT_RECORDED = "not recorded"
FORMATS = {  # fmt -> (what the folder holds, library_name, tags)
    "hf": ("a Hugging Face transformers folder (safetensors, fp32)", "transformers", ["safetensors"]),
    "onnx": ("an ONNX graph with a KV cache (fp32) for dslm-complete", "onnx", ["onnx"]),
    "onnx-int8": ("an ONNX graph with a KV cache and int8 weights for dslm-complete", "onnx", ["onnx", "int8"]),
    "gguf": ("a GGUF file for llama.cpp", "gguf", ["gguf"]),
}
"""The export formats a card describes; "gguf-TYPE" (gguf-f16) is a GGUF file of that type."""
LOSSES = (("train/loss", "train"), ("val/loss", "val"))
"""metrics.csv's loss columns, with their names on the curve."""


@dataclass(frozen=True)
class Facts:
    """What a card is written from: the export's source and the run and step its weights come
    from (None for an export outside a run)."""

    source: ModelSource
    fmt: str
    run: RunDir | None
    step: int | None
    cfg: RunConfig | None
    model: ModelConfig
    state: TrainState | None
    """The seal's state of the checkpoint; None where the tag is gone or the step unknown."""


def gather(source: ModelSource, fmt: str) -> Facts:
    """The facts of `source` (a tag, a run: its chosen tag, or an export folder). Raises
    DslmError for a run whose config cannot be read, or an unknown `fmt`."""
    format_facts(fmt)
    if source.kind == "run":
        tag = resolve_source(source.chosen_tag())
        run, step = tag.run, tag.step
    else:
        run, step = source.run, source.step
    if run is None:
        return Facts(source, fmt, None, None, None, export_model_config(source.path), None)
    cfg = read_run_config(run)
    seal = run.tag(step) / SEAL_NAME if step is not None else None
    state = sealed_state(seal.parent) if seal is not None and seal.is_file() else None
    return Facts(source, fmt, run, step, cfg, cfg.model, state)


def format_facts(fmt: str) -> tuple[str, str, list[str]]:
    """(what the folder holds, library_name, tags) of export format `fmt`. Raises DslmError for
    another format."""
    kind, _, gguf_type = fmt.partition("-") if fmt.startswith("gguf") else (fmt, "", "")
    if kind not in FORMATS:
        raise DslmError(f"no model card for export format {fmt!r}; the formats are {', '.join(FORMATS)}")
    what, library, tags = FORMATS[kind]
    return (f"{what} ({gguf_type})" if gguf_type else what), library, tags


def write_model_card(folder: Path, source: ModelSource, fmt: str) -> None:
    """Write the card of the export of `source` in format `fmt` (hf, onnx, onnx-int8, gguf or
    gguf-TYPE) into the export folder `folder`:
    the loss curve (where metrics.csv has losses), then README.md, each under a temporary name
    renamed into place, so it may be written again into a finished folder (after `--check` adds
    parity.json). Raises DslmError as gather and read_parity do."""
    facts = gather(source, fmt)
    parity = read_parity(folder / PARITY_NAME)
    if rows := loss_rows(facts):
        draw_loss_curve(rows, facts.step, folder / LOSS_CURVE_NAME)
    atomic_write_text(folder / CARD_NAME, render(facts, parity))


def render_model_card(source: ModelSource, fmt: str, parity: dict | None = None) -> str:
    """The README.md write_model_card writes for `source` in format `fmt`, with `parity` (a
    parity.json's content) or without. Writes nothing."""
    return render(gather(source, fmt), parity)


def read_parity(path: Path) -> dict | None:
    """The parity table at `path`, None when there is none. Raises DslmError for one that is not
    JSON with its rows."""
    if not path.is_file():
        return None
    try:
        parity = json.loads(path.read_text())
        if isinstance(parity["reference"]["bits_per_byte"], int | float) and all(
            PARITY_ROW_KEYS <= row.keys() for row in parity["rows"]
        ):
            return parity
        problem = f"reference.bits_per_byte is not a number, or a row lacks one of {', '.join(sorted(PARITY_ROW_KEYS))}"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
    raise DslmError(f"{path} is not dslm-export --check's parity table ({problem})")


def render(facts: Facts, parity: dict | None) -> str:
    sections = [
        title(facts),
        architecture(facts),
        data(facts),
        training(facts),
        evaluation(facts, parity),
        chain(facts),
        usage(facts),
    ]
    return "---\n" + yaml.safe_dump(metadata(facts), sort_keys=False) + "---\n\n" + "\n".join(sections)


def metadata(facts: Facts) -> dict:
    """The card's YAML metadata: license "other" (no run records one), languages, tags,
    library_name, base_model for a fine-tune (its origin as recorded) and the hub datasets its
    shards were built from, where known."""
    _, library, format_tags = format_facts(facts.fmt)
    manifests = [m for _, _, m in shard_folders(facts)]
    languages = sorted({hf_language(name) for m in manifests for s in m.shards for name in s.languages} - {None})
    tags = ["dslm", "gpt2", "text-generation", *format_tags]
    tags += ["code"] * ("code" in languages) + ["fill-in-the-middle"] * facts.source.framing().fim
    meta = {"license": "other", **({"language": languages} if languages else {}), "tags": tags}
    meta["library_name"] = library
    if facts.cfg is not None and facts.cfg.origin.path:
        meta["base_model"] = facts.cfg.origin.path
    if datasets := sorted({d for m in manifests for spec in m.sources if (d := hub_dataset(spec))}):
        meta["datasets"] = datasets
    return meta


def hf_language(name: str) -> str | None:
    """The card's language for a shard's language: an ISO 639-1 code (FineWeb's "en") as it is,
    a programming language (python, c, java) "code", plain text of no known language None."""
    if name == "text":
        return None
    return name if re.fullmatch(r"[a-z]{2}", name) else "code"


def hub_dataset(spec: str) -> str | None:
    """The hub dataset id a `dslm-shard build` source spec (fineweb:OWNER/NAME,...) names; None
    for local files."""
    kind, _, rest = spec.partition(":")
    path = rest.split(",")[0]
    hub_like = re.fullmatch(r"[\w-]+/[\w.-]+", path) and not Path(path).suffix
    return path if kind == "fineweb" and hub_like and not Path(path).exists() else None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavored markdown table; a "|" in a cell (`<|im_end|>`) escaped, as it must be
    even in a code span."""
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n" for cells in lines)


def facts_table(rows: dict[str, str]) -> str:
    return markdown_table(["", ""], [[key, value] for key, value in rows.items()])


def title(facts: Facts) -> str:
    what, _, _ = format_facts(facts.fmt)
    if facts.run is None:
        return f"# {facts.source.path.name}\n\nA GPT-2 model exported from `{facts.source.path}` as {what}.\n"
    return (
        f"# {facts.run.path.name}\n\nA GPT-2 model trained with dslm: step {facts.step} of the run "
        f"`{facts.run.path.name}`, exported as {what}.\n"
    )


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def architecture(facts: Facts) -> str:
    """The model's sizes, its exact parameter count (ModelConfig.num_params: a head bias an export
    folds is not counted), the tokenizer and the framing."""
    model, framing = facts.model, facts.source.framing()
    tokenizer_file = facts.source.tokenizer_file()
    tokenizer, spec = Tokenizer.from_file(str(tokenizer_file)), json.loads(tokenizer_file.read_text())
    specials = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []) if t.get("special"))
    rows = {
        "parameters": f"{model.num_params():,}",
        "layers": str(model.n_layer),
        "attention heads": str(model.n_head),
        "embedding width": str(model.n_embd),
        "MLP width": str(model.intermediate_size),
        "context length": f"{model.block_size:,} tokens",
        "output vocabulary": f"{model.vocab_size:,}",
        "tied embeddings": yes_no(model.tie_embeddings),
        "output head bias": yes_no(model.lm_head_bias),
        "tokenizer": f"{spec['model']['type']}, {tokenizer.get_vocab_size():,} tokens",
        "normalizer": normalizer_name(spec.get("normalizer")),
        "special tokens": ", ".join(f"`{content}` {id_}" for id_, content in specials) or "none",
        "direction": framing.direction,
        "template": framing.template or "none",
        "fill-in-the-middle": yes_no(framing.fim),
    }
    return "## Architecture\n\n" + facts_table(rows)


def normalizer_name(normalizer: dict | None) -> str:
    """A tokenizer.json normalizer's type (a Sequence: its parts', joined by "+"), "none" for none."""
    if not normalizer:
        return "none"
    if normalizer["type"] == "Sequence":
        return "+".join(normalizer_name(part) for part in normalizer["normalizers"])
    return normalizer["type"]


def shard_folders(facts: Facts) -> list[tuple[str, float, Manifest]]:
    """(name, mix weight, manifest) of each shard folder the run read that is still there."""
    if facts.cfg is None:
        return []
    return [
        (name, source.weight, Manifest.load(source.shards))
        for name, source in facts.cfg.data.sources()
        if (Path(source.shards) / MANIFEST_NAME).is_file()
    ]


def data(facts: Facts) -> str:
    """Each source of each shard folder: documents, tokens and the documents filtered, by reason."""
    if facts.cfg is None:
        return f"## Data\n\n{NOT_RECORDED}: this export was made outside a run.\n"
    found = shard_folders(facts)
    rows = [
        [name, f"`{spec}`", f"{weight:g}", f"{stats.documents:,}", f"{stats.tokens:,}", filtered(stats.filtered)]
        for name, weight, manifest in found
        for spec, stats in manifest.sources.items()
    ]
    header = ["shards", "source", "mix weight", "documents", "tokens", "filtered out"]
    text = "## Data\n\n" + (markdown_table(header, rows) if rows else "")
    missing = [source.shards for name, source in facts.cfg.data.sources() if name not in {n for n, _, _ in found}]
    if missing:
        text += f"\nThe sources of {', '.join(f'`{m}`' for m in missing)} are {NOT_RECORDED} here: the shards are not there.\n"
    return text


def filtered(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.items())) or "none"


def loss_rows(facts: Facts) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv with a loss, [] without a run or a metrics.csv."""
    if facts.run is None or not facts.run.metrics_csv.is_file():
        return []
    return [row for row in read_rows(facts.run.metrics_csv)[1] if any(row.get(tag) for tag, _ in LOSSES)]


def final_loss(rows: list[dict[str, str]], tag: str, step: int | None) -> str:
    """The last value of `tag` at or before `step`, with its step."""
    found = [row for row in rows if row.get(tag) and (step is None or int(row["step"]) <= step)]
    return f"{float(found[-1][tag]):.4f} (step {found[-1]['step']})" if found else NOT_RECORDED


def training(facts: Facts) -> str:
    """Steps, samples, tokens seen, wall time, hardware and final losses; the loss curve; the
    recipe's settings."""
    if facts.cfg is None:
        return f"## Training\n\n{NOT_RECORDED}: this export was made outside a run.\n"
    state, rows = facts.state, loss_rows(facts)
    seq_len = state.shards.get("seq_len") if state else None
    seconds = state.train_seconds if state else 0
    recorded = {
        "checkpoint": f"step {facts.step}",
        "steps": str(state.step) if state else NOT_RECORDED,
        "samples": f"{state.samples:,}" if state else NOT_RECORDED,
        "tokens seen": f"{state.samples * seq_len:,}" if seq_len else NOT_RECORDED,
        "wall time": duration(seconds) if seconds else NOT_RECORDED,
        "hardware": (state.hardware if state else "") or NOT_RECORDED,
        "ranks": str(state.world_size) if state else NOT_RECORDED,
        **{f"final {name} loss": final_loss(rows, tag, facts.step) for tag, name in LOSSES},
    }
    curve = f"\n![loss curve]({LOSS_CURVE_NAME})\n" if rows else ""
    recipe = markdown_table(["setting", "value"], [[key, f"`{value}`"] for key, value in settings(facts.cfg).items()])
    return f"## Training\n\n{facts_table(recorded)}{curve}\nThe recipe's settings:\n\n{recipe}"


def duration(seconds: float) -> str:
    """`seconds` as a reader takes them in: seconds up to 2 minutes, minutes up to 2 hours, then hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def settings(cfg: RunConfig) -> dict[str, str]:
    """train.* (nested ones dotted), data.direction and ds_config as config.yaml records them, each
    value as JSON."""

    def flat(values: dict, prefix: str) -> dict[str, str]:
        out = {}
        for key, value in values.items():
            nested = isinstance(value, dict) and value
            out |= flat(value, f"{prefix}{key}.") if nested else {prefix + key: json.dumps(value)}
        return out

    return flat(asdict(cfg.train), "train.") | {
        "data.direction": json.dumps(cfg.data.direction),
        "ds_config": json.dumps(cfg.ds_config),
    }


def draw_loss_curve(rows: list[dict[str, str]], step: int | None, path: Path) -> None:
    """A PNG at `path` of train and val loss by step, the exported step marked (matplotlib's Agg
    renderer, no display needed), written under a temporary name renamed into place."""
    with libraries():  # matplotlib says so on stderr when it first builds its font cache
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # without pyplot: no backend state shared with the process

        figure = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(figure)
        draw_losses(figure, rows, step)
    with atomic_path(path) as tmp, libraries():
        figure.savefig(tmp, format="png")


def draw_losses(figure, rows: list[dict[str, str]], step: int | None) -> None:
    """Train and val loss by step on `figure` (a matplotlib Figure), `step` marked."""
    axes = figure.subplots()
    for tag, name in LOSSES:
        points = [(int(row["step"]), float(row[tag])) for row in rows if row.get(tag)]
        if points:
            axes.plot(*zip(*points), label=name, marker="o" if tag == "val/loss" else None)
    if step is not None:
        axes.axvline(step, color="grey", linestyle="--", label=f"exported (step {step})")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()


def evaluation(facts: Facts, parity: dict | None) -> str:
    """dslm-eval's scalars for the step, then the parity table (or how to make it)."""
    results = facts.run.eval_results(facts.step) if facts.run is not None and facts.step is not None else []
    rows = [
        ["the run's shards" if path == facts.run.eval_result(facts.step) else path.stem, metric, f"{value:.4f}"]
        for path in results
        for metric, value in read_result(path).get("scalars", {}).items()
    ]
    if rows:
        text = f"dslm-eval's results for step {facts.step}:\n\n" + markdown_table(["shards", "metric", "value"], rows)
    else:
        command = f"dslm-eval {facts.run.path}" if facts.run else f"dslm-eval {facts.source.path} --shards DIR"
        text = f"No dslm-eval result recorded for this checkpoint (`{command}` writes one).\n"
    return "## Evaluation\n\n" + text + "\n### Export parity\n\n" + parity_text(facts, parity)


def read_result(path: Path) -> dict:
    """A dslm-eval result. Raises DslmError for a file that is not a JSON object."""
    try:
        result = json.loads(path.read_text())
    except ValueError as e:
        raise DslmError(f"{path} is not a dslm-eval result ({e})") from None
    if not isinstance(result, dict):
        raise DslmError(f"{path} is not a dslm-eval result (not a JSON object)")
    return result


def parity_text(facts: Facts, parity: dict | None) -> str:
    """The parity table of `parity` (dslm-export --check): bits per byte of each format against the
    checkpoint's, and top-1 next-token agreement with it."""
    if parity is None:
        return (
            f"Not measured yet: `dslm-export {source_path(facts)} --format ... --check` measures bits per byte "
            f"on the held-out shards and top-1 agreement with the checkpoint, and records them here.\n"
        )
    rows = [["checkpoint", "", f"{parity['reference']['bits_per_byte']:.4f}", "", "", ""]] + [
        [
            row["format"],
            f"{row['size_bytes'] / 2**20:,.2f} MiB",
            f"{row['bits_per_byte']:.4f}",
            f"{row['delta_pct']:+.2f}%",
            f"{row['top1_agreement'] * 100:.2f}%",
            yes_no(row["passed"]),
        ]
        for row in parity["rows"]
    ]
    header = ["format", "size", "bits per byte", "delta to checkpoint", "top-1 agreement", "within bounds"]
    return (
        f"Measured by `dslm-export --check` on {parity.get('tokens', 0):,} tokens of `{parity.get('shards', '')}` "
        f"against `{parity.get('checkpoint', '')}`:\n\n" + markdown_table(header, rows)
    )


def source_path(facts: Facts) -> str:
    """The checkpoint the export came from, else the source as given: what the snippets export."""
    if facts.run is not None and facts.step is not None:
        return str(facts.run.tag(facts.step))
    return str(facts.source.path)


def origin_run(path: str) -> RunDir | None:
    """The run of a recorded origin (a tag, or an export at its default place), None when it is
    not there any more or not in a run."""
    try:
        return resolve_source(path).run if path and Path(path).exists() else None
    except DslmError:
        return None


def chain(facts: Facts) -> str:
    """Each run's origin, from this run back to the one trained from random weights."""
    if facts.cfg is None:
        return f"## Fine-tune chain\n\n{NOT_RECORDED}: this export was made outside a run.\n"
    lines, run, cfg, seen = [], facts.run, facts.cfg, set()
    while cfg.origin.path:
        origin = cfg.origin
        step = f"step {origin.step}" if origin.step is not None else f"step {NOT_RECORDED}"
        lines.append(f"- `{run.path.name}` started from `{origin.path}` ({step}, weights sha256 `{origin.sha256}`)")
        parent = origin_run(origin.path)
        if parent is None or parent.path.resolve() in seen:
            lines.append(f"- `{origin.path}`: its run is {NOT_RECORDED} here (not in a run, or not there any more)")
            return "## Fine-tune chain\n\n" + "\n".join(lines) + "\n"
        seen.add(parent.path.resolve())
        run, cfg = parent, read_run_config(parent)
    lines.append(f"- `{run.path.name}`: Trained from random weights (no `train.init_from`).")
    return "## Fine-tune chain\n\n" + "\n".join(lines) + "\n"


def usage(facts: Facts) -> str:
    """Three short snippets: transformers, dslm-complete, llama.cpp; each from the export that
    format needs (OUT), this folder where it is that one."""
    source, framing = source_path(facts), facts.source.framing()
    prompt = "def fib(n):" if "code" in metadata(facts).get("language", []) else "The history of"
    kind, _, precision = facts.fmt.partition("-")
    gguf_type = precision if kind == "gguf" and precision else "f16"

    def here(format_kind: str) -> str:
        return " (OUT: this folder)" if kind == format_kind else ""

    text = (
        f"## How to use\n\nWith transformers, from the Hugging Face export `dslm-export {source} OUT`{here('hf')}:\n\n"
        "```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("OUT")\nmodel = GPT2LMHeadModel.from_pretrained("OUT")\n'
        f'ids = tokenizer({prompt!r}, return_tensors="pt").input_ids\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))\n```\n\n"
        f"With dslm-complete, from the ONNX export{here('onnx')}:\n\n"
        f"```\ndslm-export {source} --format onnx --int8 OUT\ndslm-complete OUT --prompt {prompt!r}\n```\n\n"
        f"With llama.cpp, from the GGUF file{here('gguf')}:\n\n"
        f"```\ndslm-export {source} --format gguf --type {gguf_type} OUT\n"
        f"llama-cli -m OUT/model-{gguf_type}.gguf -p {prompt!r}\n```\n"
    )
    if framing.direction == "backward":
        text += "\nThis model reads backward: give it reversed ids (config.json's `dslm_direction`), or use dslm-generate.\n"
    if framing.template:
        text += f"\nIt was tuned with the `{framing.template}` template: frame prompts with the tokenizer's chat template.\n"
    return text
