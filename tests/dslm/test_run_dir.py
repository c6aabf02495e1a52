"""Issue 28: a run directory is a relocatable artifact. A run trained from one directory, with the
paths typed relative to it, is evaluated, generated from, exported and resumed from another
directory, after it was moved, and without its shards where only they are needed."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dslm.config import ds_config_path, packaged_ds_config
from dslm.data.manifest import Manifest
from dslm.files import sha256_file
from dslm.metrics import read_scalars
from dslm.run_dir import RunDir

BIN = Path(sys.executable).parent
STEPS = 4


def run(command: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900)


def errors(proc: subprocess.CompletedProcess, command: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{command}: error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """(run directory, shards): dslm-train run from a directory outside the repository, without
    --deepspeed, with the shards and the runs folder typed relative to it."""
    root = tmp_path_factory.mktemp("reloc")
    shutil.copytree(tiny_shards[0], root / "data" / "code")
    (work := root / "work").mkdir()
    proc = run(
        "dslm-train",
        "name=reloc",
        "runs_dir=runs",
        "data.shards=../data/code",
        "model.preset=tiny",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=1",
        f"train.checkpoint_interval={STEPS}",
        "train.val_interval=0",
        "train.log_interval=1",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "reloc", root / "data" / "code"


@pytest.fixture
def moved(trained, tmp_path) -> tuple[Path, Path]:
    """(a copy of the trained run moved to another folder and name, an empty working directory)."""
    shutil.copytree(trained[0], tmp_path / "copy")
    shutil.move(tmp_path / "copy", target := tmp_path / "elsewhere" / "renamed")
    (cwd := tmp_path / "nowhere").mkdir()
    return target, cwd


@pytest.mark.slow
def test_a_run_records_absolute_paths_its_tokenizer_and_its_resolved_deepspeed_config(trained):
    run_dir, shards = trained
    saved = yaml.safe_load(RunDir(run_dir).config.read_text())
    assert saved["data"]["shards"] == str(shards)
    assert saved["given"] == {"data.shards": "../data/code"}
    # the packaged config by its portable name: found in the package wherever dslm is installed
    assert saved["ds_config"] == "ds_configs/zero2.json"
    assert Path(ds_config_path(saved["ds_config"])).samefile(packaged_ds_config())
    assert sha256_file(RunDir(run_dir).tokenizer) == Manifest.load(shards).tokenizer_sha256
    ds_config = json.loads(RunDir(run_dir).ds_config.read_text())
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_a_moved_run_evaluates_generates_and_exports_from_any_directory(moved):
    run_dir, cwd = moved
    evaluated = run("dslm-eval", run_dir, "--metrics", "perplexity", cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert RunDir(run_dir).eval_result(STEPS).is_file()
    generated = run("dslm-generate", run_dir, "--prompt", "def", "--max-new-tokens", "4", cwd=cwd)
    assert generated.returncode == 0 and "def" in generated.stdout, generated.stderr[-3000:]
    for args, folder in (
        [(), RunDir(run_dir).export(STEPS)],
        [("--format", "onnx"), RunDir(run_dir).export(STEPS, "-onnx")],
    ):
        exported = run("dslm-export", run_dir, *args, cwd=cwd)
        assert exported.returncode == 0 and (folder / "tokenizer.json").is_file(), exported.stderr[-3000:]


@pytest.mark.slow
def test_a_run_without_its_shards_generates_and_exports_and_eval_asks_for_them(moved, trained, tmp_path):
    run_dir, cwd = moved
    shards = trained[1]
    away = tmp_path / "shards-elsewhere"
    shutil.move(shards, away)  # the shards folder is not where the run recorded it
    try:
        assert run("dslm-generate", run_dir, "--prompt", "def", "--max-new-tokens", "2", cwd=cwd).returncode == 0
        assert run("dslm-export", run_dir, cwd=cwd).returncode == 0
        events = sorted(RunDir(run_dir).tb.iterdir())
        refused = run("dslm-eval", run_dir, "--metrics", "perplexity", cwd=cwd)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        (line,) = errors(refused, "dslm-eval")
        assert str(shards) in line and "--shards" in line
        assert sorted(RunDir(run_dir).tb.iterdir()) == events  # no event file for a refused eval
        other = run("dslm-eval", run_dir, "--metrics", "perplexity", "--shards", away, cwd=cwd)
        assert other.returncode == 0, other.stderr[-3000:]
    finally:
        shutil.move(away, shards)
    name = f"{away.name}-{hashlib.sha256((shards / 'manifest.json').read_bytes()).hexdigest()[:8]}"
    assert RunDir(run_dir).eval_result(STEPS, name).is_file()
    assert not RunDir(run_dir).eval_result(STEPS).exists()  # results on another shard set never overwrite the run's
    assert [step for step, _ in read_scalars(RunDir(run_dir).tb, f"eval/{name}/val_loss")] == [STEPS]
    with pytest.raises(KeyError):  # no scalar of the run's own eval
        read_scalars(RunDir(run_dir).tb, "eval/val_loss")


@pytest.mark.slow
def test_a_moved_run_resumes_in_its_new_folder(moved, trained):
    run_dir, cwd = moved
    resumed = run(
        "dslm-train",
        "--config",
        RunDir(run_dir).config,
        "--resume",
        "auto",
        f"train.max_steps={STEPS + 2}",
        f"train.checkpoint_interval={STEPS + 2}",
        cwd=cwd,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {RunDir(run_dir).tag(STEPS)}" in resumed.stdout
    assert RunDir(run_dir).tag(STEPS + 2).is_dir()
    assert not RunDir(trained[0]).tag(STEPS + 2).exists() and not (cwd / "runs").exists()


@pytest.mark.slow
def test_a_run_written_before_paths_were_absolute_still_reads_and_resumes_from_its_directory(trained, tmp_path):
    """The old format: paths relative to the directory it was trained in, no tokenizer.json or
    ds_config.json in the run. Read from that directory with one warning line, and resumed."""
    run_dir, shards = trained
    shutil.copytree(shards, tmp_path / "data")
    old = RunDir(tmp_path / "runs" / "old")
    shutil.copytree(
        run_dir, old.path, ignore=shutil.ignore_patterns("tokenizer.json", "ds_config.json", "eval", "export")
    )
    saved = yaml.safe_load(old.config.read_text())
    saved["data"]["shards"], saved["ds_config"] = "data", "ds_configs/zero2.json"
    for key in ("given", "template"):
        del saved[key]
    old.config.write_text(yaml.safe_dump(saved))
    for command, *args in (
        ["dslm-eval", "--metrics", "perplexity"],
        ["dslm-generate", "--prompt", "def"],
        ["dslm-export"],
    ):
        proc = run(command, "runs/old", *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        warnings = [line for line in proc.stderr.splitlines() if "relative to the directory it was trained in" in line]
        assert len(warnings) == 1 and "data.shards=data" in warnings[0], proc.stderr[-3000:]
    resumed = run(
        "dslm-train",
        "--config",
        old.config,
        "--resume",
        "auto",
        f"train.max_steps={STEPS + 1}",
        f"train.checkpoint_interval={STEPS + 1}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0 and f"resumed from {old.tag(STEPS)}" in resumed.stdout, resumed.stderr[-3000:]
    saved = yaml.safe_load(old.config.read_text())  # written again as a run now writes it
    assert saved["data"]["shards"] == str(tmp_path / "data") and saved["given"]["data.shards"] == "data"
    assert old.tokenizer.is_file() and old.ds_config.is_file()
