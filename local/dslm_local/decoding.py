"""How dslm decodes, without torch: the settings (GenerationConfig), when a sequence stops
(Stopper, cut_at_stop) and the sampling filters (temperature, top-k, top-p) on numpy logits.
dslm-generate (eval/generate.py, torch) and dslm-complete (ONNX Runtime) both decode by them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dslm_local.errors import DslmError

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class GenerationConfig:
    """How a prompt is decoded: the strategy, its settings, when to stop, and batching.
    temperature, top_k and top_p must stay at their defaults unless strategy is 'sample', and
    num_beams must be 1 unless it is 'beam'. Raises ValueError for a value out of its range."""

    strategy: str = "greedy"
    """'greedy' (the most likely token), 'sample' (temperature, top_k, top_p) or 'beam' (num_beams;
    dslm-generate only)."""
    max_new_tokens: int = 64
    """Tokens generated per prompt at most, >= 1 (stop tokens and strings can end it sooner). It must
    leave room for the prompt in the model's context (block_size)."""
    temperature: float = 1.0
    """sample: logits are divided by it (below 1 sharpens, above 1 flattens); > 0. Stays 1.0 for the
    other strategies."""
    top_k: int = 0
    """sample: draw only from the k most likely tokens, >= 0 (0: no limit). Stays 0 for the other
    strategies."""
    top_p: float = 1.0
    """sample: draw only from the smallest set of most likely tokens whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2019), in (0, 1] (1.0: no limit). Stays 1.0 for the other
    strategies."""
    num_beams: int = 1
    """beam: hypotheses kept per prompt, >= 1; the best by log-probability / length is returned.
    Stays 1 for the other strategies."""
    stop_tokens: tuple[int, ...] = ()
    """Token ids (non-negative ints) that end a sequence; the stop token is not part of the output.
    Empty: none. Text-level callers (dslm_eval.generate.complete, dslm-complete) set the model's end
    token (<eos> for a forward model)."""
    stop_strings: tuple[str, ...] = ()
    """Non-empty texts that end a sequence, checked on the decoded new text; the text is cut before
    the first (cut_at_stop)."""
    keep_stop_string: bool = False
    """Cut the text after the stop string instead of before it (as transformers' stop_strings leaves
    it; code metrics need the closing brace that ended a unit)."""
    seed: int = 0
    """Seeds the sampling generator, >= 0: the same prompts, model and seed give the same output."""
    batch_size: int = 16
    """Rows decoded together at most, >= 1: prompts, or for beam search max(1, batch_size // num_beams)
    prompts of num_beams rows each."""
    use_cache: bool = True
    """Keep keys and values of past positions (one model pass per token); False recomputes the whole
    sequence for every token (for checking the cache)."""

    def __post_init__(self) -> None:
        self.stop_tokens, self.stop_strings = tuple(self.stop_tokens), tuple(self.stop_strings)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens, batch_size and num_beams must be at least 1")
        if not self.temperature > 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1 (got {self.temperature}, "
                f"{self.top_k}, {self.top_p})"
            )
        if self.strategy != "sample" and (self.temperature != 1.0 or self.top_k or self.top_p != 1.0):
            raise ValueError("temperature, top_k and top_p apply only to strategy='sample'")
        if self.strategy != "beam" and self.num_beams != 1:
            raise ValueError("num_beams applies only to strategy='beam'")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be token ids (got {self.stop_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


def checked_config(**settings) -> GenerationConfig:
    """GenerationConfig(**settings) for a command: a value out of range is a DslmError (one line,
    in the config's field names) instead of a ValueError."""
    try:
        return GenerationConfig(**settings)
    except ValueError as e:
        raise DslmError(str(e)) from None


@dataclass
class Stopper:
    """Whether new tokens end a sequence: a stop token last, or a stop string in their text."""

    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    decode: Callable[[list[int]], str] | None

    def stopped(self, new: list[int]) -> bool:
        if new and new[-1] in self.stop_tokens:
            return True
        return bool(self.stop_strings) and any(s in self.decode(new) for s in self.stop_strings)

    def output(self, new: list[int]) -> list[int]:
        """The tokens returned: without a final stop token (a stop string's tokens stay)."""
        return new[:-1] if new and new[-1] in self.stop_tokens else new


def cut_at_stop(text: str, stop_strings: tuple[str, ...], keep: bool = False, backward: bool = False) -> str:
    """`text` up to the stop string that starts first in it, without it or (keep) with it. Text
    written backward (leftwards) is cut the other way: from the stop string that ends last on."""
    if backward:
        flipped = tuple(s[::-1] for s in stop_strings)
        return cut_at_stop(text[::-1], flipped, keep)[::-1]
    found = [(i, s) for s in stop_strings if (i := text.find(s)) >= 0]
    if not found:
        return text
    start, stop = min(found, key=lambda match: match[0])
    return text[: start + len(stop)] if keep else text[:start]


TOP_P_TOLERANCE = 1e-6
"""A nucleus whose probability mass is within this of top_p counts as reaching it. Probabilities
come from float32 logits, whose rounding (relative 2^-24 ~ 6e-8 per logit, times the logit's size)
moves a mass that is exactly top_p on paper, e.g. 0.5 + 0.3 for top_p 0.8, to either side of it;
no real boundary is that close. The cost is bounded: the mass of the kept nucleus falls short of
top_p by at most 1e-6, so the sampled distribution moves by at most 1e-6 in total variation."""


def sample_filter(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Logits (B, V) divided by the temperature, with -inf outside the top_k and the top_p nucleus."""
    logits = logits / np.float32(cfg.temperature)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k, None]  # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if cfg.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")  # (B, V), most likely first
        ordered = np.take_along_axis(logits, order, axis=-1)
        outside = np.empty_like(order, dtype=bool)
        np.put_along_axis(outside, order, outside_nucleus(ordered, cfg.top_p), axis=-1)
        logits = np.where(outside, -np.inf, logits)
    return logits


def outside_nucleus(ordered: np.ndarray, top_p: float) -> np.ndarray:
    """For logits (B, V) sorted in descending order, True (B, V) for the tokens past the smallest
    prefix whose probability reaches top_p, as transformers' TopPLogitsWarper does: a token is
    dropped when the more likely ones already reach it (within TOP_P_TOLERANCE); the most likely
    token always stays. The masses are summed in float64, so a large vocabulary adds no rounding."""
    probs = softmax(ordered.astype(np.float64))
    before = np.cumsum(probs, axis=-1) - probs  # (B, V): the mass of the more likely tokens
    outside = before >= top_p - TOP_P_TOLERANCE
    outside[:, 0] = False
    return outside


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf logits get probability 0."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def pick(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next tokens (B,) int64 for logits (B, V): the argmax ('greedy'), or a draw from the filtered
    distribution ('sample') with `rng`."""
    if cfg.strategy == "greedy":
        return logits.argmax(axis=-1)
    probs = softmax(sample_filter(logits, cfg).astype(np.float64))
    return np.array([rng.choice(len(row), p=row) for row in probs], dtype=np.int64)
