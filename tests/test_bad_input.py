"""Bad input across every command: a missing path, a file of the wrong kind, an empty corpus,
a manifest from other shards, a config typo. Each is one line naming the problem, a non-zero
exit and no traceback."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dslm.files import sha256_file
from shards.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ZERO2 = str(REPO / "ds_configs" / "zero2.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_shards):
    """Paths for the table: real shards, shards of another tokenizer, files of the wrong kind."""
    root = tmp_path_factory.mktemp("bad")
    shards, manifest = tiny_shards
    other = root / "other"  # the same samples, as if built with another tokenizer: manifest and file agree
    shutil.copytree(shards, other)
    another_tokenizer(other / manifest.tokenizer)
    raw = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**raw, "tokenizer_sha256": sha256_file(other / manifest.tokenizer)}))
    (root / "empty").mkdir()
    (root / "notjson").mkdir()
    (root / "notjson" / "manifest.json").write_text("{not json")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "recipe.yaml").write_text("train:\n  max_step: 5\n")
    (root / "records.jsonl").write_text('{"instruction": "Add one.", "output": "x + 1"}\n')
    (root / "mix.yaml").write_text(f"data:\n  mix:\n    - {{shards: {shards}, weight: 0.5}}\n"
                                   f"    - {{shards: {other}, weight: 0.5}}\n")
    return {"shards": str(shards), "other": str(other), "root": str(root), "missing": str(root / "missing"),
            "empty": str(root / "empty"), "notjson": str(root / "notjson"), "png": str(root / "picture.png"),
            "recipe": str(root / "recipe.yaml"), "records": str(root / "records.jsonl"), "mix": str(root / "mix.yaml"),
            "tokenizer": str(shards / manifest.tokenizer)}


def another_tokenizer(path: Path) -> None:
    """Write over `path` a tokenizer.json of the same vocabulary size learned from other text."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    train_tokenizer([text], vocab_size=Tokenizer.from_file(str(path)).get_vocab_size()).save(str(path))


