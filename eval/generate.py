"""Text generation with dslm's GPT: greedy, temperature / top-k / top-p sampling and beam search,
decoding one token per model pass with a KV cache, stopping at stop tokens or stop strings.

Prompts of different lengths are grouped by length and each group is decoded as one batch (of at
most `batch_size`). Left-padding would batch them all, but with learned absolute positions every
row would then need its own position offsets and a padding mask in every attention call; grouping
is exact (each prompt decodes as it would alone) and keeps the model's forward unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from dslm.data.templates import Framer, Framing, get_template, stop_token
from dslm.data.tokens import BOS_ID, EOS_ID
from dslm.errors import DslmError
from dslm.memory import check_fits, forward_bytes, kv_cache_bytes
from dslm.model import GPT, KVCache
from dslm_local.cli import counted
from dslm_local.decoding import GenerationConfig, Stopper, cut_at_stop
from dslm_local.decoding import sample_filter as filter_logits
from dslm_local.fim import FimIds


class Stepper:
    """Next-token logits for a batch of growing sequences, from a KV cache or by recomputing."""

    def __init__(self, model: GPT, prompt: torch.Tensor, max_len: int, use_cache: bool):
        self.model = model
        self.seq = prompt  # (B, T): kept only without a cache
        self.cache = (
            KVCache(model.cfg, prompt.size(0), max_len, prompt.device, model.wte.weight.dtype) if use_cache else None
        )

    def first(self) -> torch.Tensor:
        """Logits (B, V) after the prompt."""
        return self.model(self.seq, cache=self.cache)[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after appending tokens (B,)."""
        if self.cache is None:
            self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)
            return self.model(self.seq)[:, -1].float()
        return self.model(tokens[:, None], cache=self.cache)[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Continue from batch rows `rows` (long, repeats allowed)."""
        if self.cache is None:
            self.seq = self.seq.index_select(0, rows)
        else:
            self.cache.reorder(rows)


def sample_filter(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Logits (B, V) divided by the temperature, with -inf outside the top_k and the top_p nucleus:
    dslm_local.decoding.sample_filter's rules (one home for them, shared with dslm-complete), on
    the CPU; a (B, V) copy per token costs little beside the model pass that made it."""
    return torch.from_numpy(filter_logits(logits.float().cpu().numpy(), cfg)).to(logits.device)


def pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) for logits (B, V): the argmax, or a draw from the filtered distribution."""
    if cfg.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = sample_filter(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode_batch(
    model: GPT, prompt: torch.Tensor, cfg: GenerationConfig, stopper: Stopper, generator: torch.Generator
) -> list[list[int]]:
    """Greedy or sampled new tokens for prompts (B, T) of one length. Rows that stop keep being
    computed with the batch until every row has stopped; their later tokens are dropped."""
    stepper = Stepper(model, prompt, prompt.size(1) + cfg.max_new_tokens, cfg.use_cache)
    logits = stepper.first()
    new: list[list[int]] = [[] for _ in range(prompt.size(0))]
    running = set(range(prompt.size(0)))
    for step in range(cfg.max_new_tokens):
        tokens = pick(logits, cfg, generator)
        for row, token in enumerate(tokens.tolist()):
            if row in running:
                new[row].append(token)
                if stopper.stopped(new[row]):
                    running.discard(row)
        if not running or step == cfg.max_new_tokens - 1:
            break
        logits = stepper.step(tokens)
    return [stopper.output(tokens) for tokens in new]


@dataclass
class Hypothesis:
    score: float
    """Sum of the log-probabilities of the new tokens (a final stop token included)."""
    tokens: list[int]

    @property
    def normalized(self) -> float:
        return self.score / len(self.tokens)


def beam_search(model: GPT, prompt: torch.Tensor, cfg: GenerationConfig, stopper: Stopper) -> list[list[int]]:
    """Beam search over prompts (B, T) of one length: K = num_beams hypotheses per prompt, extended
    by their 2K best continuations each step (so K can go on when up to K of them stop). Returns
    each prompt's hypothesis with the best log-probability / length."""
    B, K, N = prompt.size(0), cfg.num_beams, cfg.max_new_tokens
    stepper = Stepper(model, prompt, prompt.size(1) + N, cfg.use_cache)
    logprobs = F.log_softmax(stepper.first(), dim=-1).repeat_interleave(K, dim=0)  # (B*K, V)
    stepper.reorder(torch.arange(B, device=prompt.device).repeat_interleave(K))  # each prompt's rows -> K beams
    beams = [Hypothesis(0.0 if row % K == 0 else float("-inf"), []) for row in range(B * K)]  # one live at first
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(N):
        scores = torch.tensor([h.score for h in beams], device=logprobs.device)
        top_scores, top_ids = (scores[:, None] + logprobs).view(B, -1).topk(2 * K, dim=-1)  # (B, 2K) over K*V
        rows, tokens, beams = next_beams(
            beams, top_scores.tolist(), top_ids.tolist(), logprobs.size(-1), K, stopper, finished, done
        )
        done = [done[b] or prompt_done(finished[b], beams[b * K : (b + 1) * K], N) for b in range(B)]
        if all(done) or step == N - 1:
            break
        stepper.reorder(torch.tensor(rows, device=prompt.device))
        logprobs = F.log_softmax(stepper.step(torch.tensor(tokens, device=prompt.device)), dim=-1)
    for b in range(B):
        if not done[b]:
            finished[b].extend(h for h in beams[b * K : (b + 1) * K] if h.score > float("-inf"))
    return [stopper.output(max(hyps, key=lambda h: h.normalized).tokens) for hyps in finished]


