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
from dslm.model import ModelConfig
from dslm_shards.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ZERO2 = str(REPO / "ds_configs" / "zero2.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_shards, base_run, code_corpus):
    """Paths for the table: real shards, shards of another tokenizer, files of the wrong kind, a
    run of the tiny preset to fine-tune from, and a run on instruction shards without a val split."""
    root = tmp_path_factory.mktemp("bad")
    shards, manifest = tiny_shards
    other = root / "other"  # the same samples, as if built with another tokenizer: manifest and file agree
    shutil.copytree(shards, other)
    another_tokenizer(other / manifest.tokenizer)
    raw = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(
        json.dumps({**raw, "tokenizer_sha256": sha256_file(other / manifest.tokenizer)})
    )
    (root / "empty").mkdir()
    (root / "notjson").mkdir()
    (root / "notjson" / "manifest.json").write_text("{not json")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "recipe.yaml").write_text("train:\n  max_step: 5\n")
    (root / "records.jsonl").write_text('{"instruction": "Add one.", "output": "x + 1"}\n')
    (root / "mix.yaml").write_text(
        f"data:\n  mix:\n    - {{shards: {shards}, weight: 0.5}}\n    - {{shards: {other}, weight: 0.5}}\n"
    )
    (root / "finetune.yaml").write_text(f"model:\n  preset: code-33m\ntrain:\n  init_from: {base_run}\n")
    return {
        "shards": str(shards),
        "other": str(other),
        "root": str(root),
        "missing": str(root / "missing"),
        "empty": str(root / "empty"),
        "notjson": str(root / "notjson"),
        "png": str(root / "picture.png"),
        "recipe": str(root / "recipe.yaml"),
        "records": str(root / "records.jsonl"),
        "mix": str(root / "mix.yaml"),
        "tokenizer": str(shards / manifest.tokenizer),
        "base": str(base_run),
        "finetune": str(root / "finetune.yaml"),
        "corpus": str(code_corpus / "json"),
        "sft_run": str(run_without_val_split(root, base_run, shards / manifest.tokenizer)),
    }