CASES = [
    # (command, arguments with {placeholders}, what the line must say)
    ("dslm-shard", "tokenizer --source code:{missing} --out {root}/t.json", "is not a folder"),
    ("dslm-shard", "tokenizer --source code:{empty} --out {root}/t.json", "sources are empty"),
    ("dslm-shard", "tokenizer --source code:{empty} --out {tokenizer}", "already exists; pass --overwrite"),
    ("dslm-shard", "tokenizer --source code:{empty} --out {root} --overwrite", "is a folder; name the file"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {png} --out {root}/b", "not a tokenizer.json"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {missing} --out {root}/b", "no such file"),
    ("dslm-shard", "verify {missing}", "no manifest.json"),
    ("dslm-shard", "verify {notjson}", "manifest.json"),
    ("dslm-shard", "inspect {png}", "no manifest.json"),
    ("dslm-shard", "sft --source {png} --template instruct --tokenizer {tokenizer} --out {root}/s",
     "matches no .jsonl"),
    ("dslm-shard", "sft --source {records} --template chatml --tokenizer {tokenizer} --out {root}/s", "chatml"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --seq-len many", "many"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --tasks 2 --task 2", "--task 2 must be"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --tasks 2 --task 1",
     "stage dedup has not finished"),
    ("dslm-shard", "merge {empty}", "holds no task of a distributed build"),
    ("dslm-generate", "{missing} --prompt x --strategy nucleus", "nucleus"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={missing} runs_dir={root}/runs", "no manifest.json"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {recipe} data.shards={shards} runs_dir={root}/runs",
     "max_step"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {missing} runs_dir={root}/runs", "missing"),
    ("dslm-train", "--deepspeed {png} data.shards={shards} runs_dir={root}/runs", "picture.png"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={notjson} runs_dir={root}/runs", "manifest.json"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {mix} runs_dir={root}/runs", "another tokenizer"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={shards} data.on_bad_shard=ignore", "stop, skip"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={shards} data.max_open_shards=4",
     "data.max_open_shards=4 leaves 4 open shard(s)"),
    ("dslm-eval", "{missing}", "missing"),
    ("dslm-eval", "{png} --shards {shards}", "picture.png"),
    ("dslm-generate", "{missing} --prompt x", "does not exist"),
    ("dslm-generate", "{png} --prompt x", "is not a checkpoint"),
    ("dslm-export", "{missing}", "missing"),
    ("dslm-export", "{png}", "not a checkpoint"),
    ("dslm-export", "{png} --format onnx", "not a checkpoint"),
    ("dslm-export", "{missing} --format onnx --int8", "missing"),
    ("dslm-export", "{missing} --format tflite", "tflite"),
    ("dslm-complete", "{missing} --prompt x", "no such folder"),
    ("dslm-complete", "{root} --prompt x", "no model.onnx"),
    ("dslm-complete", "{root} --file {png} --line 1", "not UTF-8"),
    ("dslm-complete", "{root} --prompt x --top-p 2", "top_p"),
    ("dslm-complete", "{root} --prompt x --max-new-tokens 0", "max_new_tokens"),
    ("dslm-submit", "train --executor local --dry-run {missing}", "missing"),
    ("dslm-submit", "train --executor local --dry-run {recipe}", "max_step"),
]


@pytest.mark.parametrize("command, args, message", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_a_non_zero_exit(world, command, args, message):
    proc = subprocess.run([BIN / command, *args.format(**world).split()], capture_output=True, text=True,
                          cwd=world["root"], timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(command) and ": error:" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "usage:" not in proc.stderr  # argparse's errors too are one line


def test_eval_refuses_shards_of_another_tokenizer(world, tmp_path):
    """A model scored on shards whose tokenizer is not its own would report a meaningless loss."""
    settings = ["train.max_steps=2", "train.warmup_steps=1", "train.val_interval=0", "train.checkpoint_interval=2",
                "model.preset=tiny", "train.micro_batch_size=2"]
    subprocess.run([BIN / "dslm-train", "--deepspeed", ZERO2, f"data.shards={world['shards']}", f"runs_dir={tmp_path}",
                    "name=r", *settings], check=True, capture_output=True, timeout=600)
    proc = subprocess.run([BIN / "dslm-eval", tmp_path / "r", "--shards", world["other"], "--metrics", "perplexity"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another tokenizer" in proc.stderr.strip().splitlines()[-1]


def test_a_tokenizer_replaced_after_the_build_is_refused_by_every_command_that_reads_the_shards(
        tiny_shards, code_corpus, tmp_path, write_checkpoint):
    """The shards' ids mean the text of the tokenizer they were built with: a tokenizer.json written
    over it afterwards (`dslm-shard tokenizer --out DIR/tokenizer.json --overwrite`) would make eval
    report the loss of another text, and an export or fine-tune speak it. Each command names both
    hashes in one line."""
    from dslm.config import load_config, save_config

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards[0], shards)
    built = sha256_file(shards / "tokenizer.json")
    retrain = [BIN / "dslm-shard", "tokenizer", "--source", f"code:{code_corpus / 'email'}", "--vocab-size", "512",
               "--out", shards / "tokenizer.json"]
    refused = subprocess.run(retrain, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "already exists; pass --overwrite" in refused.stderr
    assert sha256_file(shards / "tokenizer.json") == built
    subprocess.run([*retrain, "--overwrite"], check=True, capture_output=True, timeout=300)
    replaced = sha256_file(shards / "tokenizer.json")
    assert replaced != built
    run = load_config(None, ["name=r", f"runs_dir={tmp_path / 'runs'}", f"data.shards={shards}", "model.preset=tiny",
                             "model.vocab_size=512"])
    save_config(run)
    from dslm.model import GPT

    tag = write_checkpoint(run.run_dir, 2, {"module": GPT(run.model).state_dict(), "global_steps": 2})
    (tmp_path / "records.jsonl").write_text('{"instruction": "Add one.", "output": "x + 1"}\n')
    commands = [
        ["dslm-train", "--deepspeed", ZERO2, f"data.shards={shards}", f"runs_dir={tmp_path / 'runs'}", "name=new",
         "model.preset=tiny", "model.vocab_size=512"],
        ["dslm-eval", run.run_dir, "--metrics", "perplexity"],
        ["dslm-generate", run.run_dir, "--prompt", "def"],
        ["dslm-export", tag],
        ["dslm-export", run.run_dir, "--format", "onnx"],
        ["dslm-shard", "inspect", shards, "--show", "1"],
        ["dslm-shard", "sft", "--source", tmp_path / "records.jsonl", "--template", "instruct", "--tokenizer",
         shards / "tokenizer.json", "--out", tmp_path / "sft"],
        ["dslm-shard", "build", "--source", f"code:{tmp_path}", "--tokenizer", shards / "tokenizer.json", "--out",
         tmp_path / "rebuilt"],
    ]
    for command in commands:
        proc = subprocess.run([BIN / command[0], *command[1:]], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)
        errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        assert len(errors) == 1 and f"sha256 {replaced}" in errors[0] and f"sha256 {built}" in errors[0], \
            (command, proc.stderr[-2000:])
    assert not (run.run_dir / "export").exists() and not (tmp_path / "sft").exists()