def next_beams(
    beams: list[Hypothesis],
    top_scores: list[list[float]],
    top_ids: list[list[int]],
    vocab: int,
    K: int,
    stopper: Stopper,
    finished: list[list[Hypothesis]],
    done: list[bool],
) -> tuple[list[int], list[int], list[Hypothesis]]:
    """From each prompt's 2K best continuations: stopped ones go to `finished` (unless the prompt is
    done), the best K others become the new beams. Returns, per new beam (B*K), the row it continues
    from, its new token and the beam; empty slots are dead copies (score -inf)."""
    chosen: list[tuple[int, int, Hypothesis]] = []
    for b, (scores, ids) in enumerate(zip(top_scores, top_ids)):
        kept = []
        for score, i in zip(scores, ids):
            if score == float("-inf") or len(kept) == K:
                break
            row, token = b * K + i // vocab, i % vocab
            hyp = Hypothesis(score, beams[row].tokens + [token])
            if not stopper.stopped(hyp.tokens):
                kept.append((row, token, hyp))
            elif not done[b]:
                finished[b].append(hyp)
        dead = (b * K, 0, Hypothesis(float("-inf"), beams[b * K].tokens + [0]))
        chosen += kept + [dead] * (K - len(kept))
    rows, tokens, new_beams = zip(*chosen)
    return list(rows), list(tokens), list(new_beams)


def prompt_done(finished: list[Hypothesis], beams: list[Hypothesis], max_new_tokens: int) -> bool:
    """No running beam can beat the best finished one: log-probs are <= 0, so a beam with score s
    can reach at most s / max_new_tokens."""
    if not finished:
        return False
    best = max(h.normalized for h in finished)
    return all(h.score / max_new_tokens <= best for h in beams)


def fit_to_context(prompt: list[int], max_new_tokens: int, context: int) -> list[int]:
    """The prompt's last tokens, as many as leave room for max_new_tokens: the continuation depends
    most on the nearest text, and with learned absolute positions the cache cannot slide."""
    if max_new_tokens >= context:
        raise DslmError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in model.block_size={context}")
    return prompt[-(context - max_new_tokens) :]