def run_without_val_split(root: Path, base_run: Path, tokenizer: Path) -> Path:
    """A copy of `base_run` whose data.shards are instruction shards built with --val-fraction 0."""
    from dslm.config import load_config, to_yaml
    from dslm.files import atomic_write_text
    from dslm.run_dir import RunDir
    from dslm_shards.sft import SftConfig, build_sft_shards

    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Add {i}.", "output": f"x + {i}"}) + "\n" for i in range(20))
    )
    sft = SftConfig(
        out=root / "sft0",
        tokenizer=tokenizer,
        template="instruct",
        sources=[str(root / "pairs.jsonl")],
        seq_len=64,
        val_fraction=0,
    )
    build_sft_shards(sft)
    run = root / "sft_run"
    shutil.copytree(base_run, run)
    cfg = load_config(RunDir(run).config, [])
    cfg.data.shards = str(sft.out)
    atomic_write_text(RunDir(run).config, to_yaml(cfg))
    return run


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
    (
        "dslm-shard",
        "sft --source {png} --template instruct --tokenizer {tokenizer} --out {root}/s",
        "matches no .jsonl",
    ),
    ("dslm-shard", "sft --source {records} --template chatml --tokenizer {tokenizer} --out {root}/s", "chatml"),
    ("dslm-shard", "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --seq-len many", "many"),
    (
        "dslm-shard",
        "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --tasks 2 --task 2",
        "--task 2 must be",
    ),
    (
        "dslm-shard",
        "build --source code:{empty} --tokenizer {tokenizer} --out {root}/b --tasks 2 --task 1",
        "stage dedup has not finished",
    ),
    ("dslm-shard", "merge {empty}", "holds no task of a distributed build"),
    ("dslm-generate", "{missing} --prompt x --strategy nucleus", "nucleus"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={missing} runs_dir={root}/runs", "does not exist: build it"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={empty} runs_dir={root}/runs", "no manifest.json"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {recipe} data.shards={shards} runs_dir={root}/runs", "max_step"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {missing} runs_dir={root}/runs", "missing"),
    ("dslm-train", "--deepspeed {png} data.shards={shards} runs_dir={root}/runs", "picture.png"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={notjson} runs_dir={root}/runs", "manifest.json"),
    ("dslm-train", "--deepspeed " + ZERO2 + " --config {mix} runs_dir={root}/runs", "another tokenizer"),
    ("dslm-train", "--deepspeed " + ZERO2 + " data.shards={shards} data.on_bad_shard=ignore", "stop, skip"),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} data.max_open_shards=4",
        "data.max_open_shards=4 leaves 4 open shards to each of 1 source,",
    ),
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
    # issue 27: what a size or an unbalanced override did before anything said no
    (
        "dslm-shard",
        "tokenizer --source code:{empty} --out {root}/t.json --vocab-size -1",
        "--vocab-size -1 must be within 264..1,048,576",
    ),
    (
        "dslm-shard",
        "tokenizer --source code:{empty} --out {root}/t.json --vocab-size 1000000000",
        "--vocab-size 1000000000 must be within 264..1,048,576",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs train.freeze=[wte.*",
        "override 'train.freeze=[wte.*': the value is not valid YAML",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " runs_dir={root}/runs data.mix=[{{shards:{shards}",
        "the value is not valid YAML",
    ),
    (
        "dslm-submit",
        "train --executor local --dry-run data.shards={shards} train.freeze=[wte.*",
        "override 'train.freeze=[wte.*': the value is not valid YAML",
    ),
    (
        "dslm-submit",
        "train --executor local --dry-run runs_dir={root}/runs data.mix=[{{shards:{shards}",
        "the value is not valid YAML",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " --config {png} runs_dir={root}/runs",
        "picture.png is not a YAML recipe: it is not UTF-8 text",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs train.micro_batch_size=100000",
        "train.micro_batch_size=100000 on 1 rank takes 100,000 samples per micro-step, more than the",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs data.max_open_shards=1000000000",
        "data.max_open_shards=1000000000",
    ),  # refused after the process group exists: a process of its own
    # issue 28: a fine-tune's model is its source's; an explicit model.* that differs is refused before the model exists
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs train.init_from={base} model.n_embd=64",
        "model.n_embd=64 but train.init_from={base} has model.n_embd=128; leave model.n_embd out",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " --config {finetune} data.shards={shards} runs_dir={root}/runs",
        "model.preset=code-33m but train.init_from={base} has model.preset=tiny",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs train.init_from={missing}",
        "train.init_from: {missing} does not exist",
    ),
    (
        "dslm-submit",
        "train --executor local --dry-run data.shards={shards} train.init_from={base} model.n_layer=4",
        "model.n_layer=4 but train.init_from={base} has model.n_layer=2",
    ),
    # issue 28: an --out that exists is kept; an --out under a file says so
    (
        "dslm-generate",
        "{base} --prompt x --out {recipe}",
        "--out {recipe} already exists; pass --overwrite to replace it",
    ),
    ("dslm-generate", "{base} --prompt x --out {png}/out.jsonl", "{png} is a file, not a folder"),
    ("dslm-shard", "tokenizer --source code:{corpus} --out {png}/t.json", "{png} is a file, not a folder"),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {png}/b",
        "{png} is a file, not a folder",
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {png}/deeper/b",
        "{png} is a file, not a folder",
    ),
    (
        "dslm-shard",
        "sft --source {records} --template instruct --tokenizer {tokenizer} --out {png}/s",
        "{png} is a file, not a folder",
    ),
    ("dslm-export", "{base}/checkpoints/global_step5 {png}/export", "{png} is a file, not a folder"),
    ("dslm-export", "{base} {png}/export --format onnx", "{png} is a file, not a folder"),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={png}/runs",
        "{png} is a file, not a folder",
    ),
    (
        "dslm-submit",
        "train --executor local --dry-run data.shards={shards} runs_dir={png}/runs",
        "{png} is a file, not a folder",
    ),
    # issue 28: instruction shards without a val split: eval says how to name other shards
    ("dslm-eval", "{sft_run} --metrics perplexity", "dslm-eval {sft_run} --shards PATH"),
    # issue 28: a recipe that is not there (outside the repository, launch/recipes/X is not found)
    ("dslm-train", "--config {root}/launch/recipes/demo.yaml", "recipe {root}/launch/recipes/demo.yaml: no such file"),
    # issue 28: --resume names a tag of this run
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs --resume aut",
        "--resume aut: no such checkpoint (auto, if-any, or a tag folder of this run)",
    ),
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs --resume {base}/checkpoints/global_step5",
        "is not a checkpoint of this run (its tags are in {root}/runs/",
    ),
    # issue 28: an abbreviated option is refused (argparse's allow_abbrev), by every command
    (
        "dslm-train",
        "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs --resum auto",
        "unrecognized arguments: --resum",
    ),
    ("dslm-shard", "inspect {shards} --sho 1", "unrecognized arguments: --sho"),
    ("dslm-eval", "{base} --metric perplexity", "unrecognized arguments: --metric"),
    # issue 30: --parity compares an export, not a checkpoint
    ("dslm-eval", "{base}/checkpoints/global_step5 --parity", "--parity compares an export folder with its checkpoint"),
    ("dslm-generate", "{base} --prom x", "unrecognized arguments: --prom"),
    ("dslm-export", "{base} --form onnx", "unrecognized arguments: --form"),
    ("dslm-submit", "train --executor local --dry data.shards={shards}", "unrecognized arguments: --dry"),
    ("dslm-submit", "train --exec local --dry-run data.shards={shards}", "unrecognized arguments: --exec"),
    ("dslm-complete", "{root} --prompt x --max-new 5", "unrecognized arguments: --max-new 5"),
    # issue 29: fill-in-the-middle needs its tokens, and rates within 0..1
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/f --fim-rate 0.5",
        "--fim-rate 0.5 needs the FIM tokens, and {tokenizer} has none: train a tokenizer with "
        "`dslm-shard tokenizer --fim`",
    ),
    ("dslm-shard", "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/f --fim-rate 1.5", "within 0..1"),
    ("dslm-shard", "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/f --fim-spm-rate -1", "0..1"),
    ("dslm-shard", "tokenizer --fim --source code:{corpus} --vocab-size 265 --out {root}/t.json", "within 268.."),
    # issue 29: completion at a cursor needs a FIM model, one prompt, and --stdio answers in JSON only
    ("dslm-generate", "{base} --prompt x --suffix y", "--suffix: {base} was not trained to fill in the middle"),
    ("dslm-generate", "{base} --prompt x --prompt y --suffix z", "--suffix goes with one prompt"),
    ("dslm-complete", "{root} --stdio --jsonl", "--stdio always replies in JSON lines; drop --jsonl"),
]


