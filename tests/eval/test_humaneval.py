"""HumanEval: the pass@k estimator, programs run against their tests in the sandbox, and bits per
byte of the canonical solutions."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from dslm.data.tokens import BOS_ID
from dslm.errors import DslmError
from dslm.metrics import read_scalars
from dslm.model import ModelConfig
from dslm_eval import checkers, cli
from dslm_eval.checkers import CheckerLimits, CheckResult
from dslm_eval.cli import main
from dslm_eval.humaneval import (
    STOP_SEQUENCES,
    PassAtKConfig,
    failure,
    humaneval_bpb,
    humaneval_problems,
    pass_at_k,
    pieces_nats,
    run_pass_at_k,
    scored_pieces,
    truncate,
)
from dslm_eval.load import load_for_eval
from tests.conftest import trained_looking_model

LIMITS = CheckerLimits(timeout_s=20, memory_mb=1024)  # generous time: CI machines are shared


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (10, 0, 1), (10, 0, 5), (10, 8, 5), (10, 10, 3)])
def test_the_estimator_equals_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_the_estimator_on_known_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0, "n - c < k: every draw of k holds a correct sample"
    assert pass_at_k(200, 2, 100) == pytest.approx(closed_form(200, 2, 100))  # large n stays exact


def test_completions_stop_where_humaneval_completions_stop():
    body = "    return x + 1\n"
    for stop in STOP_SEQUENCES:
        assert truncate(body + stop + " more") == body
    assert truncate("    if x:\n        return 1\n") == "    if x:\n        return 1\n", "indented lines go on"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return humaneval_problems()


def answers(problems: list[dict], answer) -> callable:
    """A completer that answers each HumanEval prompt with answer(problem)."""
    by_prompt = {p["prompt"]: p for p in problems}

    def complete(prompts: list[str], stop: list[str], max_new_tokens: int) -> list[str]:
        return [answer(by_prompt[prompt]) for prompt in prompts]

    return complete


def test_canonical_solutions_pass_every_problem_and_empty_completions_none(problems):
    assert len(problems) == 164
    start = time.monotonic()
    solved = run_pass_at_k(problems, answers(problems, lambda p: p["canonical_solution"]), PassAtKConfig(), LIMITS)
    took = time.monotonic() - start
    assert (solved["problems"], solved["pass@1"], solved["failures"]) == (164, 1.0, {}), solved["failures"]
    print(f"164 canonical solutions checked in {took:.1f} s")

    empty = run_pass_at_k(problems[:20], answers(problems, lambda p: ""), PassAtKConfig(), LIMITS)
    assert empty["pass@1"] == 0.0 and sum(empty["failures"].values()) == 20


def test_pass_at_k_counts_correct_samples_per_problem(problems):
    """With 4 samples, of which the completer gets the first 2 of each problem right."""
    calls = {}

    def complete(prompts, stop, max_new_tokens):
        out = []
        for prompt in prompts:
            calls[prompt] = calls.get(prompt, 0) + 1
            right = calls[prompt] <= 2
            out.append(next(p["canonical_solution"] for p in problems[:3] if p["prompt"] == prompt) if right else "")
        return out

    cfg = PassAtKConfig(samples=4, k=(1, 2, 4), batch_size=3)
    result = run_pass_at_k(problems[:3], complete, cfg, LIMITS)
    assert result["pass@1"] == pytest.approx(0.5)
    assert result["pass@2"] == pytest.approx(closed_form(4, 2, 2))
    assert result["pass@4"] == 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(samples=0), "samples must be >= 1"),
        (dict(samples=1, k=(5,)), "k=5"),
        (dict(samples=4, k=()), "at least one k"),
        (dict(samples=4, temperature=0), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_pass_at_k_config_rejects_bad_values(settings, message):
    with pytest.raises(DslmError, match=message):
        PassAtKConfig(**settings)


class CharTokenizer:
    """A tokenizer of one token per character (ids 8 + code point % 200): the split between
    prompt and solution is exactly where the text splits."""

    def encode(self, text: str):
        return type("Encoding", (), {"ids": [8 + ord(ch) % 200 for ch in text]})()


def test_bits_per_byte_of_a_solution_is_its_tokens_minus_log2_p_over_its_bytes(problems):
    model = trained_looking_model(ModelConfig(preset="tiny", vocab_size=256, block_size=1024), seed=1)
    tokenizer, problem = CharTokenizer(), problems[0]
    prompt = tokenizer.encode(problem["prompt"]).ids
    solution = tokenizer.encode(problem["canonical_solution"]).ids
    ids = torch.tensor([[BOS_ID, *prompt, *solution]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    targets = ids[0, 1:]
    by_hand = -logp[torch.arange(len(targets)), targets][-len(solution) :].sum().item() / math.log(2)

    result = humaneval_bpb(model, tokenizer, problems[:3], batch_size=2)
    assert result["problems"] == 3 and math.isfinite(result["bpb"]) and result["bpb"] > 0
    assert result["per_problem"][0] == pytest.approx(by_hand / len(problem["canonical_solution"].encode()), rel=1e-5)
    assert result["bpb"] == pytest.approx(sum(result["per_problem"]) / 3)


def test_a_solution_longer_than_the_window_is_scored_token_by_token_once():
    """Each solution token is scored once, after at least half a window of what precedes it (or
    all of it), in pieces no longer than the window."""
    ids, first, window = list(range(110)), 41, 32
    pieces = scored_pieces(ids, first, window)
    scored = [t for tokens, n in pieces for t in tokens[-n:]]
    assert scored == ids[first:]
    for tokens, n in pieces:
        assert len(tokens) - 1 <= window and (len(tokens) - 1 - n >= window // 2 or tokens[0] == ids[0])
    assert scored_pieces(ids, first, 200) == [(ids, 110 - first)], "a window that holds it all: one piece"


def test_pieces_padded_into_a_batch_score_as_they_do_alone():
    model = trained_looking_model(ModelConfig(preset="tiny", vocab_size=256, block_size=32), seed=2)
    pieces = scored_pieces([BOS_ID, *range(8, 90)], 30, 32) + [([BOS_ID, 9, 10], 1), ([BOS_ID, *range(40, 60)], 7)]
    alone = [pieces_nats(model, [piece], batch_size=1)[0] for piece in pieces]
    assert pieces_nats(model, pieces, batch_size=3) == pytest.approx(alone, rel=1e-5)
    assert all(math.isfinite(n) and n > 0 for n in alone)


# ------------------------------------------------------------------------------ dslm-eval


def test_dslm_eval_records_pass_at_k_and_bpb_where_the_other_metrics_go(
    base_run, problems, tmp_path, capsys, monkeypatch
):
    """On HumanEval's first 20 problems (all 164 take minutes on a CPU)."""
    monkeypatch.setattr(cli, "humaneval_problems", lambda: problems[:20])
    run = tmp_path / "base"
    shutil.copytree(base_run, run)
    main([str(run), "--metrics", "bpb_humaneval,pass_at_k", "--batch-size", "32"])
    result = json.loads((run / "eval" / "step5.json").read_text())
    assert result["pass_at_k"]["problems"] == 20 and 0 <= result["pass_at_k"]["pass@1"] <= 1
    assert result["pass_at_k"]["settings"]["max_new_tokens"] == 64, "half of the tiny preset's window"
    assert result["bpb_humaneval"]["problems"] == 20 and math.isfinite(result["bpb_humaneval"]["bpb"])
    assert result["bpb_humaneval"]["bpb"] > 0
    for tag in ("eval/humaneval/pass@1", "eval/humaneval/bpb"):
        assert [s for s, _ in read_scalars(run / "tb", tag)] == [5], tag
    table = capsys.readouterr().out.splitlines()
    assert "pass@k" in table[0] and "bpb" in table[0] and "exact" not in table[0], "only what was measured"
    assert table[1].split()[:2] == ["humaneval", f"{result['bpb_humaneval']['bpb']:.4f}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--metrics", "perplexity,pass@k"],
            "--metrics: pass@k; choose from perplexity, exact_match, compile_success, "
            "pass_at_k, bpb_humaneval, fim_exact_match",
        ),
        (["--metrics", "pass_at_k", "--pass-k", "1,ten"], "--pass-k 1,ten: give comma-separated whole numbers"),
        (["--metrics", "pass_at_k", "--pass-k-samples", "5", "--pass-k", "1,10"], "k=10 must be within 1..5"),
    ],
)
def test_bad_pass_at_k_settings_are_one_line(base_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(base_run), *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if "dslm-eval: error" in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_sampled_completions_differ_between_calls_and_repeat_between_runs(base_run):
    loaded = load_for_eval(base_run)
    sampling = PassAtKConfig(samples=4, k=(1, 4), temperature=1.0, seed=-3)

    def two_calls() -> list[list[str]]:
        complete = cli.completer(loaded, 4, sampling)
        return [complete(["def f(x):\n"] * 2, ["\ndef"], 8) for _ in range(2)]

    first = two_calls()
    assert first == two_calls(), "the seed fixes the samples"
    assert first[0][0] != first[0][1] and first[0] != first[1], "rows and calls draw apart"


def test_a_failure_is_named_by_the_exception_that_ended_the_program_or_its_limit():
    def failed(reason: str, output: str) -> str:
        return failure(CheckResult(ok=False, reason=reason, output=output))

    traceback = 'Traceback (most recent call last):\n  File "program.py", line 9, in <module>\n'
    assert failed("exit 1", traceback + "AssertionError\n") == "AssertionError"
    assert failed("exit 1", "12\n" + traceback + "NameError: name 'x' is not defined\n") == "NameError"
    assert failed("exit 3", "printed: words\n") == "exit 3", "no traceback: the exit status"
    assert failed("exit 1", "  File \"program.py\", line 3\n    x = (\n    ^\nSyntaxError: '(' was never closed\n") == (
        "SyntaxError"
    ), "a compile error has no traceback"
    assert failed("timeout", traceback) == "timeout"


def test_pass_at_k_on_a_machine_that_refuses_the_sandbox_asks_the_model_nothing(problems, monkeypatch):
    refused = "import sys\nprint('sandbox unavailable: unshare: Operation not permitted')\nsys.exit(125)\n"
    monkeypatch.setattr(checkers, "_ISOLATE_THEN_EXEC", refused)

    def complete(prompts, stop, max_new_tokens):
        raise AssertionError("the model was asked")

    with pytest.raises(DslmError, match="refuses one"):
        run_pass_at_k(problems, complete, PassAtKConfig(), LIMITS)
