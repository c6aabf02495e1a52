"""fim_exact_match: single-line infilling on held-out documents, its scoring, and its refusal of a
model trained without fill-in-the-middle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dslm.config import load_config, save_config
from dslm.data.tokens import BOS_ID, EOS_ID
from dslm.errors import DslmError
from dslm.metrics import read_scalars
from dslm.model import GPT
from dslm_eval import infilling
from dslm_eval.cli import main
from dslm_eval.code_tasks import edit_similarity
from dslm_eval.infilling import InfillingConfig, build_infilling_tasks, fim_prompt, run_fim_exact_match, torch_infill
from dslm_eval.load import load_for_eval
from dslm_local.fim import FimIds
from tests.conftest import write_tag

DOCS = {
    "python": [
        "import os\n\n\ndef f(x):\n    y = x + 1\n    return y\n",
        "class A:\n    def g(self):\n        return 2\n",
    ],
    "c": ["int add(int a, int b) {\n    return a + b;\n}\n"],
}


def oracle(tasks_by_context):
    def infill(prefixes, suffixes, max_new_tokens):
        return [tasks_by_context[(p, s)].target + "\nmore" for p, s in zip(prefixes, suffixes)]

    return infill


def test_each_task_masks_one_non_empty_line_and_prefix_line_suffix_is_the_document():
    cfg = InfillingConfig(samples_per_language=50)
    tasks = build_infilling_tasks(DOCS, cfg)
    assert {t.language for t in tasks} == {"python", "c"}
    assert sum(t.language == "python" for t in tasks) == 7 and sum(t.language == "c" for t in tasks) == 3
    for t in tasks:
        assert t.prefix + t.target + t.suffix == DOCS[t.language][t.doc]
        assert t.target.strip() and "\n" not in t.target
        assert t.prefix == "" or t.prefix.endswith("\n")
    assert build_infilling_tasks(DOCS, cfg) == tasks, "the seed fixes the tasks"


def test_an_oracle_scores_one_a_wrong_line_zero_and_edit_similarity_is_the_indel_ratio():
    cfg = InfillingConfig(samples_per_language=50)
    tasks = build_infilling_tasks(DOCS, cfg)
    by_context = {(t.prefix, t.suffix): t for t in tasks}
    result = run_fim_exact_match(DOCS, oracle(by_context), cfg)
    assert {lang: (r["n"], r["exact_match"], r["edit_similarity"]) for lang, r in result["languages"].items()} == {
        "python": (7, 1.0, 1.0),
        "c": (3, 1.0, 1.0),
        "all": (10, 1.0, 1.0),
    }

    def indented(prefixes, suffixes, max_new_tokens):  # indentation is not scored
        return ["  " + by_context[(p, s)].target.strip() + "  " for p, s in zip(prefixes, suffixes)]

    assert run_fim_exact_match(DOCS, indented, cfg)["languages"]["all"]["exact_match"] == 1.0

    def wrong(prefixes, suffixes, max_new_tokens):
        return ["return y" for _ in prefixes]

    scored = run_fim_exact_match(DOCS, wrong, cfg)["languages"]
    hits = [t for t in tasks if t.target.strip() == "return y"]
    assert scored["python"]["exact_match"] == pytest.approx(len(hits) / 7)
    expected = sum(edit_similarity("return y", t.target.strip()) for t in tasks if t.language == "c") / 3
    assert scored["c"]["edit_similarity"] == pytest.approx(expected)
    overall = sum(edit_similarity("return y", t.target.strip()) for t in tasks) / 10
    assert scored["all"]["edit_similarity"] == pytest.approx(overall), "overall is over all tasks, not languages"


def test_edit_similarity_on_constructed_cases():
    assert edit_similarity("return a + b;", "return a + b;") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert edit_similarity("abcd", "abxd") == pytest.approx(1 - 2 / 8)  # one substitution = a deletion + an insertion


def test_the_prompt_is_psm_with_the_code_nearest_the_masked_line():
    fim = FimIds(prefix=8, middle=9, suffix=10, pad=11)
    assert fim_prompt(fim, [20, 21, 22], [30, 31], room=100) == [2, 8, 20, 21, 22, 10, 30, 31, 9]
    assert fim_prompt(fim, list(range(20, 30)), list(range(30, 40)), room=6) == [2, 8, 27, 28, 29, 10, 30, 31, 32, 9]


def test_configs_reject_bad_values():
    with pytest.raises(DslmError, match="samples_per_language must be >= 1"):
        InfillingConfig(samples_per_language=0)


def test_a_model_trained_without_fim_is_refused_in_one_line(base_run, tmp_path, capsys):
    run = tmp_path / "base"
    shutil.copytree(base_run, run)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--metrics", "perplexity,fim_exact_match"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len([line for line in err if "dslm-eval: error" in line]) == 1
    assert "fim_exact_match" in err[-1] and "fill in the middle" in err[-1]
    assert not (run / "eval").exists(), "nothing is evaluated"


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory, fim_shards) -> Path:
    """A run of the tiny preset trained (as its config says) on FIM shards (fim_shards), with one
    sealed tag of random weights."""
    shards = fim_shards
    cfg = load_config(
        None,
        ["name=fim", f"runs_dir={tmp_path_factory.mktemp('fim_runs')}", "model.preset=tiny", f"data.shards={shards}"],
    )
    cfg.fim = True
    save_config(cfg)
    shutil.copy(shards / "tokenizer.json", cfg.run_dir.tokenizer)
    torch.manual_seed(0)
    write_tag(cfg.run_dir.path, 3, {"module": GPT(cfg.model).state_dict(), "global_steps": 3})
    return cfg.run_dir.path


def test_a_fim_model_is_asked_in_psm_and_stops_at_the_line_end(fim_run, monkeypatch):
    loaded = load_for_eval(fim_run)
    fim = FimIds.of(loaded.tokenizer)
    seen = {}

    def fake_generate(model, prompts, cfg, decode):
        seen.update(prompts=prompts, cfg=cfg)
        return [loaded.tokenizer.encode("x = 1\ny = 2").ids for _ in prompts]

    monkeypatch.setattr(infilling, "generate", fake_generate)
    infill = torch_infill(loaded.model, loaded.tokenizer, batch_size=4)
    assert infill(["def f():\n"], ["\n    return x\n"], max_new_tokens=16) == ["x = 1"]
    (prompt,) = seen["prompts"]
    before, after = (loaded.tokenizer.encode(t).ids for t in ("def f():\n", "\n    return x\n"))
    assert prompt == [BOS_ID, fim.prefix, *before, fim.suffix, *after, fim.middle]
    assert set(seen["cfg"].stop_tokens) == {EOS_ID, fim.prefix, fim.middle, fim.suffix, fim.pad}
    assert seen["cfg"].strategy == "greedy" and seen["cfg"].stop_strings == ("\n",)


def test_dslm_eval_records_fim_exact_match_per_language_and_overall(fim_run, capsys):
    main([str(fim_run), "--metrics", "fim_exact_match", "--fim-samples", "4", "--batch-size", "4"])
    result = json.loads((fim_run / "eval" / "step3.json").read_text())["fim_exact_match"]
    assert [(lang, r["n"]) for lang, r in result["languages"].items()] == [("python", 4), ("all", 4)]
    assert 0 <= result["languages"]["all"]["exact_match"] <= result["languages"]["all"]["edit_similarity"] <= 1
    for tag in ("eval/fim_exact_match/python", "eval/fim_edit_similarity/all"):
        assert [s for s, _ in read_scalars(fim_run / "tb", tag)] == [3], tag
    assert "fim em/es" in capsys.readouterr().out
