"""fim_exact_match: single-line infilling on held-out documents, as SantaCoder's single-line
infilling benchmark (Allal et al. 2023, "SantaCoder: don't reach for the stars!", arXiv:2301.03988,
section 6.1, after InCoder's: Fried et al. 2022, arXiv:2204.05999).

In the held-out documents of each language, sampled non-empty lines are masked one at a time; the
model gets the text before the line (prefix) and after it (suffix, from the line's break on) in the
PSM layout (dslm_local.fim) and writes the middle greedily until the end of the line, <eos> or a
FIM token. The line is scored with surrounding whitespace stripped, as the bigcode evaluation
harness scores SantaCoder's FIM tasks: exact match, and edit similarity (CodeXGLUE's ratio,
dslm_eval.code_tasks.edit_similarity). Results are per language and over all tasks ("all").

The model comes in as an `Infill` callable, so the task runs and is tested without one;
`torch_infill` makes one of a model trained with FIM (`dslm-shard build --fim-rate`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from tokenizers import Tokenizer
from tqdm import tqdm

from dslm.data.tokens import BOS_ID, EOS_ID
from dslm.errors import DslmError
from dslm.model import GPT
from dslm_eval.code_tasks import (
    EDIT_SIMILARITY,
    documents_of,
    edit_similarity,
    line_scores,
    line_starts,
    require_positive,
)
from dslm_eval.generate import generate
from dslm_eval.perplexity import ALL
from dslm_local.decoding import GenerationConfig, cut_at_stop
from dslm_local.fim import FimIds, fit_around


class Infill(Protocol):
    """The model side: greedy middles for a batch of (prefix, suffix) pairs.

    Returns one string per pair, in order: the generated middle only. Text from its first line
    break on is ignored, so the model may stop there or later, or after `max_new_tokens` tokens.
    """

    def __call__(self, prefixes: list[str], suffixes: list[str], max_new_tokens: int) -> list[str]: ...


@dataclass
class InfillingConfig:
    """Settings of fim_exact_match (`run_fim_exact_match`). Raises DslmError for a value out of its
    range. dslm-eval (eval/cli.py) caps max_new_tokens at half of model.block_size."""

    samples_per_language: int = 200
    """Masked lines per language, >= 1 (fewer where a language has fewer non-empty lines)."""
    seed: int = 0
    """Seeds which lines are masked, any integer: the same documents and seed give the same tasks."""
    context_chars: int = 4096
    """Characters kept on each side of the line, >= 1, before the model's own fit to its window
    (this bounds the text it has to tokenize)."""
    max_new_tokens: int = 64
    """Tokens generated per line at most, >= 1."""
    batch_size: int = 16
    """Pairs per `Infill` call, >= 1."""

    def __post_init__(self) -> None:
        require_positive(self, "samples_per_language", "context_chars", "max_new_tokens", "batch_size")


@dataclass(frozen=True)
class InfillTask:
    language: str
    prefix: str
    """The text before the line (within context_chars)."""
    target: str
    """The masked line, without its line break."""
    suffix: str
    """The text after the line, from its line break on (within context_chars)."""
    doc: int
    line: int
    """Where the line is: document index in its language, 0-based line."""


def build_infilling_tasks(docs: Mapping[str, Sequence[str]], cfg: InfillingConfig) -> list[InfillTask]:
    """Up to samples_per_language non-empty lines per language, drawn with cfg.seed, in document order."""
    tasks = []
    for language, texts in documents_of(docs).items():
        candidates = [(d, i) for d, text in enumerate(texts) for i, line in enumerate(text.split("\n")) if line.strip()]
        rng = random.Random(f"fim_exact_match/{cfg.seed}/{language}")
        chosen = sorted(rng.sample(candidates, min(cfg.samples_per_language, len(candidates))))
        for d, group in itertools.groupby(chosen, key=lambda c: c[0]):
            text = texts[d]
            starts, lines = line_starts(text), text.split("\n")
            for _, i in group:
                end = starts[i] + len(lines[i])
                prefix = text[max(0, starts[i] - cfg.context_chars) : starts[i]]
                tasks.append(InfillTask(language, prefix, lines[i], text[end : end + cfg.context_chars], d, i))
    return tasks


def score_infilling(tasks: Sequence[InfillTask], infill: Infill, cfg: InfillingConfig) -> dict:
    middles = []
    with tqdm(total=len(tasks), desc="fim exact match", unit="line") as bar:
        for start in range(0, len(tasks), cfg.batch_size):
            batch = tasks[start : start + cfg.batch_size]
            texts = infill([t.prefix for t in batch], [t.suffix for t in batch], cfg.max_new_tokens)
            if len(texts) != len(batch):
                raise DslmError(f"the infiller returned {len(texts)} texts for {len(batch)} pairs")
            middles += texts
            bar.update(len(batch))
    scores: dict[str, list[tuple[bool, float]]] = {}
    for task, middle in zip(tasks, middles):
        predicted, target = middle.split("\n", 1)[0].strip(), task.target.strip()
        score = (predicted == target, edit_similarity(predicted, target))
        scores.setdefault(task.language, []).append(score)
        scores.setdefault(ALL, []).append(score)
    return {
        "settings": {
            **asdict(cfg),
            "layout": "PSM",
            "compare": f"lines stripped of surrounding whitespace; edit similarity = {EDIT_SIMILARITY}",
        },
        "languages": line_scores(dict(sorted(scores.items(), key=lambda item: item[0] == ALL))),
    }


def run_fim_exact_match(
    docs: Mapping[str, Sequence[str]], infill: Infill, cfg: InfillingConfig = InfillingConfig()
) -> dict:
    """Exact match and edit similarity of infilled lines: {"settings": {...}, "languages":
    {language: {"n", "exact_match", "edit_similarity"}}}, "all" last (over every task); a language
    without lines is left out, and "all" too when none has any."""
    return score_infilling(build_infilling_tasks(docs, cfg), infill, cfg)


def fim_prompt(fim: FimIds, before: list[int], after: list[int], room: int) -> list[int]:
    """`<bos> <fim_prefix> before <fim_suffix> after <fim_middle>` (PSM, as training lays a
    document out between <bos> and <eos>), keeping the `room` tokens of before and after nearest
    the line (dslm_local.fim.fit_around)."""
    before, after = fit_around(before, after, room)
    return [BOS_ID, *fim.psm(before, after, [])]


def torch_infill(model: GPT, tokenizer: Tokenizer, batch_size: int) -> Infill:
    """An `Infill` of a model trained with FIM: greedy PSM middles, ending at a line break, <eos> or
    a FIM token. Raises DslmError when the tokenizer lacks the FIM tokens."""
    fim = FimIds.of(tokenizer)
    if fim is None:
        raise DslmError("fim_exact_match needs the FIM tokens, and the model's tokenizer has none")

    def infill(prefixes: list[str], suffixes: list[str], max_new_tokens: int) -> list[str]:
        room = model.cfg.block_size - max_new_tokens - 4  # <bos> and three FIM tokens
        if room < 2:
            raise DslmError(f"model.block_size={model.cfg.block_size} leaves no room for a prefix and a suffix")
        prompts = [
            fim_prompt(fim, tokenizer.encode(p).ids, tokenizer.encode(s).ids, room) for p, s in zip(prefixes, suffixes)
        ]
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            stop_tokens=(EOS_ID, fim.prefix, fim.middle, fim.suffix, fim.pad),
            stop_strings=("\n",),
            batch_size=batch_size,
        )
        new = generate(model, prompts, cfg, decode=tokenizer.decode)
        return [cut_at_stop(tokenizer.decode(ids), ("\n",)) for ids in new]

    return infill
