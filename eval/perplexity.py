"""Token-weighted perplexity of a model on a split of tokenized shards."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dslm.data.loader import split_batch
from dslm.model import GPT


@dataclass
class Perplexity:
    loss: float
    """Mean next-token cross-entropy in nats, weighted by tokens."""
    ppl: float
    tokens: int


@torch.no_grad()
def perplexity(model: GPT, samples: Dataset, batch_size: int, device: torch.device) -> Perplexity:
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(DataLoader(samples, batch_size=batch_size), desc="perplexity", unit="batch"):
        inputs, targets = split_batch(batch, device)
        logits = model(inputs)  # (B, T, V)
        total_loss += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        total_tokens += targets.numel()
    loss = total_loss / total_tokens
    return Perplexity(loss=loss, ppl=math.exp(loss), tokens=total_tokens)
