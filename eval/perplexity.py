"""Token-weighted perplexity and bits per byte of a model on a split of tokenized shards, overall
and per language."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dslm.data.loader import reverse, to_device
from dslm.memory import check_fits, forward_bytes
from dslm.model import GPT, IGNORE_INDEX
from dslm.objective import next_token
from dslm_eval.heldout import LabeledSamples

ALL = "all"


@dataclass
class Perplexity:
    loss: float
    """Mean next-token cross-entropy in nats, weighted by tokens."""
    ppl: float
    bpb: float
    """Bits per byte: the summed loss in bits over the UTF-8 bytes of the predicted tokens
    (independent of the tokenizer, so runs with different tokenizers compare)."""
    tokens: int
    bytes: int


class Totals:
    """Summed loss, tokens and bytes per label."""

    def __init__(self, labels: int):
        self.nats = torch.zeros(labels, dtype=torch.float64)
        self.tokens = torch.zeros(labels, dtype=torch.int64)
        self.bytes = torch.zeros(labels, dtype=torch.int64)

    def add(self, labels: torch.Tensor, nats: torch.Tensor, tokens: torch.Tensor, size: torch.Tensor) -> None:
        """Per-sample sums (B,) into their labels' totals."""
        self.nats.index_add_(0, labels, nats.double())
        self.tokens.index_add_(0, labels, tokens)
        self.bytes.index_add_(0, labels, size)

    def result(self, rows: torch.Tensor | slice) -> Perplexity:
        nats, tokens, size = (float(t[rows].sum()) for t in (self.nats, self.tokens, self.bytes))
        loss = nats / tokens
        return Perplexity(
            loss=loss, ppl=math.exp(loss), bpb=nats / math.log(2) / max(size, 1), tokens=int(tokens), bytes=int(size)
        )


@torch.no_grad()
def perplexity(
    model: GPT,
    samples: LabeledSamples,
    token_bytes: torch.Tensor,
    batch_size: int,
    device: torch.device,
    direction: str = "forward",
) -> dict[str, Perplexity]:
    """Results over all samples ("all") and over each language's samples, in the model's reading
    `direction` (backward: each sample reversed, as the model was trained). Only training targets
    count (labels not IGNORE_INDEX), so instruction shards score the responses. Raises DslmError,
    before any batch, when a batch cannot fit in the memory `device` has free."""
    rows = min(batch_size, len(samples))
    check_fits(
        forward_bytes(model.cfg, rows, samples.seq_len, model.wte.weight.element_size(), loss=True),
        device,
        f"a batch of {rows} samples",
        "lower --batch-size",
    )
    totals = Totals(len(samples.languages))
    for batch, labels in tqdm(DataLoader(samples, batch_size=batch_size), desc="perplexity", unit="batch", leave=False):
        batch = to_device(batch, device)
        inputs, targets = next_token(reverse(batch) if direction == "backward" else batch)
        logits = model(inputs)  # (B, T, V)
        nats = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").sum(
            1
        )  # (B,): 0 where ignored
        counted = (targets != IGNORE_INDEX).cpu()
        totals.add(labels, nats.cpu(), counted.sum(1), (token_bytes[targets.cpu().clamp(min=0)] * counted).sum(1))
    results = {ALL: totals.result(slice(None))}
    languages = {name: i for i, name in enumerate(samples.languages) if name}  # "": shards without languages
    return results | {name: totals.result(torch.tensor([i])) for name, i in languages.items()}
