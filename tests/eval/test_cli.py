"""dslm-eval on real runs: every checkpoint once, perplexity against transformers, --watch."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dslm.data.loader import ShardSamples
from dslm.data.manifest import Manifest
from dslm.metrics import read_scalars
from dslm.model_source import resolve_source
from dslm_eval.cli import main, shard_set_name
from dslm_eval.load import load_for_eval

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["--exact-match-samples", "6", "--compile-samples", "3", "--batch-size", "8"]


def train(shards: Path, runs: Path, name: str, steps: int, background: bool = False):
    settings = dict(
        micro_batch_size=4,
        max_steps=steps,
        warmup_steps=1,
        lr=3e-3,
        log_interval=2,
        checkpoint_interval=2,
        val_interval=0,
        keep_last=0,
    )
    cmd = [
        BIN / "dslm-train",
        "--deepspeed",
        REPO / "ds_configs/zero2.json",
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]
    if background:
        return subprocess.Popen(cmd, cwd=runs, stdout=subprocess.DEVNULL)
    subprocess.run(cmd, cwd=runs, check=True, timeout=900, stdout=subprocess.DEVNULL)
    return runs / name


@pytest.fixture(scope="module")
def run(tiny_shards, tmp_path_factory) -> Path:
    """A single-process tiny run with sealed checkpoints at steps 2 and 4."""
    return train(tiny_shards[0], tmp_path_factory.mktemp("runs"), "t", steps=4)


def export_result(export: Path) -> dict:
    """The one result dslm-eval wrote for an export (EXPORT/eval/SET.json)."""
    (path,) = (export / "eval").glob("*.json")
    return json.loads(path.read_text())


def test_a_shard_set_is_named_by_its_folder_and_manifest_and_a_copy_of_the_runs_own_is_its_own(
    run, tiny_shards, other_shards, tmp_path
):
    """Two sets in folders of the same name get two names (their results never overwrite each
    other's); a copy of the run's own shards elsewhere is the run's own."""
    source = resolve_source(run)
    copy, other = tmp_path / "a" / "val", tmp_path / "b" / "val"
    shutil.copytree(tiny_shards[0], copy)
    shutil.copytree(other_shards[0], other)
    assert shard_set_name(source, tiny_shards[0]) == shard_set_name(source, copy) == ""
    digest = hashlib.sha256((other / "manifest.json").read_bytes()).hexdigest()[:8]
    assert shard_set_name(source, other) == f"val-{digest}"
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + "\n")  # another build's
    assert shard_set_name(source, copy) not in ("", f"val-{digest}")


def test_each_checkpoint_is_evaluated_once_and_a_rerun_adds_nothing(run, capsys):
    main([str(run), *SMALL])
    out = capsys.readouterr().out
    results = {step: json.loads((run / "eval" / f"step{step}.json").read_text()) for step in (2, 4)}
    for step, result in results.items():
        assert result["step"] == step and f"step {step}" in out
        assert result["perplexity"]["all"]["tokens"] > 0 and result["perplexity"]["all"]["bpb"] > 0
        assert result["exact_match"]["languages"]["python"]["n"] == 6
        assert 0 <= result["compile_success"]["languages"]["python"]["rate"] <= 1
    assert results[4]["perplexity"]["all"]["loss"] < results[2]["perplexity"]["all"]["loss"], "training lowers val loss"
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "eval").iterdir()}
    for tag in ("eval/val_loss", "eval/val_bpb", "eval/exact_match/python", "eval/compile_rate/python"):
        assert [s for s, _ in read_scalars(run / "tb", tag)] == [2, 4], tag

    main([str(run), *SMALL])
    assert capsys.readouterr().out == "steps 2, 4: already evaluated (--force to redo)\n"
    assert {p: p.stat().st_mtime_ns for p in (run / "eval").iterdir()} == mtimes
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [2, 4], "a rerun adds nothing"