def batches_by_length(prompts: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts of one length, at most batch_size at a time, shortest prompts first."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@contextlib.contextmanager
def eval_mode(model: GPT) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (token ids), on the model's device, in eval mode, each ending
    at the first of cfg.stop_tokens (default: none; complete() sets the model's end token). A prompt
    longer than model.block_size - max_new_tokens keeps its last tokens. `decode` (token ids -> text)
    is needed for stop strings. Sampling draws from one generator seeded with cfg.seed, batch by
    batch in a fixed order, so the output depends on the seed, the prompts and cfg.batch_size.
    Raises DslmError, before decoding, when a batch cannot fit in memory (check_decoding_fits)."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if cfg.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    device = model.wte.weight.device
    prompts = [fit_to_context(p, cfg.max_new_tokens, model.cfg.block_size) for p in prompts]
    stopper = Stopper(frozenset(cfg.stop_tokens), cfg.stop_strings, decode)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in prompts]
    batch_size = max(1, cfg.batch_size // cfg.num_beams) if cfg.strategy == "beam" else cfg.batch_size
    check_decoding_fits(model, prompts, cfg, min(batch_size, len(prompts)))
    with eval_mode(model):
        for rows in tqdm(
            list(batches_by_length(prompts, batch_size)),
            desc="generate",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            batch = torch.tensor([prompts[i] for i in rows], device=device)
            if cfg.strategy == "beam":
                new = beam_search(model, batch, cfg, stopper)
            else:
                new = decode_batch(model, batch, cfg, stopper, generator)
            for i, tokens in zip(rows, new):
                out[i] = tokens
    return out


def check_decoding_fits(model: GPT, prompts: list[list[int]], cfg: GenerationConfig, batch: int) -> None:
    """DslmError, before decoding, when `batch` prompts (times cfg.num_beams with beam search) cannot
    fit in the memory the model's device has free: the KV cache of their whole length and the
    logits of the first pass over the longest prompt."""
    rows = batch * (cfg.num_beams if cfg.strategy == "beam" else 1)
    longest, element = max(map(len, prompts)), model.wte.weight.element_size()
    need = forward_bytes(model.cfg, rows, longest, element, loss=False)
    if cfg.use_cache:
        need += kv_cache_bytes(model.cfg, rows, longest + cfg.max_new_tokens, element)
    beams = f" ({counted(batch, 'prompt')} x {counted(cfg.num_beams, 'beam')})" if cfg.strategy == "beam" else ""
    check_fits(
        need,
        model.wte.weight.device,
        f"decoding {rows:,} sequences at once{beams}",
        "lower --num-beams or --batch-size",
    )


class PromptFraming:
    """How prompts go into a model of one Framing, where its generation stops, and how its new
    tokens become text. Forward: a prompt is a text's start (after <bos>); the model writes on
    and stops at <eos>. Backward: a prompt is a text's end (before <eos>), fed reversed in token
    order; the model writes what came before, leftwards, and stops at <bos>; the new text is
    turned back. With a template, a prompt fills the template's given block and the model writes
    the target block (dslm.data.templates.Framer). A model trained to fill in the middle also
    takes a prompt at a cursor (cursor_ids) and writes the middle, ending it with <eos>."""

    def __init__(self, tokenizer: Tokenizer, framing: Framing):
        self.tok, self.framing, self.backward = tokenizer, framing, framing.direction == "backward"
        self.direction = framing.direction
        self.framer = Framer(get_template(framing.template), tokenizer) if framing.template else None
        self.fim = FimIds.of(tokenizer) if framing.fim and not framing.template and not self.backward else None
        """The FIM tokens of a forward model of plain text trained to fill in the middle, else None."""

    def ids(self, prompt: str) -> list[int]:
        """The model's input for `prompt`, in its reading order."""
        if self.framer is not None:
            return self.framer.prompt(prompt, self.direction)
        ids = self.tok.encode(prompt).ids
        return [EOS_ID, *reversed(ids)] if self.backward else [BOS_ID, *ids]

    def cursor_ids(self, prefix: str, suffix: str, room: int) -> list[int]:
        """The PSM prompt at a cursor between `prefix` and `suffix` (FimIds.cursor_prompt, as
        dslm-complete feeds it), at most `room` tokens. Raises ValueError for a model without FIM."""
        if self.fim is None:
            raise ValueError("a prompt at a cursor needs a forward model trained to fill in the middle")
        return self.fim.cursor_prompt(BOS_ID, self.tok.encode(prefix).ids, self.tok.encode(suffix).ids, room)

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return (stop_token(self.framing),)

    def decode(self, new: list[int]) -> str:
        """New ids (in the model's reading order) as text in the page's order."""
        return self.tok.decode(new[::-1] if self.backward else new)

    def text(self, new: list[int]) -> str:
        """What the model wrote: the new text, or with a template the target's text."""
        return self.framer.reply(new, self.direction) if self.framer is not None else self.decode(new)


def check_whole(prompts: list[list[int]], template: str, max_new_tokens: int, context: int) -> None:
    """Prompts framed by a template are never cut to fit the context (generate cuts a plain prompt
    to its last tokens): the cut would take the template's opening markers and the question, as
    training never cuts an example (`dslm-shard sft` drops one that does not fit). Raises DslmError
    naming the first that leaves no room for `max_new_tokens` in `context` tokens."""
    room = context - max_new_tokens
    for i, ids in enumerate(prompts):
        if len(ids) > room:
            which = f"prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
            raise DslmError(
                f"{which} is {len(ids)} tokens in the {template} template; model.block_size={context} "
                f"leaves room for {max(room, 0)} beside {max_new_tokens} new tokens: shorten it or ask "
                f"for fewer new tokens (--max-new-tokens; tokens= in --interactive): a templated prompt "
                f"is never cut"
            )


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    cfg: GenerationConfig,
    progress: bool = False,
    framing: Framing = Framing(),
    suffix: str | None = None,
) -> list[str]:
    """The new text for each prompt, framed as the model reads (PromptFraming); cfg.stop_tokens
    is replaced by the framing's end token. Forward, the text follows its prompt; backward, it
    precedes it; with a template, it is the reply; with `suffix` (the code after a cursor, for
    every prompt; a model trained to fill in the middle only, else ValueError), it is the middle
    between the prompt and the suffix. It is cut at the first stop string (cfg.keep_stop_string),
    the first in the model's writing order. A plain prompt too long for the context keeps its last
    tokens (at a cursor: those nearest the cursor, on both sides); a templated one is a DslmError
    (check_whole)."""
    frame = PromptFraming(tokenizer, framing)
    cfg = replace(cfg, stop_tokens=frame.stop_tokens)
    if suffix is None:
        ids = [frame.ids(p) for p in prompts]
    else:
        ids = [frame.cursor_ids(p, suffix, model.cfg.block_size - cfg.max_new_tokens) for p in prompts]
    if framing.template:
        check_whole(ids, framing.template, cfg.max_new_tokens, model.cfg.block_size)
    new = generate(model, ids, cfg, decode=frame.decode, progress=progress)
    return [cut_at_stop(frame.text(tokens), cfg.stop_strings, cfg.keep_stop_string, frame.backward) for tokens in new]
