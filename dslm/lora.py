"""Low-rank adapters (LoRA, Hu et al. 2021) on the GPT's own nn.Linear layers, through peft.

`add_adapters` wraps each targeted layer in place, so that it computes W x + b + (alpha / rank) B A x
with A (rank, in) and B (out, rank); B starts at zero, so the adapted model starts as the model.
Only A and B train. The GPT keeps its class and its forward(idx, targets), so DeepSpeed's engine
and the loop see no difference, and its state dict holds both, under peft's names:
`blocks.0.attn.qkv.base_layer.weight` (W), `blocks.0.attn.qkv.lora_A.default.weight` (A), ...
`merge_lora_weights` folds the adapters back into W under the plain names, so eval, generation
and the HF export read a plain GPT and need no peft.

Torch and peft only; peft (which imports transformers, seconds) is imported only to add adapters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dslm.compat import require
from dslm.errors import DslmError

ADAPTER = "default"
"""peft's name for a layer's one adapter, in its parameters' names."""
BASE = ".base_layer."
"""What peft puts between a wrapped layer's name and its own parameters' names."""


@dataclass
class LoraConfig:
    """Low-rank adapters, the `train.lora.*` keys (`train.lora.rank=8`).
    Raises ValueError (naming the field) for a value out of its range."""

    rank: int = 0
    """Rank of each adapter, within 0..model.n_embd (an adapter's update B A has rank at most
    min(in, out) of its layer, n_embd or less in a GPT; RunConfig checks it); 0 (the default) adds
    none and the model itself trains. Above 0,
    every weight of the model is frozen and only the adapters train (rank * (in + out) weights
    per targeted layer); train.freeze then freezes adapters too, by their names as peft gives
    them (`blocks.0.*`, `*.lora_A.*`)."""
    alpha: float = 16.0
    """LoRA's alpha, > 0: an adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training, within [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc"])
    """The nn.Linear layers that get an adapter, each by its name or a suffix of it, as peft
    matches a list: "proj" is both blocks.N.attn.proj and blocks.N.mlp.proj, "attn.proj" only the
    former. The default is every attention and MLP layer; the output head ("lm_head") is left out.
    A name that matches no nn.Linear layer, or matches another kind of module, is an error."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank={self.rank} must not be negative (0 turns adapters off)")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"train.lora.alpha={self.alpha} must be positive and finite")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"train.lora.dropout={self.dropout} must be within [0, 1)")
        if not all(isinstance(name, str) for name in self.target_modules):
            raise ValueError(
                f"train.lora.target_modules={self.target_modules} must be a list of layer names, e.g. [qkv,proj,fc]"
            )
        if self.rank and not self.target_modules:
            raise ValueError(
                "train.lora.target_modules is empty; name the layers that get adapters, e.g. [qkv,proj,fc]"
            )

    @property
    def scale(self) -> float:
        """What an adapter's B A is multiplied by (peft's `scaling`)."""
        return self.alpha / self.rank


def matches(name: str, target: str) -> bool:
    """Whether module `name` is what `target` names, by peft's rule for a list of targets."""
    return name == target or name.endswith(f".{target}")


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Raises DslmError (one line) for a target that matches no layer, matches a module that is not
    nn.Linear, or matches a layer whose weight is tied to another's (a merged adapter would untie
    them)."""
    modules = dict(model.named_modules())
    linears = sorted({name.rpartition(".")[2] for name, m in modules.items() if isinstance(m, nn.Linear)})
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for target in targets:
        found = [name for name in modules if matches(name, target)]
        if not found:
            raise DslmError(
                f"train.lora.target_modules: {target!r} matches no layer (the nn.Linear layers are "
                f"{', '.join(linears)})"
            )
        for name in found:
            if not isinstance(module := modules[name], nn.Linear):
                raise DslmError(
                    f"train.lora.target_modules: {target!r} matches {name}, a {type(module).__name__}; "
                    f"adapters go on nn.Linear layers ({', '.join(linears)})"
                )
            if uses[id(module.weight)] > 1:
                raise DslmError(
                    f"train.lora.target_modules: {target!r} matches {name}, whose weight is tied to "
                    f"another layer's (model.tie_embeddings); leave it out"
                )


def is_adapter(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter."""
    return ".lora_A." in name or ".lora_B." in name


def add_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """With cfg.rank > 0, wrap the layers cfg.target_modules names in peft's LoRA layers (in place:
    `model` keeps its class and forward) and freeze every parameter but the adapters'. Load the
    model's own weights first: they go into the wrapped layers. Raises DslmError as check_targets."""
    if not cfg.rank:
        return
    check_targets(model, cfg.target_modules)
    import peft

    peft.inject_adapter_in_model(
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
        ),
        model,
        adapter_name=ADAPTER,
    )
    layers = [m for m in model.modules() if hasattr(m, "base_layer")]
    # merge_lora_weights reads the adapters by these names and scales them so
    require(
        "peft",
        f"a LoRA layer holds base_layer (nn.Linear), lora_A[{ADAPTER!r}], lora_B[{ADAPTER!r}] and "
        f"scaling[{ADAPTER!r}] = alpha / r",
        bool(layers)
        and all(
            isinstance(m.base_layer, nn.Linear)
            and ADAPTER in m.lora_A
            and ADAPTER in m.lora_B
            and m.scaling.get(ADAPTER) == cfg.scale
            for m in layers
        ),
    )
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def merge_lora_weights(weights: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted one's (`weights`, as add_adapters' model names
    them): each adapted layer's weight becomes W + scale * B @ A, under the layer's own names; the
    adapters are dropped. `weights` itself is returned when cfg.rank is 0."""
    if not cfg.rank:
        return weights
    merged = {}
    for name, tensor in weights.items():
        if is_adapter(name):
            continue
        layer, base, kind = name.partition(BASE)
        if base and kind == "weight":
            a, b = (weights[f"{layer}.lora_{x}.{ADAPTER}.weight"].float() for x in "AB")
            tensor = tensor.float() + cfg.scale * (b @ a)  # (out, rank) @ (rank, in)
        merged[f"{layer}.{kind}" if base else name] = tensor
    return merged
