"""The FIM transformation of a training document (Bavarian et al. 2022, "Efficient Training of
Language Models to Fill in the Middle", arXiv:2207.14255, section 3 and appendix E's settings;
the layouts and tokens are dslm_local.fim's): with probability `rate` the document's text is cut
at two character positions drawn uniformly, into prefix, middle and suffix; each piece is encoded
on its own, and laid out as SPM with probability `spm_rate`, else PSM. The rest stay as they are.

`dslm-shard build --fim-rate R` applies it to the train split when it tokenizes, so a shard holds
the transformed documents: the cut of a document is a function of its text, the build's `seed`
and which of its copies it is (each copy that a source weight above 1 writes has its own, so
repeats teach other cuts), never of the worker, task or world size that writes or reads it, so a
resumed run reads the same. Val documents stay whole, for eval."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dslm.errors import DslmError
from dslm_local.fim import FimIds


@dataclass(frozen=True)
class FimConfig:
    """FIM settings of a shard build; the manifest records them."""

    rate: float = 0.0
    """Share of train documents transformed, in [0, 1]; 0 is no FIM. The paper's recommended
    rate, and SantaCoder's and StarCoder's, is 0.5."""
    spm_rate: float = 0.5
    """Share of the transformed documents laid out as SPM (the rest PSM), in [0, 1]; the paper
    trains both, half and half (its "joint" mode)."""
    seed: int = 0
    """Seeds each document's draws, with its text's digest."""

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DslmError(f"FIM {name.replace('_', ' ')} {getattr(self, name)} must be within 0..1")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


def fim_record(cfg: FimConfig) -> dict:
    """What a manifest records of `cfg` (Manifest.fim): its fields, or {} without FIM."""
    return dataclasses.asdict(cfg) if cfg.enabled else {}


def check_fim_tokens(cfg: FimConfig, tokenizer: Tokenizer, path: Path) -> None:
    """DslmError when FIM is asked for and the tokenizer at `path` lacks the FIM tokens."""
    if cfg.enabled and FimIds.of(tokenizer) is None:
        raise DslmError(
            f"--fim-rate {cfg.rate} needs the FIM tokens, and {path} has none: train a tokenizer with "
            f"`dslm-shard tokenizer --fim` (shards of the old one need a rebuild with it)"
        )


@dataclass(frozen=True)
class FimCut:
    """Where one document is cut, and in which layout."""

    start: int
    """The middle's first character."""
    end: int
    """One past the middle's last character (start <= end)."""
    spm: bool


def fim_cut(text: str, cfg: FimConfig, copy: int = 0) -> FimCut | None:
    """The cut of copy `copy` of `text` (None: it stays whole), drawn from a generator seeded by
    cfg.seed, `copy` and sha256(text): the same for the same copy of a document wherever it is
    built, and its own for each copy that a source weight above 1 writes."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    rng = np.random.default_rng([cfg.seed, copy, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])
    if rng.random() >= cfg.rate:
        return None
    start, end = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return FimCut(start, end, bool(rng.random() < cfg.spm_rate))


def fim_pieces(text: str, cut: FimCut | None) -> list[str]:
    """What is encoded of `text`: itself, or its prefix, middle and suffix, each on its own."""
    if cut is None:
        return [text]
    return [text[: cut.start], text[cut.start : cut.end], text[cut.end :]]


def fim_layout(ids: FimIds | None, cut: FimCut | None, encoded: list[list[int]]) -> list[int]:
    """The tokens of a document from the encodings of its fim_pieces, in the cut's layout."""
    if cut is None:
        return encoded[0]
    prefix, middle, suffix = encoded
    return ids.spm(prefix, suffix, middle) if cut.spm else ids.psm(prefix, suffix, middle)