def test_perplexity_of_an_export_equals_transformers(run, tiny_shards, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the HF check needs `transformers` (pip install .[test])")
    shards, manifest = tiny_shards
    export = tmp_path / "export"
    subprocess.run(
        [BIN / "dslm-export", run / "checkpoints" / "global_step4", export],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    main([str(export), "--shards", str(shards), "--metrics", "perplexity"])
    ours = export_result(export)["perplexity"]["all"]

    hf = transformers.GPT2LMHeadModel.from_pretrained(export).eval()
    samples = ShardSamples(shards, manifest, "val")
    batch = torch.stack([samples[i]["input_ids"] for i in range(len(samples))])
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    nats = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum").item()
    assert ours["tokens"] == batch[:, 1:].numel()
    assert abs(ours["loss"] - nats / ours["tokens"]) < 1e-4
    assert abs(ours["ppl"] - math.exp(nats / ours["tokens"])) / ours["ppl"] < 1e-4


@pytest.mark.slow
def test_watch_follows_a_training_run_to_its_last_checkpoint(tiny_shards, tmp_path):
    training = train(tiny_shards[0], tmp_path, "w", steps=6, background=True)
    run = tmp_path / "w"
    while not (run / "config.yaml").exists():
        assert training.poll() is None, "training ended before writing its config"
        time.sleep(0.2)
    watcher = subprocess.run(
        [BIN / "dslm-eval", run, "--watch", "--poll", "1", "--metrics", "perplexity"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert watcher.returncode == 0, watcher.stderr[-2000:]
    assert training.wait(timeout=600) == 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step2.json", "step4.json", "step6.json"]
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [2, 4, 6]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}"], "is not a checkpoint (runs/NAME/checkpoints/global_stepN), a run directory or an export folder"),
        (["{run}", "--metrics", "perplexity,bleu"], "--metrics: bleu"),
        (["{run}/checkpoints/global_step2", "--watch"], "--watch follows a run directory"),
        (["{run}", "--device", "cuda:63"], "--device cuda:63: this machine has"),
    ],
)
def test_bad_input_is_one_line_and_status_2(run, tmp_path, args, message):
    argv = [a.format(tmp=tmp_path, run=run) for a in args]
    result = subprocess.run([BIN / "dslm-eval", *argv], capture_output=True, text=True, timeout=900)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "dslm-eval: error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_a_backward_export_is_measured_backward_and_its_code_metrics_skipped(run, tiny_shards, tmp_path, capsys):
    shards, manifest = tiny_shards
    export = tmp_path / "export"
    subprocess.run(
        [BIN / "dslm-export", run / "checkpoints" / "global_step4", export],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = json.loads((export / "config.json").read_text())
    assert (config["dslm_direction"], config["dslm_template"]) == ("forward", "")
    (export / "config.json").write_text(json.dumps({**config, "dslm_direction": "backward"}))
    main([str(export), "--shards", str(shards), *SMALL])
    result = export_result(export)
    assert "exact_match" not in result and "compile_success" not in result
    assert "this model reads backward (data.direction=backward): skipped" in capsys.readouterr().err

    model = load_for_eval(export).model
    samples = ShardSamples(shards, manifest, "val", direction="backward")
    batch = torch.stack([samples[i]["input_ids"] for i in range(len(samples))])
    with torch.no_grad():
        nats = F.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:], reduction="sum").item()
    assert abs(result["perplexity"]["all"]["loss"] - nats / batch[:, 1:].numel()) < 1e-4


def test_instruction_shards_are_scored_on_their_targets_in_the_masks_direction(run, tiny_shards, tmp_path, capsys):
    shards, _ = tiny_shards
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(json.dumps({"instruction": f"Add {i} to x.", "output": f"return x + {i}"}) + "\n" for i in range(40))
    )
    sft = tmp_path / "sft"
    subprocess.run(
        [
            BIN / "dslm-shard",
            "sft",
            "--source",
            records,
            "--template",
            "instruct",
            "--tokenizer",
            shards / "tokenizer.json",
            "--seq-len",
            "64",
            "--val-fraction",
            "0.5",
            "--out",
            sft,
        ],
        check=True,
        capture_output=True,
    )
    export = tmp_path / "export"
    subprocess.run(
        [BIN / "dslm-export", run / "checkpoints" / "global_step4", export],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    main([str(export), "--shards", str(sft), "--metrics", "perplexity"])
    scored = export_result(export)["perplexity"]["all"]
    samples = ShardSamples(sft, Manifest.load(sft), "val")
    targets = sum(int((samples[i]["labels"][1:] != -100).sum()) for i in range(len(samples)))
    assert scored["tokens"] == targets < len(samples) * 64  # only the responses and their closing markers

    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "dslm_direction": "backward"}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(export), "--shards", str(sft), "--metrics", "perplexity", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "were made for forward models and this one reads backward" in err[-1]
