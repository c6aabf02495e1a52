"""An export against the checkpoint it came from: bits per byte on held-out samples, and how often
both pick the same next token (teacher-forced top-1 agreement), within each format's BOUNDS.

dslm-eval EXPORT --parity (dslm_eval.cli.check_export) measures both on the same val samples,
prints the table and records it in the export folder as parity.json; `dslm-export --check` runs
it on the folder it wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dslm.data.loader import reverse
from dslm.files import atomic_write_text
from dslm.model import IGNORE_INDEX
from dslm.objective import next_token
from dslm_eval.exports import ExportModel
from dslm_eval.heldout import LabeledSamples
from dslm_eval.perplexity import Totals

PARITY_NAME = "parity.json"
"""The record of the last check, in the export folder."""
DEFAULT_TOKENS = 16384
"""Held-out target tokens scored by default (--parity-tokens, --check-tokens): whole val samples
until at least this many."""


@dataclass(frozen=True)
class Bounds:
    """What an export must keep of its checkpoint to pass."""

    delta_pct: float
    """Most change of bits per byte, either way, in percent of the checkpoint's."""
    top1_agreement: float
    """Least fraction (0..1) of scored positions whose most likely next token is the checkpoint's."""


BOUNDS = {
    "hf": Bounds(0.1, 1.0),
    "onnx": Bounds(0.1, 1.0),
    "onnx-int8": Bounds(1.0, 0.95),
    "gguf-f32": Bounds(0.1, 0.999),
    "gguf-f16": Bounds(0.1, 0.99),
    "gguf-q8_0": Bounds(1.0, 0.95),
}
"""Each export format's bounds (dslm_eval.exports.export_format names them): fp32 and f16 keep bits
per byte within 0.1% and the checkpoint's choice everywhere (f16: 99%); int8 and q8_0 within 1%
and 95%. GGUF f32 keeps it at 99.9% of positions: llama.cpp's CPU GELU reads a float16 table
(ggml's GGML_GELU_FP16), so its f32 logits differ from dslm's by up to ~4e-3 (measured on the
demo's model), which flips a rare near-tie (1 of 7,680 positions there)."""


@dataclass
class Scored:
    """One model on the held-out samples."""

    bits_per_byte: float
    tokens: int
    """Target tokens scored."""
    top1: np.ndarray
    """(tokens,) int64: the most likely next token at each scored position."""


@dataclass
class Row:
    """One export in the parity table (parity.json's "rows")."""

    format: str
    size_bytes: int
    """Its weight files' bytes."""
    bits_per_byte: float
    delta_pct: float
    """Its bits per byte minus the checkpoint's, in percent of the checkpoint's."""
    top1_agreement: float
    """Fraction (0..1) of scored positions where its most likely next token is the checkpoint's."""
    bounds: dict
    """Its format's Bounds, as {"delta_pct", "top1_agreement"}."""
    passed: bool


@dataclass
class Parity:
    """parity.json: the checkpoint, what was scored, its bits per byte ("reference") and the rows."""

    checkpoint: str
    step: int | None
    shards: str
    tokens: int
    reference: dict
    """{"bits_per_byte": the checkpoint's}."""
    rows: list[Row]
    passed: bool


@torch.no_grad()
def score(model: ExportModel, samples: LabeledSamples, table: torch.Tensor, tokens: int, direction: str) -> Scored:
    """`model` on whole val samples, in order, until at least `tokens` targets are scored (fewer
    when the split is smaller), read in the model's `direction`; only training targets count (as
    dslm_eval.perplexity.perplexity counts them). `table`: (V,) bytes per token (token_bytes)."""
    totals, choices, scored = Totals(1), [], 0
    for index in range(len(samples)):
        if scored >= tokens:
            break
        sample = {name: t[None] for name, t in samples[index][0].items()}  # (1, T + 1)
        inputs, targets = next_token(reverse(sample) if direction == "backward" else sample)
        logits = torch.from_numpy(model.logits(inputs[0].numpy()))  # (T, V)
        target, counted = targets[0], targets[0] != IGNORE_INDEX
        nats = F.cross_entropy(logits.float(), target, reduction="none").sum()  # 0 where ignored
        size = (table[target.clamp(min=0)] * counted).sum()
        totals.add(torch.zeros(1, dtype=torch.int64), nats[None], counted.sum()[None], size[None])
        choices.append(logits.argmax(-1)[counted].numpy())
        scored += int(counted.sum())
    result = totals.result(slice(None))
    return Scored(result.bpb, result.tokens, np.concatenate(choices) if choices else np.zeros(0, np.int64))


def compare(export: Scored, reference: Scored, fmt: str, size: int) -> Row:
    """The row of an export of format `fmt` (a key of BOUNDS) scored on the same samples as its checkpoint."""
    bounds = BOUNDS[fmt]
    delta = (export.bits_per_byte - reference.bits_per_byte) / reference.bits_per_byte * 100
    agreement = float(np.mean(export.top1 == reference.top1)) if len(reference.top1) else 1.0
    passed = abs(delta) <= bounds.delta_pct and agreement >= bounds.top1_agreement
    return Row(fmt, size, export.bits_per_byte, delta, agreement, dataclasses.asdict(bounds), passed)


def failures(parity: Parity) -> str:
    """What failed, in one line: each failing row's measures outside its bounds."""
    parts = []
    for row in (r for r in parity.rows if not r.passed):
        bounds = row.bounds
        if abs(row.delta_pct) > bounds["delta_pct"]:
            parts.append(
                f"{row.format} bits per byte {row.delta_pct:+.3f}% off the checkpoint's (bound ±{bounds['delta_pct']:g}%)"
            )
        if row.top1_agreement < bounds["top1_agreement"]:
            parts.append(
                f"{row.format} top-1 agreement {row.top1_agreement:.2%} (bound {bounds['top1_agreement']:.0%})"
            )
    return "; ".join(parts)


def table(parity: Parity) -> str:
    """The parity table: the checkpoint's bits per byte, then each export's format, size, bits per
    byte, delta and top-1 agreement, and whether it is within its bounds."""
    step = f" (step {parity.step})" if parity.step is not None else ""
    lines = [
        f"parity with {parity.checkpoint}{step} on {parity.tokens} held-out tokens of {parity.shards}",
        f"  {'format':<12}{'size':>12}{'bits/byte':>11}{'delta':>10}{'top-1':>9}",
        f"  {'checkpoint':<12}{'-':>12}{parity.reference['bits_per_byte']:>11.4f}{'-':>10}{'-':>9}",
    ]
    for row in parity.rows:
        lines.append(
            f"  {row.format:<12}{row.size_bytes / 2**20:>8.2f} MiB{row.bits_per_byte:>11.4f}"
            f"{row.delta_pct:>+9.3f}%{row.top1_agreement:>9.2%}  {'ok' if row.passed else 'FAILED'}"
        )
    return "\n".join(lines)


def write_parity(folder: Path, parity: Parity) -> Path:
    """parity.json in the export `folder`, written under a temporary name then renamed; returns its path."""
    path = folder / PARITY_NAME
    atomic_write_text(path, json.dumps(dataclasses.asdict(parity), indent=2) + "\n")
    return path
