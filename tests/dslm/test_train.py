import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dslm.checkpoint.format import resume_problem, seal, sealed_state
from dslm.checkpoint.weights import load_fp32_weights, model_from, read_weights, weights_sha256
from dslm.config import load_config
from dslm.data.mix import Interleave, MixBase
from dslm.data.order import WindowOrder
from dslm.metrics import read_rows, read_scalars
from dslm.optim import OptimConfig, lr_factor
from dslm.run_dir import RunDir
from dslm_local.errors import EXIT_BAD_DATA, EXIT_RETRY, EXIT_STOPPED, EXIT_WRITE_FAILED

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def train_args(shards: Path, runs: Path, name: str = "t", **train) -> list[str]:
    settings = (
        dict(
            micro_batch_size=4,
            grad_accum=2,
            max_steps=30,
            warmup_steps=3,
            lr=3e-3,
            min_lr=3e-4,
            log_interval=5,
            checkpoint_interval=15,
            val_interval=15,
            val_batches=4,
        )
        | train
    )
    return [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]


def test_bad_override_is_one_line(tmp_path):
    proc = subprocess.run([BIN / "dslm-train", "train.max_steps=many"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.max_steps" in proc.stderr


def test_missing_shards_is_one_line(tmp_path):
    proc = subprocess.run(
        [BIN / "dslm-train", f"data.shards={tmp_path}/none"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dslm-train: error: the shards folder {tmp_path}/none does not exist: build it with `dslm-shard build`, "
        f"or, if the shards moved (a moved or copied run), name where they are now (data.shards=PATH)"
    ]


def test_freezing_more_blocks_than_the_model_has_is_one_line(tiny_shards, tmp_path):
    args = train_args(tiny_shards[0], tmp_path, max_steps=2, warmup_steps=1) + ["train.freeze_blocks=3"]
    proc = subprocess.run([BIN / "dslm-train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("train.freeze_blocks=3 is more than the model's 2 blocks (model.n_layer)")
    )


@pytest.mark.slow
def test_two_rank_zero2_bf16_run_trains_checkpoints_and_evaluates(tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    subprocess.run([*launch, *train_args(shards, tmp_path)], cwd=tmp_path, check=True, timeout=900)
    run = tmp_path / "t"

    loss = read_scalars(run / "tb", "train/loss")
    assert [step for step, _ in loss] == [5, 10, 15, 20, 25, 30]
    assert loss[-1][1] < loss[0][1] - 1.0, loss
    assert [step for step, _ in read_scalars(run / "tb", "train/lr")] == [5, 10, 15, 20, 25, 30]
    assert all(v > 0 for _, v in read_scalars(run / "tb", "train/tokens_per_s"))
    assert all(0 < v < 100 for _, v in read_scalars(run / "tb", "train/grad_norm"))
    assert_csv_matches_tensorboard(run)

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step30" and (ckpts / "best").read_text() == "global_step30"
    for tag in ("global_step15", "global_step30"):
        files = sorted(p.name for p in (ckpts / tag).iterdir())
        assert "mp_rank_00_model_states.pt" in files and sum("optim_states" in f for f in files) == 2
    assert load_config(run / "config.yaml", []).train.max_steps == 30

    evaluate = [BIN / "dslm-eval", run, "--metrics", "perplexity"]
    subprocess.run(evaluate, cwd=tmp_path, check=True, timeout=900)
    results = {s: json.loads((run / "eval" / f"step{s}.json").read_text())["perplexity"]["all"] for s in (15, 30)}
    assert results[30]["loss"] < results[15]["loss"] < 6.0
    # during training: bf16, 4 micro-batches per rank of the val split; dslm-eval: fp32, all of it
    val = dict(read_scalars(run / "tb", "val/loss"))
    assert sorted(val) == [15, 30] and abs(val[30] - results[30]["loss"]) < 0.2, (val, results)
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [15, 30]
    again = subprocess.run(evaluate, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "steps 15, 30: already evaluated" in again.stdout
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [15, 30]

    subprocess.run([BIN / "dslm-export", ckpts / "global_step30"], cwd=tmp_path, check=True, timeout=900)
    assert len({p.stat().st_mode for p in (run / "export" / "step30").iterdir()}) == 1  # safetensors' file too
    transformers = pytest.importorskip("transformers", reason="checking the export needs `transformers`")
    hf = transformers.GPT2LMHeadModel.from_pretrained(run / "export" / "step30").eval()
    model = model_from(*read_weights(ckpts / "global_step30")[:2])
    tokens = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "export" / "step30")
    assert tokenizer.bos_token_id == 2 and tokenizer.eos_token_id == 3


@pytest.mark.slow
def test_dslm_train_runs_as_a_single_process(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, max_steps=4, warmup_steps=2, log_interval=1, checkpoint_interval=4)
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900)
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == [1, 2, 3, 4]
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == "global_step4"
    state = sealed_state(tmp_path / "t" / "checkpoints" / "global_step4")
    assert state.train_seconds > 0 and state.hardware.startswith("1 x ")  # what the model card states
    # train/lr is the rate each step ran at: step 1 at half the peak (warmup), never the next step's
    schedule = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2)
    logged = read_scalars(tmp_path / "t" / "tb", "train/lr")
    assert [v for _, v in logged] == pytest.approx([3e-3 * lr_factor(s - 1, schedule, 4) for s in (1, 2, 3, 4)])
    assert logged[0][1] == pytest.approx(1.5e-3) and logged[-1][1] > 3e-4


@pytest.mark.slow
def test_each_step_line_reaches_a_pipe_as_it_is_logged(tiny_shards, tmp_path, paused):
    """A batch job's log is a file, not a terminal: the console lines must not wait in a buffer
    until the run ends, and each starts a line of its own, also where the progress bar shares
    the file (stderr and stdout into one log). Read while the run is paused after step 2."""
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, max_steps=4, warmup_steps=2, log_interval=1, checkpoint_interval=4)
    proc = subprocess.Popen(
        [BIN / "dslm-train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "DSLM_TEST_PAUSE": "step 2"},
    )

    def starts_a_line(step: int, log: bytes) -> bool:
        return re.search(rf"^step +{step} \|", log.decode().replace("\r", "\n"), re.M) is not None

    try:
        (rank,) = paused(proc, 1)
        os.set_blocking(proc.stdout.fileno(), False)
        so_far = proc.stdout.read() or b""
        assert starts_a_line(1, so_far) and starts_a_line(2, so_far), so_far[-2000:]
        rank.resume()
        os.set_blocking(proc.stdout.fileno(), True)
        assert starts_a_line(4, proc.communicate(timeout=900)[0])
    finally:
        proc.kill()


def logged_steps(path: Path) -> list[int]:
    """The steps of metrics.csv's complete rows so far."""
    return [int(row["step"]) for row in read_rows(path)[1]]


def assert_csv_matches_tensorboard(run: Path) -> None:
    """metrics.csv has each step once, and every scalar of every step that TensorBoard has."""
    columns, rows = read_rows(RunDir(run).metrics_csv)
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(set(steps)), "each step once in metrics.csv"
    tags = [c for c in columns if c not in ("step", "wall_time")]
    assert "train/loss" in tags
    for tag in tags:
        from_csv = {int(row["step"]): float(row[tag]) for row in rows if row[tag]}
        from_tb = dict(read_scalars(run / "tb", tag))
        assert from_csv.keys() == from_tb.keys(), tag
        assert [from_csv[s] for s in from_tb] == pytest.approx(list(from_tb.values()), rel=1e-6), tag  # TB: float32


@pytest.mark.slow
def test_killed_and_resumed_run_matches_a_straight_run_bitwise(tiny_shards, tmp_path, free_port, paused):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    settings = dict(max_steps=8, warmup_steps=2, log_interval=1, checkpoint_interval=4)
    dropout = ["model.dropout=0.1"]  # a mask at every step, from the RNG state the resume restores
    subprocess.run(
        [*launch, *train_args(shards, tmp_path, "straight", **settings), *dropout],
        cwd=tmp_path,
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
    )
    args = [*train_args(shards, tmp_path, "resumed", **settings), *dropout]
    first = subprocess.Popen(
        [*launch, *args],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DSLM_TEST_PAUSE": "step 5"},
    )
    paused(first, 2)  # a step past the checkpoint logged
    os.killpg(first.pid, signal.SIGKILL)  # the whole launch, like a node failure
    assert first.wait() == -signal.SIGKILL
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "global_step4"
    assert max(logged_steps(RunDir(tmp_path / "resumed").metrics_csv)) == 5
    subprocess.run(
        [*launch, *args, "--resume", "auto"], cwd=tmp_path, check=True, timeout=900, stdout=subprocess.DEVNULL
    )

    straight, resumed = (read_scalars(tmp_path / name / "tb", "train/loss") for name in ("straight", "resumed"))
    assert [step for step, _ in resumed] == list(range(1, 9)), "each step once in TensorBoard"
    assert_csv_matches_tensorboard(tmp_path / "resumed")
    assert resumed[4:] == straight[4:]  # steps 5-8, exactly
    assert read_scalars(tmp_path / "resumed" / "tb", "train/samples")[-1] == (8, 8 * 4 * 2 * 2)
    model_cfg = load_config(tmp_path / "straight" / "config.yaml", []).model
    weights = [
        load_fp32_weights(tmp_path / name / "checkpoints" / "global_step8", model_cfg)
        for name in ("straight", "resumed")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, max_steps=4, warmup_steps=1, log_interval=2, checkpoint_interval=2)
    fresh = subprocess.run(
        [BIN / "dslm-train", *args, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True
    )
    assert fresh.returncode == 2 and "no intact checkpoint" in fresh.stderr.splitlines()[-1]
    assert not (tmp_path / "t" / "config.yaml").exists(), "a refused start writes no config.yaml"
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    saved = (tmp_path / "t" / "config.yaml").read_text()
    again = subprocess.run(
        [BIN / "dslm-train", *args, "model.dropout=0.1"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 2 and "--resume auto" in again.stderr.splitlines()[-1]
    for change in ("train.lr=0.001", "model.n_layer=3"):  # what the checkpoint holds cannot change on resume
        refused = subprocess.run(
            [BIN / "dslm-train", *args, change, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True
        )
        assert refused.returncode == 2 and f"{change} differs from" in refused.stderr.splitlines()[-1], refused.stderr
    assert (tmp_path / "t" / "config.yaml").read_text() == saved, "refused starts leave the run's config.yaml as it was"
    damaged = tmp_path / "t" / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    longer = [a.replace("train.max_steps=4", "train.max_steps=6") for a in args]
    resumed = subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint" in resumed.stderr and "global_step4" in resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == [2, 4, 6]


@pytest.mark.slow
def test_resume_on_fewer_ranks_goes_through_a_universal_checkpoint(tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = train_args(shards, tmp_path, max_steps=4, warmup_steps=1, log_interval=2, checkpoint_interval=4)
    subprocess.run([*launch, *args], cwd=tmp_path, check=True, timeout=900, stdout=subprocess.DEVNULL)
    longer = [a.replace("train.max_steps=4", "train.max_steps=8") for a in args]
    one = subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert "on 1 rank instead of 2" in one.stdout
    checkpoints = tmp_path / "t" / "checkpoints"
    assert (checkpoints / "global_step4_universal").is_dir() and (checkpoints / "latest").read_text() == "global_step8"
    assert read_scalars(tmp_path / "t" / "tb", "train/samples")[-1] == (8, 4 * 16 + 4 * 8)
    loss = dict(read_scalars(tmp_path / "t" / "tb", "train/loss"))
    assert sorted(loss) == [2, 4, 6, 8]
    assert loss[6] < loss[2] - 0.3, "training restarted from scratch instead of from the checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_every_zero_stage_trains_resumes_and_loads_for_eval(tiny_shards, base_run, tmp_path, stage):
    shards, _ = tiny_shards
    args = [
        a.replace("zero2.json", f"zero{stage}.json")
        for a in train_args(
            shards,
            tmp_path,
            max_steps=2,
            warmup_steps=1,
            log_interval=1,
            checkpoint_interval=1,
            init_from=base_run,
            val_interval=0,
        )
    ]
    first = subprocess.run(
        [BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900, capture_output=True, text=True
    )
    assert f"engine: 1 rank on cpu, backend gloo, ZeRO stage {stage}, bfloat16 weights, AdamW\n" in first.stdout
    longer = [a.replace("train.max_steps=2", "train.max_steps=3") for a in args]
    subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, check=True, timeout=900, capture_output=True
    )
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == [1, 2, 3]
    # step 3 runs at the lr of the resumed run's schedule (3 steps), not the checkpointed one's (2: min_lr)
    lr = dict(read_scalars(tmp_path / "t" / "tb", "train/lr"))[3]
    assert lr == pytest.approx(3e-3 * lr_factor(2, OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1), 3)) and lr > 1e-3
    checkpoints = tmp_path / "t" / "checkpoints"
    model = model_from(*read_weights(checkpoints / "global_step3")[:2])
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    # the resume went on from step 2's weights (the base's, 0.05 away from any seed's): one Adam step of
    # lr 3e-3 away, clipped and decayed, never a fresh start
    resumed, saved = model.state_dict(), read_weights(checkpoints / "global_step2")[1]
    assert max((resumed[name] - saved[name]).abs().max().item() for name in saved) < 2 * 3e-3


def poison_weights(tag_dir: Path) -> None:
    """Put a NaN into the fp32 master weights of a sealed single-rank ZeRO-2 tag, and re-seal it."""
    path = tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(path, weights_only=False)
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][0] = float("nan")
    torch.save(state, path)
    seal(tag_dir, sealed_state(tag_dir))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_the_job(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(
        shards, tmp_path, max_steps=2, warmup_steps=1, log_interval=1, checkpoint_interval=2, max_skipped_in_a_row=3
    )
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    checkpoints = tmp_path / "t" / "checkpoints"
    poison_weights(checkpoints / "global_step2")
    longer = [a.replace("train.max_steps=2", "train.max_steps=10") for a in args]
    run = subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 2
    # Step 3 still runs on the loaded bf16 weights; the NaN master weight reaches them with its update.
    assert "steps 4-6 all had non-finite gradients" in run.stderr.splitlines()[-1]
    assert [v for _, v in read_scalars(tmp_path / "t" / "tb", "train/skipped_steps")] == [0, 0, 0, 1, 2]
    assert (checkpoints / "latest").read_text() == "global_step2"


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_checkpoints_both_at_the_same_step_and_resumes(
    tiny_shards, tmp_path, free_port, paused
):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = train_args(shards, tmp_path, max_steps=40, warmup_steps=2, log_interval=1, checkpoint_interval=1000)
    first = subprocess.Popen(
        [*launch, *args],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DSLM_TEST_PAUSE": "step 3"},
    )
    ranks = paused(first, 2)
    [rank1] = [p for p in ranks if "--local_rank=1" in p.cmdline()]
    rank1.send_signal(signal.SIGUSR1)  # rank 1 only, as SLURM might
    for rank in ranks:
        rank.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=900)[0]
    assert first.returncode == EXIT_STOPPED, output[-3000:]
    assert "stopped at step 3 on SIGUSR1" in output
    checkpoints = tmp_path / "t" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "global_step3"
    subprocess.run(
        [*launch, *args, "--resume", "auto"], cwd=tmp_path, check=True, timeout=900, stdout=subprocess.DEVNULL
    )
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == list(range(1, 41))


@pytest.mark.slow
def test_tied_and_padded_model_trains_and_exports(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, max_steps=2, warmup_steps=1, log_interval=1, checkpoint_interval=2)
    options = ["model.tie_embeddings=true", "model.vocab_multiple=128", "model.vocab_size=600"]
    subprocess.run([BIN / "dslm-train", *args, *options], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    tag_dir = tmp_path / "t" / "checkpoints" / "global_step2"
    model = model_from(*read_weights(tag_dir)[:2])
    assert model.lm_head.weight is model.wte.weight and model.wte.num_embeddings == 640
    subprocess.run([BIN / "dslm-export", tag_dir, tmp_path / "hf"], cwd=tmp_path, check=True, timeout=900)
    transformers = pytest.importorskip("transformers", reason="checking the export needs `transformers`")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_compiled_model_with_activation_checkpointing_trains_like_the_plain_one(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    losses = []
    for name, options in (("plain", []), ("compiled", ["train.compile=true", "train.activation_checkpointing=true"])):
        run_args = (
            train_args(
                shards,
                tmp_path,
                name,
                max_steps=2,
                warmup_steps=1,
                log_interval=1,
                checkpoint_interval=2,
                val_interval=0,
            )
            + options
        )
        subprocess.run([BIN / "dslm-train", *run_args], cwd=tmp_path, check=True, timeout=900, capture_output=True)
        losses.append([v for _, v in read_scalars(tmp_path / name / "tb", "train/loss")])
    assert losses[1] == pytest.approx(losses[0], abs=0.02)
    assert load_config(tmp_path / "compiled" / "config.yaml", []).train.compile
    model_from(*read_weights(tmp_path / "compiled" / "checkpoints" / "global_step2")[:2])


@pytest.mark.slow
def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer_and_records_its_origin(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    base = train_args(
        shards, tmp_path, "base", max_steps=12, warmup_steps=2, log_interval=1, checkpoint_interval=12, val_interval=0
    )
    subprocess.run([BIN / "dslm-train", *base], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    tuned = train_args(
        shards,
        tmp_path,
        "tuned",
        max_steps=2,
        warmup_steps=1,
        log_interval=1,
        checkpoint_interval=2,
        val_interval=0,
        lr=1e-4,
        min_lr=1e-5,
    ) + [f"train.init_from={tmp_path / 'base'}"]
    proc = subprocess.run([BIN / "dslm-train", *tuned], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tag = tmp_path / "base" / "checkpoints" / "global_step12"
    origin = load_config(tmp_path / "tuned" / "config.yaml", []).origin
    assert (origin.path, origin.step) == (str(tag), 12) and f"initialized from {tag}" in proc.stdout
    assert origin.sha256 == weights_sha256(read_weights(tag)[1])
    base_loss, tuned_loss = (read_scalars(tmp_path / name / "tb", "train/loss") for name in ("base", "tuned"))
    assert tuned_loss[0][1] < (base_loss[0][1] + base_loss[-1][1]) / 2  # it starts where the base ended
    state = sealed_state(tmp_path / "tuned" / "checkpoints" / "global_step2")
    assert (state.step, state.samples) == (2, 2 * 4 * 2)  # fresh step and data cursor

    longer = [a.replace("train.max_steps=2", "train.max_steps=3") for a in tuned]
    resumed = subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0 and "train.init_from" in resumed.stdout and "is ignored" in resumed.stdout
    assert load_config(tmp_path / "tuned" / "config.yaml", []).origin == origin  # the resumed run keeps it

    exported = subprocess.run([BIN / "dslm-export", tmp_path / "tuned"], capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-2000:]
    folder = RunDir(tmp_path / "tuned").export(3)
    card = (folder / "README.md").read_text()  # its figures: tests/dslm/test_model_card.py
    assert f"base_model: {tag}\n" in card and f"- `tuned` started from `{tag}` (step 12, " in card
    assert "- `base`: Trained from random weights" in card and "| hardware | 1 x " in card
    assert "| wall time | not recorded |" not in card and (folder / "loss_curve.png").stat().st_size > 0


def dslm_train(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "dslm-train", *args], cwd=cwd, capture_output=True, text=True, timeout=900, **kwargs)


def test_a_fine_tune_takes_its_model_from_its_source_and_refuses_another(tiny_shards, tmp_path):
    """train.init_from's model is the fine-tune's: a source trained with sizes other than its
    preset's fine-tunes under a recipe that names only the preset; a model.* given that differs
    from the source's is one line naming it and both values, before the run directory exists."""
    shards, _ = tiny_shards
    one_step = dict(
        max_steps=1, warmup_steps=0, checkpoint_interval=1, val_interval=0, micro_batch_size=2, grad_accum=1
    )
    sizes = ["model.n_layer=1", "model.n_head=2", "model.n_embd=64", "model.intermediate_size=256"]
    source = dslm_train(train_args(shards, tmp_path, "source", **one_step) + sizes, tmp_path)
    assert source.returncode == 0, source.stderr[-2000:]
    init_from = f"train.init_from={tmp_path / 'source'}"
    tuned = dslm_train(train_args(shards, tmp_path, "tuned", **one_step) + [init_from], tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    source_model = load_config(tmp_path / "source" / "config.yaml", []).model
    assert load_config(tmp_path / "tuned" / "config.yaml", []).model == source_model
    assert (source_model.n_layer, source_model.n_embd) == (1, 64)
    for override, line in [
        ("model.n_embd=128", "model.n_embd=128 but train.init_from={} has model.n_embd=64"),
        ("model.preset=code-33m", "model.preset=code-33m but train.init_from={} has model.preset=tiny"),
    ]:
        refused = dslm_train(train_args(shards, tmp_path, "refused", **one_step) + [init_from, override], tmp_path)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("dslm-train: error:")]
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert len(errors) == 1 and line.format(tmp_path / "source") in errors[0], refused.stderr[-2000:]
        assert not (tmp_path / "refused").exists()


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed dslm-train (no traceback before it)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dslm-train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_resume_if_any_starts_fresh_when_nothing_is_intact_and_auto_still_refuses(
    tiny_shards, tmp_path, write_checkpoint
):
    shards, _ = tiny_shards
    args = train_args(
        shards, tmp_path, max_steps=2, warmup_steps=1, log_interval=1, checkpoint_interval=2, val_interval=0
    )
    checkpoints = tmp_path / "t" / "checkpoints"
    # nothing at all (a job requeued before its first checkpoint), then an interrupted first save
    for leftovers in ([], ["unsealed"]):
        if leftovers:
            write_checkpoint(tmp_path / "t", 2, {"module": {}}, sealed=False)
            refused = dslm_train([*args, "--resume", "auto"], tmp_path)
            assert refused.returncode == 2 and "no intact checkpoint" in error_line(refused)
        started = dslm_train([*args, "--resume", "if-any"], tmp_path)
        assert started.returncode == 0, started.stderr[-3000:]
        assert "--resume if-any: no intact checkpoint" in started.stdout and "starting fresh" in started.stdout
        assert ("never sealed" in started.stderr) == bool(leftovers)
        assert (checkpoints / "latest").read_text() == "global_step2"
        if not leftovers:
            shutil.rmtree(tmp_path / "t")
    # a sealed tag damaged on disk: moved aside, not resumed and not deleted
    damaged = checkpoints / "global_step2" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    started = dslm_train([*args, "--resume", "if-any"], tmp_path)
    assert started.returncode == 0 and "starting fresh" in started.stdout, started.stderr[-3000:]
    assert (checkpoints / "abandoned" / "unresumable" / "global_step2").is_dir()
    assert (checkpoints / "latest").read_text() == "global_step2" and resume_problem(
        checkpoints / "global_step2"
    ) is None
    # with an intact tag, if-any resumes like auto
    longer = [a.replace("train.max_steps=2", "train.max_steps=3") for a in args]
    resumed = dslm_train([*longer, "--resume", "if-any"], tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]


def limit_file_size(limit: int):
    """preexec_fn: files of at most `limit` bytes (RLIMIT_FSIZE); a longer write fails with EFBIG
    instead of killing the process with SIGXFSZ."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def assert_save_failed(proc: subprocess.CompletedProcess, checkpoints: Path, os_error: str) -> None:
    """The failed save of step 4 left the step-2 checkpoint as it was."""
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"checkpoint global_step4 could not be saved in {checkpoints}" in line and os_error in line, line
    assert not (checkpoints / "global_step4").exists(), "the partial tag is removed"
    assert (checkpoints / "latest").read_text() == "global_step2"
    assert resume_problem(checkpoints / "global_step2") is None


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_fails_with_one_line_and_keeps_the_previous_one(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(
        shards,
        tmp_path,
        max_steps=2,
        warmup_steps=1,
        log_interval=1,
        checkpoint_interval=2,
        val_interval=0,
        keep_last=0,
    )
    assert dslm_train(args, tmp_path).returncode == 0
    checkpoints = tmp_path / "t" / "checkpoints"
    sizes = [p.stat().st_size for p in (checkpoints / "global_step2").iterdir()]
    longer = [*(a.replace("train.max_steps=2", "train.max_steps=4") for a in args), "--resume", "auto"]
    # the file size limit (ulimit -f): the largest file of the tag fails with EFBIG
    too_large = dslm_train(longer, tmp_path, preexec_fn=limit_file_size(max(sizes) // 2))
    assert_save_failed(too_large, checkpoints, "[Errno 27] File too large")
    # a full disk: a filesystem with room for half a tag more
    kept = tmp_path / "kept"
    shutil.move(checkpoints, kept)
    checkpoints.mkdir()
    size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 65536}", "tmpfs", checkpoints]
    ).returncode:
        pytest.skip("a small filesystem for the full-disk case needs `mount -t tmpfs` (root)")
    try:
        for p in kept.iterdir():
            shutil.copytree(p, checkpoints / p.name) if p.is_dir() else shutil.copy(p, checkpoints)
        full = dslm_train(longer, tmp_path)
        assert_save_failed(full, checkpoints, "[Errno 28] No space left on device")
    finally:
        subprocess.run(["umount", checkpoints], check=True)
    shutil.rmtree(checkpoints)
    shutil.move(kept, checkpoints)
    again = dslm_train(longer, tmp_path)  # with the space back, the same command goes on
    assert again.returncode == 0 and (checkpoints / "latest").read_text() == "global_step4", again.stderr[-3000:]


def test_a_taken_rendezvous_port_is_a_retryable_failure(tiny_shards, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        # the config, the shards and the sizes are checked first
        proc = dslm_train(
            ["--deepspeed", str(REPO / "ds_configs/zero2.json"), f"data.shards={tiny_shards[0]}"], tmp_path, env=env
        )
    assert proc.returncode == EXIT_RETRY
    line = error_line(proc)
    assert f"rendezvous at 127.0.0.1:{port} failed" in line and "EADDRINUSE" in line, line


@pytest.mark.slow
def test_a_stopped_rank_times_out_the_others_with_one_line_and_a_retryable_status(
    tiny_shards, tmp_path, free_port, logs
):
    shards, _ = tiny_shards
    args = train_args(
        shards,
        tmp_path,
        max_steps=500,
        warmup_steps=1,
        log_interval=1,
        checkpoint_interval=500,
        val_interval=0,
        collective_timeout_s=5,
    )
    ranks = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port),
            "OMP_NUM_THREADS": "1",
        }
        out = open(tmp_path / f"rank{rank}.out", "w")
        ranks.append(
            subprocess.Popen(
                [BIN / "dslm-train", *args], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        logs.wait_for(tmp_path / "rank0.out", "step      2 |", lambda: ranks[0].poll() is None)
        os.kill(ranks[1].pid, signal.SIGSTOP)  # a rank that stops answering, as on a stuck filesystem
        assert ranks[0].wait(timeout=900) == EXIT_RETRY, logs.read(tmp_path / "rank0.out")[-3000:]
    finally:
        ranks[1].kill()
        ranks[1].wait()
    text = logs.read(tmp_path / "rank0.out")
    assert "Traceback" not in text, text[-3000:]
    line = next(line for line in text.splitlines() if line.startswith("dslm-train: error:"))
    found = re.search(r"rank 0: collective \w+ \(in [\w.]+\) timed out after 5 s during step (\d+)", line)
    # rank 1 stops at no point the test controls: within the step after the last one rank 0 logged,
    # or at the boundary after that one (its stop-signal all-reduce)
    last_logged = max(int(n) for n in re.findall(r"^step +(\d+) \|", text, re.MULTILINE))
    assert found and last_logged >= 2 and int(found.group(1)) in (last_logged, last_logged + 1), line


@pytest.mark.slow
def test_resume_auto_after_a_rollback_continues_the_rollback_and_never_the_abandoned_step(
    tiny_shards, tmp_path, paused
):
    """Issue 15, item 1, exactly: 12 steps with a checkpoint every 3 and keep_last=2 (tags 9 and 12),
    resumed from global_step9 with checkpoint_interval=1 keep_last=1, stopped by SIGUSR1 at step 10."""
    shards, _ = tiny_shards
    args = train_args(
        shards,
        tmp_path,
        max_steps=12,
        warmup_steps=1,
        log_interval=1,
        checkpoint_interval=3,
        keep_last=2,
        val_interval=0,
    )
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    checkpoints = tmp_path / "t" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("global_step*")) == ["global_step12", "global_step9"]
    rollback = [
        a.replace("checkpoint_interval=3", "checkpoint_interval=1").replace("keep_last=2", "keep_last=1") for a in args
    ]
    proc = subprocess.Popen(
        [BIN / "dslm-train", *rollback, "--resume", str(checkpoints / "global_step9")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DSLM_TEST_PAUSE": "step 10"},
    )
    [rank] = paused(proc, 1)
    rank.send_signal(signal.SIGUSR1)
    rank.send_signal(signal.SIGCONT)
    output = [proc.communicate(timeout=900)[0]]
    assert proc.returncode == EXIT_STOPPED, "".join(output)[-3000:]
    aside = checkpoints / "abandoned" / "after_global_step9"
    assert "stopped at step 10 on SIGUSR1" in "".join(output)
    assert f"moved global_step12 (beyond global_step9, an abandoned branch) to {aside}" in "".join(output)
    assert (checkpoints / "latest").read_text() == "global_step10"
    assert [p.name for p in checkpoints.glob("global_step*")] == ["global_step10"]  # keep_last=1 of the live branch
    assert [p.name for p in aside.iterdir()] == ["global_step12"]

    resumed = subprocess.run(
        [BIN / "dslm-train", *rollback, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoints / 'global_step10'} at step 10" in resumed.stdout
    assert "skipping checkpoint" not in resumed.stderr
    assert [p.name for p in checkpoints.glob("global_step*")] == ["global_step12"]
    assert sealed_state(checkpoints / "global_step12").samples == 12 * 4 * 2
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == list(range(1, 13))


class TouchesOnLoad:
    """Unpickling it runs `touch PATH`: what a file that needs arbitrary unpickling can do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.slow
def test_resume_falls_back_past_changed_bytes_and_never_unpickles_code(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(
        shards,
        tmp_path,
        max_steps=6,
        warmup_steps=1,
        log_interval=2,
        checkpoint_interval=2,
        keep_last=3,
        val_interval=0,
    )
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    checkpoints, ran = tmp_path / "t" / "checkpoints", tmp_path / "ran"
    damaged = checkpoints / "global_step6" / "mp_rank_00_model_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: the seal's sizes alone would pass it
    damaged.write_bytes(bytes(data))
    planted = checkpoints / "global_step4" / "rng_rank00000.pt"
    torch.save({"python": TouchesOnLoad(ran)}, planted)
    seal(planted.parent, sealed_state(planted.parent))  # sealed with it: only the loading rule stops it

    explicit = subprocess.run(
        [BIN / "dslm-train", *args, "--resume", str(planted.parent)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert explicit.returncode == 2 and explicit.stderr.strip().splitlines()[-1] == (
        f"dslm-train: error: cannot resume from {planted.parent}: {planted}: refusing to load it: it needs arbitrary "
        f"unpickling (posix.system), and checkpoints are read with torch.load(weights_only=True)"
    )
    longer = [a.replace("train.max_steps=6", "train.max_steps=8") for a in args]
    auto = subprocess.run(
        [BIN / "dslm-train", *longer, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert (
        f"skipping checkpoint {damaged.parent}: mp_rank_00_model_states.pt does not match its xxh3_128 checksum"
        in auto.stderr
    )
    assert f"skipping checkpoint {planted.parent}: {planted}: refusing to load it" in auto.stderr
    assert f"resumed from {checkpoints / 'global_step2'} at step 2" in auto.stdout and not ran.exists()
    assert sorted(p.name for p in (checkpoints / "abandoned" / "after_global_step2").iterdir()) == [
        "global_step4",
        "global_step6",
    ]
    assert (checkpoints / "latest").read_text() == "global_step8"


@pytest.mark.slow
def test_the_resume_message_compares_the_actual_global_batches(tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = train_args(
        shards, tmp_path, max_steps=2, warmup_steps=1, log_interval=1, checkpoint_interval=1, val_interval=0
    )  # 4 x 2 x 2 ranks: 16 samples a step
    subprocess.run([*launch, *args], cwd=tmp_path, check=True, timeout=900, stdout=subprocess.DEVNULL)
    kept = [a.replace("max_steps=2", "max_steps=3").replace("grad_accum=2", "grad_accum=4") for a in args]
    one = subprocess.run(
        [BIN / "dslm-train", *kept, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert "on 1 rank instead of 2 (through global_step2_universal): the global batch stays 16 samples" in one.stdout
    halved = [a.replace("max_steps=2", "max_steps=4") for a in args]  # grad_accum back to 2
    again = subprocess.run(
        [BIN / "dslm-train", *halved, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "the global batch is now 8 samples, was 16 (x1/2); train.grad_accum=4 keeps it" in again.stdout
    assert read_scalars(tmp_path / "t" / "tb", "train/samples")[-1] == (4, 3 * 16 + 8)


def first_read_of_another_shard(shards: Path, manifest, min_position: int) -> tuple[int, int]:
    """(shard, position): the first shard the run's order (seed 1234, data.shuffle_window=1) starts
    reading at or after `min_position`, and that position."""
    order = WindowOrder([e.samples for e in manifest.split("train")], seed=1234, window=1, key=[0])
    starts = np.asarray(order.starts)
    shards_read = np.searchsorted(starts, order.indices(0, len(order)), side="right") - 1
    position = next(p for p in range(min_position, len(order)) if shards_read[p] != shards_read[p - 1])
    return int(shards_read[position]), position


@pytest.mark.slow
def test_a_damaged_shard_stops_every_rank_at_a_checkpoint_and_skipping_it_resumes_deterministically(
    tiny_shards, tmp_path, free_port
):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards[0], shards)
    manifest = tiny_shards[1]
    shard, position = first_read_of_another_shard(shards, manifest, min_position=2 * 16)
    damaged = manifest.split("train")[shard]
    with open(shards / damaged.name, "r+b") as f:  # cut short after the build, as by a partial copy
        f.truncate(damaged.bytes - 3000)
    global_batch, stop_step = 16, position // 16  # the step before the first that reads it
    max_steps = stop_step + 3
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    settings = dict(max_steps=max_steps, warmup_steps=2, log_interval=1, checkpoint_interval=1000, val_interval=0)

    def train(name, *extra, check=True):
        args = [*train_args(shards, tmp_path, name, **settings), "data.shuffle_window=1", *extra]
        proc = subprocess.run([*launch, *args], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert not check or proc.returncode == 0, proc.stderr[-3000:]
        return proc

    stopped = train("t", check=False)
    assert stopped.returncode == EXIT_BAD_DATA, stopped.stderr[-3000:]
    errors = [line for line in (stopped.stdout + stopped.stderr).splitlines() if "dslm-train: error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"{shards / damaged.name}: {damaged.bytes - 3000:,} bytes, the manifest says {damaged.bytes:,} (check the "
        f"folder: dslm-shard verify {shards}). The run stopped at step {stop_step} after a checkpoint ("
        f"{tmp_path / 't' / 'checkpoints' / f'global_step{stop_step}'}): rebuild the shard, then continue with "
        f"--resume auto (or set data.on_bad_shard=skip)"
    )
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == f"global_step{stop_step}"

    resumed = train("t", "data.on_bad_shard=skip", "--resume", "auto")
    straight = train("straight", "data.on_bad_shard=skip")
    for proc in (resumed, straight):
        assert (
            f"{shards / damaged.name}: " in proc.stderr
            and "its samples are skipped (data.on_bad_shard=skip)" in proc.stderr
        )
    skipped = read_scalars(tmp_path / "straight" / "tb", "data/skipped_samples")
    assert sum(v for _, v in skipped) == min(max_steps * global_batch - position, damaged.samples)
    assert [s for s, v in skipped if v] == list(range(stop_step + 1, max_steps + 1))
    assert read_scalars(tmp_path / "t" / "tb", "data/skipped_samples") == skipped[stop_step:]
    model_cfg = load_config(tmp_path / "straight" / "config.yaml", []).model
    weights = [
        load_fp32_weights(tmp_path / name / "checkpoints" / f"global_step{max_steps}", model_cfg)
        for name in ("straight", "t")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the skips repeat exactly


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_training_on_thousands_of_shards_runs_past_3000_steps_under_a_soft_limit_of_100(many_shards, tmp_path, workers):
    """Issue 27: torch passes each tensor from a worker as a file descriptor; a budget of the shards
    alone let a run under a low soft limit die mid-run (ConnectionResetError in rebuild_storage_fd).
    The default data settings, the hard limit left high."""
    shards, manifest = many_shards
    args = train_args(
        shards,
        tmp_path,
        grad_accum=1,
        max_steps=3001,
        warmup_steps=10,
        log_interval=1000,
        checkpoint_interval=3001,
        val_interval=0,
        keep_last=1,
    )
    zero0 = str(REPO / "ds_configs/zero0.json")  # the least work per step: the loader is what this tests
    smallest = ["model.n_layer=1", "model.n_embd=16", "model.n_head=1"]
    command = shlex.join(
        [str(BIN / "dslm-train"), *args, *smallest, f"data.num_workers={workers}", "--deepspeed", zero0]
    )
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -Sn 100 && exec {command}"], cwd=tmp_path, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_scalars(tmp_path / "t" / "tb", "train/samples")[-1] == (3001, 3001 * 4)
    assert len(manifest.split("train")) > 2000


@pytest.mark.slow
def test_a_mix_logs_each_source_and_resumes_on_one_rank_with_new_weights_but_not_new_sources(
    tiny_shards, other_shards, tmp_path, free_port
):
    code, other = tiny_shards[0], other_shards[0]

    def mix(*sources):
        return "data.mix=[" + ", ".join(f"{{shards: {s}, weight: {w}}}" for s, w in sources) + "]"

    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = train_args(code, tmp_path, max_steps=4, warmup_steps=1, log_interval=2, checkpoint_interval=4)
    subprocess.run(
        [*launch, *args, mix((code, 0.7), (other, 0.3))],
        cwd=tmp_path,
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
    )
    longer = [a.replace("train.max_steps=4", "train.max_steps=8") for a in args]
    one = subprocess.run(
        [BIN / "dslm-train", *longer, mix((code, 0.5), (other, 0.5)), "--resume", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    cursors = Interleave([0.7, 0.3]).cursors(64)
    assert (
        f"data.mix weights [0.7, 0.3] -> [0.5, 0.5] from sample 64 on; each source continues from its cursor "
        f"({code.name} {cursors[0]}, {other.name} {cursors[1]})"
    ) in one.stdout
    tb = tmp_path / "t" / "tb"
    expected = Interleave([0.5, 0.5], MixBase(64, cursors)).cursors(64 + 4 * 8)
    assert [v for _, v in read_scalars(tb, f"data/samples/{code.name}")] == [
        Interleave([0.7, 0.3]).cursors(32)[0],
        cursors[0],
        expected[0] - 8,
        expected[0],
    ]
    assert read_scalars(tb, f"data/samples/{other.name}")[-1] == (8, expected[1])
    for name in (code.name, other.name):
        losses = read_scalars(tb, f"train/loss/{name}")
        assert [s for s, _ in losses] == [2, 4, 6, 8] and all(0 < v < 10 for _, v in losses)
    assert sealed_state(tmp_path / "t" / "checkpoints" / "global_step8").mix["base"] == {
        "samples": 64,
        "cursors": cursors,
    }
    fewer = subprocess.run(
        [BIN / "dslm-train", *longer, "train.max_steps=9", "--resume", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fewer.returncode == 2 and fewer.stderr.strip().splitlines()[-1].endswith(
        f"this run reads data.shards alone, but the checkpoint's was trained on data.mix ['{code.name}', "
        f"'{other.name}']: a resumed run keeps its sources, whose cursors its checkpoint holds; set data.mix back, "
        f"or start a new run with train.init_from"
    )


def test_a_hard_open_file_limit_too_low_for_the_loader_is_one_line_before_the_process_group(tiny_shards, tmp_path):
    """Issue 27 (a new user's try): under `ulimit -n 20` the start used to reach the rendezvous,
    whose store retried on EMFILE for 600 s in C++, deaf to SIGTERM. The loader's budget is
    checked before the process group exists."""
    shards, _ = tiny_shards
    command = shlex.join([str(BIN / "dslm-train"), *train_args(shards, tmp_path, max_steps=2, warmup_steps=1)])
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -n 20 && exec {command}"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dslm-train: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "open files per process" in errors[0] and "but the limit is 20 (ulimit -n)" in errors[0]
    assert "data.max_open_shards" in errors[0].split("ulimit -n):")[1]