@pytest.mark.parametrize("command, args, message", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_a_non_zero_exit(world, command, args, message):
    proc = subprocess.run(
        [BIN / command, *args.format(**world).split()], capture_output=True, text=True, cwd=world["root"], timeout=900
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith(command) and ": error:" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and message.format(**world) in errors[0], proc.stderr[-2000:]
    assert "usage:" not in proc.stderr  # argparse's errors too are one line


def test_eval_refuses_shards_of_another_tokenizer(world, tmp_path):
    """A model scored on shards whose tokenizer is not its own would report a meaningless loss."""
    settings = [
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.val_interval=0",
        "train.checkpoint_interval=2",
        "model.preset=tiny",
        "train.micro_batch_size=2",
    ]
    subprocess.run(
        [
            BIN / "dslm-train",
            "--deepspeed",
            ZERO2,
            f"data.shards={world['shards']}",
            f"runs_dir={tmp_path}",
            "name=r",
            *settings,
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    tensorboard = sorted((tmp_path / "r" / "tb").iterdir())
    proc = subprocess.run(
        [BIN / "dslm-eval", tmp_path / "r", "--shards", world["other"], "--metrics", "perplexity"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another tokenizer" in proc.stderr.strip().splitlines()[-1]
    assert sorted((tmp_path / "r" / "tb").iterdir()) == tensorboard  # no event file of an eval without results
    assert not (tmp_path / "r" / "eval").exists()


def test_a_tokenizer_replaced_after_the_build_is_refused_by_every_command_that_reads_the_shards(
    tiny_shards, code_corpus, tmp_path, write_checkpoint
):
    """The shards' ids mean the text of the tokenizer they were built with: a tokenizer.json written
    over it afterwards (`dslm-shard tokenizer --out DIR/tokenizer.json --overwrite`) would make eval
    report the loss of another text, and an export or fine-tune speak it. Each command names both
    hashes in one line."""
    from dslm.config import load_config, save_config

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards[0], shards)
    built = sha256_file(shards / "tokenizer.json")
    retrain = [
        BIN / "dslm-shard",
        "tokenizer",
        "--source",
        f"code:{code_corpus / 'email'}",
        "--vocab-size",
        "512",
        "--out",
        shards / "tokenizer.json",
    ]
    refused = subprocess.run(retrain, capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "already exists; pass --overwrite" in refused.stderr
    assert sha256_file(shards / "tokenizer.json") == built
    subprocess.run([*retrain, "--overwrite"], check=True, capture_output=True, timeout=900)
    replaced = sha256_file(shards / "tokenizer.json")
    assert replaced != built
    run = load_config(
        None,
        [
            "name=r",
            f"runs_dir={tmp_path / 'runs'}",
            f"data.shards={shards}",
            "model.preset=tiny",
            "model.vocab_size=512",
        ],
    )
    save_config(run)
    from dslm.model import GPT

    tag = write_checkpoint(run.run_dir.path, 2, {"module": GPT(run.model).state_dict(), "global_steps": 2})
    (tmp_path / "records.jsonl").write_text('{"instruction": "Add one.", "output": "x + 1"}\n')
    commands = [
        [
            "dslm-train",
            "--deepspeed",
            ZERO2,
            f"data.shards={shards}",
            f"runs_dir={tmp_path / 'runs'}",
            "name=new",
            "model.preset=tiny",
            "model.vocab_size=512",
        ],
        ["dslm-eval", run.run_dir.path, "--metrics", "perplexity"],
        ["dslm-generate", run.run_dir.path, "--prompt", "def"],
        ["dslm-export", tag],
        ["dslm-export", run.run_dir.path, "--format", "onnx"],
        ["dslm-shard", "inspect", shards, "--show", "1"],
        [
            "dslm-shard",
            "sft",
            "--source",
            tmp_path / "records.jsonl",
            "--template",
            "instruct",
            "--tokenizer",
            shards / "tokenizer.json",
            "--out",
            tmp_path / "sft",
        ],
        [
            "dslm-shard",
            "build",
            "--source",
            f"code:{tmp_path}",
            "--tokenizer",
            shards / "tokenizer.json",
            "--out",
            tmp_path / "rebuilt",
        ],
    ]
    for command in commands:
        proc = subprocess.run(
            [BIN / command[0], *command[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=900
        )
        errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        assert len(errors) == 1 and f"sha256 {replaced}" in errors[0] and f"sha256 {built}" in errors[0], (
            command,
            proc.stderr[-2000:],
        )
    assert not (run.run_dir.path / "export").exists() and not (tmp_path / "sft").exists()


def test_a_model_too_big_for_the_machine_is_refused_in_one_line_before_it_is_built(world, tmp_path):
    """model.n_layer=100000 (20 billion parameters) grew past 19 GB of RSS before anything said no:
    now the estimate (dslm.memory) refuses it before the process group, the op build or the model,
    at the RSS of the imports. The peak RSS is the child's own (getrusage in a process of its own)."""
    command = [
        str(BIN / "dslm-train"),
        "--deepspeed",
        ZERO2,
        f"data.shards={world['shards']}",
        f"runs_dir={tmp_path}",
        "model.preset=tiny",
        "model.n_layer=100000",
    ]
    measure = (
        "import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
        "text=True); print(json.dumps([p.returncode, p.stderr, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    out = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=900)
    code, stderr, max_rss_kib = json.loads(out.stdout)
    errors = [line for line in stderr.splitlines() if line.startswith("dslm-train: error:")]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    parameters = ModelConfig(preset="tiny", n_layer=100_000).num_params()  # tests/dslm/test_model.py holds it to GPT's
    assert len(errors) == 1 and "the run needs at least" in errors[0] and f"{parameters:,} parameters" in errors[0]
    assert "available" in errors[0] and "a smaller model (model.*)" in errors[0]
    assert max_rss_kib < 1 << 20, f"peak RSS {max_rss_kib} KiB"


# Every numeric option of every command at 0, -1 and 10**9: each row is refused in one line
# (the text it must hold) or runs to the end (None) without a traceback. Rows that would start a
# long run end early instead: dslm-train's accepted values with --print-run-dir (the run itself is
# test_the_largest_values_dslm_train_accepts_train), dslm-submit's with --dry-run.
BIG = 10**9
TRAIN = "--deepspeed " + ZERO2 + " data.shards={shards} runs_dir={root}/runs train.max_steps=1 train.warmup_steps=0"
NEEDS = "the run needs at least"
POSITIVE = "must be at least 1"
SIZES = [
    # (command, arguments, the option's argument with {v}, {value: None or the error line's text})
    (
        "dslm-shard",
        "tokenizer --source code:{corpus} --out {root}/sizes.json --overwrite",
        "--vocab-size {v}",
        {
            0: "--vocab-size 0 must be within",
            -1: "--vocab-size -1 must be within",
            BIG: "must be within 264..1,048,576",
        },
    ),
    (
        "dslm-shard",
        "tokenizer --source code:{corpus} --out {root}/sizes.json --overwrite",
        "--sample-bytes {v}",
        {0: "--sample-bytes 0 must be at least 1", -1: "--sample-bytes -1 must be at least 1", BIG: None},
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/b --overwrite --workers 0",
        "--seq-len {v}",
        {
            0: "--seq-len 0 must be within",
            -1: "--seq-len -1 must be within",
            BIG: "--seq-len 1000000000 must be within 1..1,048,576 tokens",
        },
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/b --overwrite --workers 0",
        "--samples-per-shard {v}",
        {0: "--samples-per-shard 0 must be at least 1", -1: "must be at least 1", BIG: None},
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/b --overwrite --workers 0",
        "--val-fraction {v}",
        {0: None, -1: "val_fraction -1.0 must be in [0, 1)", BIG: "must be in [0, 1)"},
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/b --overwrite",
        "--workers {v}",
        {0: None, -1: "workers -1 must not be negative", BIG: "--workers 1000000000 would take at least"},
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/bt --workers 0 --stage digests --task 0",
        "--tasks {v}",
        {
            0: "--tasks 0 must be within 1..10,000",
            -1: "--tasks -1 must be within",
            BIG: "--tasks 1000000000 must be within 1..10,000",
        },
    ),
    (
        "dslm-shard",
        "build --source code:{corpus} --tokenizer {tokenizer} --out {root}/bk --workers 0 --stage digests "
        "--tasks 2 --overwrite",
        "--task {v}",
        {0: None, -1: "--task -1 must be in [0, --tasks 2)", BIG: "--task 1000000000 must be in [0, --tasks 2)"},
    ),
    (
        "dslm-shard",
        "sft --source {records} --template instruct --tokenizer {tokenizer} --out {root}/s --overwrite",
        "--seq-len {v}",
        {
            0: "--seq-len 0 must be within",
            -1: "--seq-len -1 must be within",
            BIG: "--seq-len 1000000000 must be within 1..1,048,576 tokens",
        },
    ),
    (
        "dslm-shard",
        "sft --source {records} --template instruct --tokenizer {tokenizer} --out {root}/s --overwrite",
        "--samples-per-shard {v}",
        {0: "--samples-per-shard 0 must be at least 1", -1: "must be at least 1", BIG: None},
    ),
    (
        "dslm-shard",
        "sft --source {records} --template instruct --tokenizer {tokenizer} --out {root}/s --overwrite",
        "--val-fraction {v}",
        {0: None, -1: "val_fraction -1.0 must be in [0, 1)", BIG: "must be in [0, 1)"},
    ),
    ("dslm-shard", "inspect {shards}", "--show {v}", {0: None, -1: "--show -1 must not be negative", BIG: None}),
    *(
        (
            "dslm-train",
            TRAIN,
            f"model.{name}={{v}}",
            {0: f"model.{name}=0 {POSITIVE}", -1: f"model.{name}=-1 {POSITIVE}", BIG: big},
        )
        for name, big in [
            ("n_layer", NEEDS),
            ("n_head", "model.n_embd=128 is not divisible by model.n_head=1000000000"),
            ("n_embd", NEEDS),
            ("intermediate_size", NEEDS),
            ("vocab_size", NEEDS),
            ("block_size", NEEDS),
            ("vocab_multiple", NEEDS),
        ]
    ),
    (
        "dslm-train",
        TRAIN,
        "--nproc-per-node {v}",
        {
            0: "--nproc-per-node=0 must be at least 1",
            -1: "--nproc-per-node=-1 must be at least 1",
            BIG: "--nproc-per-node=1000000000 is more ranks than this machine's",
        },
    ),
    (
        "dslm-train",
        TRAIN,
        "model.dropout={v}",
        {
            0: None,
            -1: "model.dropout=-1.0 must be within [0, 1)",
            BIG: "model.dropout=1000000000.0 must be within [0, 1)",
        },
    ),
    (
        "dslm-train",
        TRAIN,
        "data.num_workers={v}",
        {0: None, -1: "data.num_workers=-1 must not be negative", BIG: NEEDS},
    ),
    ("dslm-train", TRAIN, "data.prefetch_factor={v}", {0: POSITIVE, -1: POSITIVE, BIG: NEEDS}),
    ("dslm-train", TRAIN, "data.shuffle_window={v}", {0: POSITIVE, -1: POSITIVE, BIG: None}),
    ("dslm-train", TRAIN, "data.max_open_shards={v}", {0: POSITIVE, -1: POSITIVE}),  # 10**9: in CASES
    (
        "dslm-train",
        TRAIN,
        "data.mix=[{{shards: {shards}, weight: {v}}}]",
        {0: "must be above 0 and finite", -1: "must be above 0 and finite", BIG: None},
    ),
    (
        "dslm-train",
        TRAIN,
        "train.micro_batch_size={v}",
        {0: POSITIVE, -1: POSITIVE, BIG: "train.micro_batch_size=1000000000 on 1 rank "},
    ),
    (
        "dslm-train",
        TRAIN,
        "train.grad_accum={v}",
        {
            0: POSITIVE,
            -1: POSITIVE,
            BIG: "train.grad_accum=1000000000 micro-batches of 8 samples (1 rank) make a step of",
        },
    ),
    ("dslm-train", TRAIN, "train.max_steps={v}", {0: POSITIVE, -1: POSITIVE, BIG: None}),
    ("dslm-train", TRAIN, "train.lr={v}", {0: "must be positive and finite", -1: "must be positive", BIG: None}),
    ("dslm-train", TRAIN, "train.min_lr={v}", {0: None, -1: "train.min_lr=-1.0 must be within", BIG: "must be within"}),
    (
        "dslm-train",
        TRAIN,
        "train.warmup_steps={v}",
        {0: None, -1: "must be within 0..train.max_steps=1", BIG: "must be within 0..train.max_steps=1"},
    ),
    ("dslm-train", TRAIN, "train.decay_fraction={v}", {v: "must be within (0, 1]" for v in (0, -1, BIG)}),
    ("dslm-train", TRAIN, "train.weight_decay={v}", {0: None, -1: "must not be negative", BIG: None}),
    *(
        (
            "dslm-train",
            TRAIN,
            f"train.{beta}={{v}}",
            {0: None, -1: "must be within [0, 1)", BIG: "must be within [0, 1)"},
        )
        for beta in ("beta1", "beta2")
    ),
    ("dslm-train", TRAIN, "train.seed={v}", {0: None, -1: "train.seed=-1 must be within 0..4294967295", BIG: None}),
    (
        "dslm-train",
        TRAIN,
        "train.freeze_blocks={v}",
        {0: None, -1: "must not be negative", BIG: "is more than the model's 2 blocks (model.n_layer)"},
    ),
    (
        "dslm-train",
        TRAIN,
        "train.lora.rank={v}",
        {0: None, -1: "must not be negative", BIG: "train.lora.rank=1000000000 is above model.n_embd=128"},
    ),
    ("dslm-train", TRAIN, "train.lora.alpha={v}", {0: "must be positive", -1: "must be positive", BIG: None}),
    ("dslm-train", TRAIN, "train.lora.dropout={v}", {0: None, -1: "must be within [0, 1)", BIG: "within [0, 1)"}),
    *(
        ("dslm-train", TRAIN, f"train.{name}={{v}}", {0: POSITIVE, -1: POSITIVE, BIG: None})
        for name in (
            "log_interval",
            "checkpoint_interval",
            "val_batches",
            "max_skipped_in_a_row",
            "collective_timeout_s",
            "eval_timeout_s",
        )
    ),
    *(
        ("dslm-train", TRAIN, f"train.{name}={{v}}", {0: None, -1: "must not be negative", BIG: None})
        for name in ("val_interval", "keep_last")
    ),
    (
        "dslm-eval",
        "{run} --metrics perplexity --force",
        "--batch-size {v}",
        {0: "batch_size must be >= 1", -1: "batch_size must be >= 1", BIG: None},
    ),
    (
        "dslm-eval",
        "{run} --metrics exact_match --force",
        "--exact-match-samples {v}",
        {0: "samples_per_language must be >= 1", -1: "samples_per_language must be >= 1", BIG: None},
    ),
    (
        "dslm-eval",
        "{run} --metrics compile_success --no-humaneval --force",
        "--compile-samples {v}",
        {0: "samples_per_language must be >= 1", -1: "samples_per_language must be >= 1", BIG: None},
    ),
    (
        "dslm-eval",
        "{run} --metrics pass_at_k --force",
        "--pass-k-samples {v}",
        {0: "samples must be >= 1", -1: "samples must be >= 1", BIG: "samples=1000000000 must be at most 1000"},
    ),
    (  # an accepted temperature goes on to the next check: this model has no FIM
        "dslm-eval",
        "{run} --metrics pass_at_k,fim_exact_match --pass-k-samples 2 --force",
        "--pass-k-temperature {v}",
        {0: "temperature > 0", -1: "temperature > 0", BIG: "was not trained to fill in the middle"},
    ),
    (
        "dslm-eval",
        "{run} --metrics fim_exact_match --force",
        "--fim-samples {v}",
        {0: "samples_per_language must be >= 1", -1: "must be >= 1", BIG: "was not trained to fill in the middle"},
    ),
    (
        "dslm-eval",
        "{run} --metrics exact_match --exact-match-samples 2 --force",
        "--seed {v}",
        {0: None, -1: None, BIG: None},
    ),
    (
        "dslm-eval",
        "{onnx_copy} --parity",
        "--parity-tokens {v}",
        {0: "--parity-tokens 0 must be at least 1", -1: "--parity-tokens -1 must be at least 1", BIG: None},
    ),
    (
        "dslm-export",
        "{run} {root}/checked --check",
        "--check-tokens {v}",
        {0: "--check-tokens 0 must be at least 1", -1: "--check-tokens -1 must be at least 1", BIG: None},
    ),
    (
        "dslm-eval",
        "{run} --metrics perplexity --force",
        "--poll {v}",
        {0: "--poll 0 must be within (0, 86400] seconds", -1: "--poll -1 must be within", BIG: "--poll 1e+09 must be"},
    ),
    *(
        ("dslm-generate", "{run} --prompt def", f"--{option} {{v}}", {0: at_least, -1: at_least, BIG: big})
        for option, big in [
            ("max-new-tokens", "--max-new-tokens 1000000000 leaves no room for a prompt"),
            ("batch-size", None),
        ]
        for at_least in ["max_new_tokens, batch_size and num_beams must be at least 1"]
    ),
    (
        "dslm-generate",
        "{run} --prompt def --strategy beam",
        "--num-beams {v}",
        {
            0: "must be at least 1",
            -1: "must be at least 1",
            BIG: "decoding 1,000,000,000 sequences at once (1 prompt x 1000000000 beams) needs at least",
        },
    ),
    (
        "dslm-generate",
        "{run} --prompt def --strategy sample",
        "--temperature {v}",
        {0: "need temperature > 0", -1: "need temperature > 0", BIG: None},
    ),
    ("dslm-generate", "{run} --prompt def --strategy sample", "--top-k {v}", {0: None, -1: "top_k >= 0", BIG: None}),
    (
        "dslm-generate",
        "{run} --prompt def --strategy sample",
        "--top-p {v}",
        {v: "0 < top_p <= 1" for v in (0, -1, BIG)},
    ),
    (
        "dslm-generate",
        "{run} --prompt def --strategy sample",
        "--seed {v}",
        {0: None, -1: "seed=-1 must be >= 0", BIG: None},
    ),
    (
        "dslm-submit",
        "train --executor local --dry-run data.shards={shards} runs_dir={root}/runs",
        "--nodes {v}",
        {v: "needs SLURM" for v in (0, -1, BIG)},
    ),
    *(
        (
            "dslm-submit",
            "train --executor local --dry-run data.shards={shards} runs_dir={root}/runs",
            f"--{option} {{v}}",
            {0: zero, -1: f"--{option} must {'not be negative' if zero is None else 'be at least 1'}", BIG: None},
        )
        for option, zero in [
            ("gpus-per-node", None),
            ("tasks-per-node", None),
            ("cpus-per-task", "must be at least 1"),
            ("max-requeues", None),
            ("signal-delay", None),
        ]
    ),
    (
        "dslm-submit",
        "eval --executor local --dry-run",
        "--cpus-per-task {v} {run}",
        {0: "must be at least 1", -1: "must be at least 1", BIG: None},
    ),
    (
        "dslm-submit",
        "shard --executor local --dry-run --source code:{corpus} --tokenizer {tokenizer} --out {root}/sub",
        "--tasks {v}",
        {
            0: "--tasks 0 must be within 1..10,000",
            -1: "--tasks -1 must be within",
            BIG: "--tasks 1000000000 must be within 1..10,000",
        },
    ),
    *(
        ("dslm-complete", "{onnx} --prompt def", f"--{option} {{v}}", cases)
        for option, cases in [
            ("max-new-tokens", {0: "must be at least 1", -1: "must be at least 1", BIG: "leaves room for 0 beside"}),
            ("seed", {0: None, -1: "seed=-1 must be >= 0", BIG: None}),
            (
                "threads",
                {0: None, -1: "--threads -1: must be within 0..256", BIG: "--threads 1000000000: must be within"},
            ),
        ]
    ),
    *(
        ("dslm-complete", "{onnx} --prompt def --strategy sample", f"--{option} {{v}}", cases)
        for option, cases in [
            ("temperature", {0: "need temperature > 0", -1: "need temperature > 0", BIG: None}),
            ("top-k", {0: None, -1: "top_k >= 0", BIG: None}),
            ("top-p", {v: "0 < top_p <= 1" for v in (0, -1, BIG)}),
        ]
    ),
    ("dslm-complete", "{onnx} --file {root}/cursor.py", "--line {v}", {v: f"--line {v}: " for v in (0, -1, BIG)}),
    (
        "dslm-complete",
        "{onnx} --file {root}/cursor.py --line 1",
        "--column {v}",
        {v: f"--column {v}: line 1 of" for v in (0, -1, BIG)},
    ),
]
ROWS = [
    (command, args, option, value, expected)
    for command, args, option, cases in SIZES
    for value, expected in cases.items()
]

HARNESS = """
import contextlib, io, json, sys, traceback
from importlib.metadata import entry_points
main = entry_points(group="console_scripts")[sys.argv[1]].load()
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            code = 1
            err.write(traceback.format_exc())
    print("ROW " + json.dumps([code, err.getvalue()]), flush=True)
"""
"""Runs rows of one command in one process, each through the command's own entry point (main,
run_command and all), and prints each row's exit status and stderr as it ends: a command that
would print a traceback lets its exception out of main."""


def run_rows(command: str, argvs: list[list[str]], cwd: str) -> list[tuple[int, str]]:
    """(exit status, stderr) of `command` with each of `argvs`, in as few processes as it takes: a
    row that ends the process itself (a native abort) gets that process's status and stderr, and
    the rows after it run in a new one."""
    results: list[tuple[int, str]] = []
    while len(results) < len(argvs):
        proc = subprocess.run(
            [sys.executable, "-c", HARNESS, command],
            input=json.dumps(argvs[len(results) :]),
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=1800,
        )
        results += [tuple(json.loads(line[4:])) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 and len(results) < len(argvs):
            results.append((proc.returncode, proc.stderr))
    return results


def option_argv(option: str) -> list[str]:
    """`--name VALUE` as two arguments, a `key=value` override as one (its value may hold spaces)."""
    return option.split() if option.startswith("--") else [option]


@pytest.fixture(scope="module")
def size_world(world, base_run, onnx_exports, code_corpus):
    """`world` with a run to evaluate and generate from, an ONNX export (and a copy of it to check
    against its checkpoint) and a file to complete in."""
    root = Path(world["root"])
    run = root / "sized-run"
    shutil.copytree(base_run, run)  # eval writes its results into the run
    (root / "cursor.py").write_text("def f(x):\n    return x\n")
    onnx_copy = shutil.copytree(onnx_exports[2], root / "onnx-copy")  # --parity writes parity.json into it
    return {
        **world,
        "run": str(run),
        "onnx": str(onnx_exports[2]),
        "onnx_copy": str(onnx_copy),
        "corpus": str(code_corpus / "json"),
    }


@pytest.fixture(scope="module")
def size_results(size_world) -> dict[tuple, tuple[int, str]]:
    """(command, args, option, value) -> (exit status, stderr) of every row of SIZES."""
    results = {}
    for command in dict.fromkeys(row[0] for row in ROWS):
        rows = [row for row in ROWS if row[0] == command]
        argvs = [
            args.format(**size_world).split()
            + option_argv(option.format(v=value, **size_world))
            + (["--print-run-dir"] if expected is None and command == "dslm-train" else [])
            for _, args, option, value, expected in rows
        ]
        results |= {row[:4]: result for row, result in zip(rows, run_rows(command, argvs, size_world["root"]))}
    return results


@pytest.mark.parametrize(
    "command, args, option, value, expected",
    ROWS,
    ids=[f"{c}-{o.split('=')[0].split()[0]}={v}" for c, _, o, v, _ in ROWS],
)
def test_every_numeric_option_at_0_minus_1_and_a_billion(size_results, command, args, option, value, expected):
    code, stderr = size_results[(command, args, option, value)]
    errors = [line for line in stderr.splitlines() if line.startswith(f"{command}: error:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    if expected is None:
        assert code == 0 and not errors, stderr[-3000:]
    else:
        assert code == 2 and len(errors) == 1 and expected in errors[0], stderr[-3000:]


def test_the_largest_values_dslm_train_accepts_train(world, tmp_path):
    """The rows above that dslm-train accepts at 10**9 end at --print-run-dir; here they train
    together, one step, with validation and a checkpoint."""
    settings = [
        f"train.{name}={BIG}"
        for name in (
            "seed",
            "log_interval",
            "checkpoint_interval",
            "val_interval",
            "val_batches",
            "max_skipped_in_a_row",
            "keep_last",
            "collective_timeout_s",
        )
    ]
    proc = subprocess.run(
        [
            BIN / "dslm-train",
            *TRAIN.format(**world).split(),
            f"runs_dir={tmp_path}",
            "name=big",
            f"data.shuffle_window={BIG}",
            "train.micro_batch_size=2",
            *settings,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "big" / "checkpoints" / "global_step1").is_dir()
