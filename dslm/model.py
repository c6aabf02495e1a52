"""GPT-2 architecture as single-device code: no ranks, no DeepSpeed, only torch.

Pre-LayerNorm blocks, GELU (tanh) MLP, learned absolute positions, biases in every Linear layer
(the model cards count one on the output head too), GPT-2 initialisation. A KVCache lets decoding
run one token per model pass (eval/generate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    preset: str = ""
    """Name in PRESETS whose sizes fill every field not set explicitly ('' = use the fields)."""
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    vocab_size: int = 2048
    context: int = 128
    """Longest sequence the position table covers."""
    dropout: float = 0.0
    head_bias: bool = True
    """A bias on the output head, as the model cards count (GPT-2 itself has none)."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head (off in both cards)."""
    vocab_multiple: int = 1
    """Round the embedding and head rows up to a multiple of this (128 suits GPU matmuls); the
    logits of the padded ids are cut off, so they are never predicted or sampled."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if min(self.n_layer, self.n_head, self.d_model, self.d_ff, self.vocab_size, self.context,
               self.vocab_multiple) < 1:
            raise ValueError("model sizes (n_layer, n_head, d_model, d_ff, vocab_size, context, vocab_multiple) "
                             "must be positive")

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


# Sizes from the source model cards (DESIGN.md); `tiny` is for CPU tests and the demo.
PRESETS: dict[str, dict[str, int]] = {
    "gpt-12l-1024d": dict(n_layer=12, n_head=16, d_model=1024, d_ff=4096, vocab_size=8888, context=1024),
    "code-33m": dict(n_layer=8, n_head=8, d_model=512, d_ff=2048, vocab_size=8000, context=256),
    "tiny": dict(n_layer=2, n_head=4, d_model=128, d_ff=512, vocab_size=2048, context=128),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start = cache.length
            k, v = cache.extend(layer, k, v)  # (B, H, start + T, C/H)
            # is_causal aligns its mask top-left, right only when the chunk starts the sequence; a
            # chunk after cached tokens needs the diagonal shifted by `start`; one token sees every key.
            mask = None if start == 0 or T == 1 else causal_mask(start, T, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=start == 0 and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


def causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor:
    """(T, start + T) bool: query i (at position start + i) may attend to keys 0 .. start + i."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class KVCache:
    """Keys and values of the positions decoded so far, per layer, so that each new token costs one
    model pass over itself instead of the whole sequence. Rows are sequences of the batch."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if max_len > cfg.context:
            raise ValueError(f"a cache of {max_len} positions is longer than model.context={cfg.context}")
        shape = (batch, cfg.n_head, max_len, cfg.d_model // cfg.n_head)  # (B, H, T_max, C/H)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        """Positions filled; GPT.forward advances it after all layers have extended."""

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's k, v (B, H, T, C/H) at positions length .. length+T-1 of `layer`; return the
        keys and values of all positions so far, (B, H, length + T, C/H) views."""
        end = self.length + k.size(2)
        if end > self.keys[layer].size(2):
            raise ValueError(f"the cache holds {self.keys[layer].size(2)} positions; {end} needed")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (new batch size, long), repeats allowed: beam search follows its
        surviving beams, and one prompt's cache is copied to its beams."""
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh GELU is GPT-2's "gelu_new"
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=cfg.head_bias)
        self.activation_checkpointing = False
        """Training option: recompute each block in the backward pass instead of keeping its activations."""
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); with targets (B, T), the mean cross-entropy instead.
        With a cache, idx continues the cached sequences (positions from cache.length on) and is
        added to the cache."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.context:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.context={self.cfg.context}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cache, i)
            elif self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))[..., : self.cfg.vocab_size]  # (B, T, V): padded ids cut off
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
