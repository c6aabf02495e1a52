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

IGNORE_INDEX = -100
"""A target the loss skips: not a training target (PyTorch cross_entropy's default ignore_index)."""


# Sizes from the source model cards (DESIGN.md); `tiny` is for CPU tests and the demo.
PRESETS: dict[str, dict[str, int]] = {
    "gpt-12l-1024d": dict(n_layer=12, n_head=16, n_embd=1024, intermediate_size=4096, vocab_size=8888, block_size=1024),
    "code-33m": dict(n_layer=8, n_head=8, n_embd=512, intermediate_size=2048, vocab_size=8000, block_size=256),
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, intermediate_size=512, vocab_size=2048, block_size=128),
}
SIZES = ("n_layer", "n_head", "n_embd", "intermediate_size", "vocab_size", "block_size")
"""The fields a preset sets."""


@dataclass
class ModelConfig:
    """A GPT's architecture. Names follow GPT-2/nanoGPT (n_layer, n_head, n_embd, block_size) and
    litgpt (intermediate_size, lm_head_bias, padded_vocab_size).

    A size left at None is taken from `preset`, so `ModelConfig(preset="code-33m")` is the card's
    model and `ModelConfig(preset="code-33m", n_layer=4)` a 4-layer variant of it.
    Raises ValueError for an unknown preset, a missing size, or sizes that do not fit together."""

    preset: str | None = "tiny"
    """A name in PRESETS whose sizes fill every size field left at None; "" or None for none
    (then every size must be given)."""
    n_layer: int | None = None
    """Transformer blocks, >= 1."""
    n_head: int | None = None
    """Attention heads per block, >= 1; must divide n_embd (head size n_embd // n_head)."""
    n_embd: int | None = None
    """Width of the residual stream (embedding size), >= 1."""
    intermediate_size: int | None = None
    """Hidden width of each block's MLP, >= 1 (4 * n_embd in GPT-2 and both cards)."""
    vocab_size: int | None = None
    """Token ids the model predicts, >= 1; at least the tokenizer's vocabulary."""
    block_size: int | None = None
    """Longest sequence in tokens (the position table's rows), >= 1; at least the shards' seq_len."""
    dropout: float = 0.0
    """Dropout probability after the embeddings, attention and MLP, in [0, 1); 0 in both cards."""
    lm_head_bias: bool = True
    """A bias on the output head, as the model cards count (GPT-2 itself has none)."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head (off in both cards)."""
    vocab_multiple: int = 1
    """Round the embedding and head rows up to a multiple of this, >= 1 (128 suits GPU matmuls); the
    logits of the padded ids are cut off, so they are never predicted or sampled."""

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is not one of {', '.join(PRESETS)}")
        for name, value in PRESETS.get(self.preset or "", {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if missing := [name for name in SIZES if getattr(self, name) is None]:
            raise ValueError(f"model.{missing[0]} is not set and model.preset is empty; set it or name a preset")
        for name in (*SIZES, "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be within [0, 1)")

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of vocab_multiple: the rows of the embedding and head."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each parameter of one Block, by its name within the block."""
        C, F = self.n_embd, self.intermediate_size
        return {
            "ln_1.weight": (C,),
            "ln_1.bias": (C,),
            "attn.qkv.weight": (3 * C, C),
            "attn.qkv.bias": (3 * C,),
            "attn.proj.weight": (C, C),
            "attn.proj.bias": (C,),
            "ln_2.weight": (C,),
            "ln_2.bias": (C,),
            "mlp.fc.weight": (F, C),
            "mlp.fc.bias": (F,),
            "mlp.proj.weight": (C, F),
            "mlp.proj.bias": (C,),
        }

    def outer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each parameter outside the blocks, by name (a tied head has none of its own)."""
        C, V = self.n_embd, self.padded_vocab_size
        head = {} if self.tie_embeddings else {"lm_head.weight": (V, C)}
        return {
            "wte.weight": (V, C),
            "wpe.weight": (self.block_size, C),
            "ln_f.weight": (C,),
            "ln_f.bias": (C,),
            **head,
            **({"lm_head.bias": (V,)} if self.lm_head_bias else {}),
        }

    def num_params(self) -> int:
        """GPT(self).num_params() from the sizes alone, without building the model (nothing is
        allocated, whatever the sizes): the parameters outside the blocks plus n_layer blocks'."""

        def count(shapes: dict[str, tuple[int, ...]]) -> int:
            return sum(math.prod(shape) for shape in shapes.values())

        return count(self.outer_shapes()) + self.n_layer * count(self.block_shapes())

    def largest_layer_params(self) -> int:
        """The parameters of the largest module (the embedding, the head or an MLP layer), a tied
        head counting the embedding it shares: what ZeRO-3 gathers at once (`largest_layer_params`
        of DeepSpeed's estimate_zero3_model_states_mem_needs)."""
        tied = {"lm_head.weight": self.outer_shapes()["wte.weight"]} if self.tie_embeddings else {}
        modules: dict[str, int] = {}
        for name, shape in {**self.outer_shapes(), **tied, **self.block_shapes()}.items():
            module = name.rpartition(".")[0]
            modules[module] = modules.get(module, 0) + math.prod(shape)
        return max(modules.values())


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
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
            mask = cache.attn_mask(start, T, q.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


def causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor:
    """(T, start + T) bool: query i (at position start + i) may attend to keys 0 .. start + i.
    Built from two aranges, not tril, so that an exported graph (dslm.onnx_export) takes `start`
    as a dynamic size."""
    keys = torch.arange(start + T, device=device)
    return keys[None, :] <= torch.arange(start, start + T, device=device)[:, None]


class KVCache:
    """Keys and values of the positions decoded so far, per layer, so that each new token costs one
    model pass over itself instead of the whole sequence. Rows are sequences of the batch."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if max_len > cfg.block_size:
            raise ValueError(f"a cache of {max_len} positions is longer than model.block_size={cfg.block_size}")
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)  # (B, H, T_max, C/H)
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
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @staticmethod
    def attn_mask(start: int, T: int, device: torch.device) -> torch.Tensor | None:
        """The mask for T queries after `start` cached positions; None where SDPA's is_causal (T > 1)
        or no mask (T == 1) is right: is_causal aligns its mask top-left, right only when the chunk
        starts the sequence; a chunk after cached tokens needs the diagonal shifted by `start`."""
        return None if start == 0 or T == 1 else causal_mask(start, T, device)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (new batch size, long), repeats allowed: beam search follows its
        surviving beams, and one prompt's cache is copied to its beams."""
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh GELU is GPT-2's "gelu_new"
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=cfg.lm_head_bias)
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

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); with targets (B, T), the mean cross-entropy over
        the targets that are not IGNORE_INDEX (-100) instead (0 when all are, with zero gradients: an instruction
        batch may hold no target), or with reduction="none" (PyTorch's cross_entropy's) each
        token's, (B, T) float32, 0 at ignored targets. With a cache, idx continues the cached
        sequences (positions from cache.length on) and is added to the cache."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.block_size={self.cfg.block_size}")
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
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        if reduction == "none":
            return losses.view(B, T)
        return losses.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
