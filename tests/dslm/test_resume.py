"""Resuming a run (dslm/checkpoint/resume.py) on every path, from weights no seed produces: a fine-tuned run
(train.init_from) whose frozen weights and LoRA base weights are not in the optimizer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.checkpoint.format import sealed_state
from dslm.checkpoint.weights import load_fp32_weights, read_weights
from dslm.config import load_config
from dslm.lora import BASE
from dslm.metrics import read_scalars
from dslm.model import GPT

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADAPTATIONS = {"lora": ["train.lora.rank=4", "train.lora.alpha=8"], "freeze": ["train.freeze_blocks=1"]}


def tuning_args(shards: Path, runs: Path, base: Path, stage: int, max_steps: int, *extra: str) -> list[str]:
    return [
        "--deepspeed",
        str(REPO / f"ds_configs/zero{stage}.json"),
        "name=t",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        f"train.init_from={base}",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=1",
        "train.lr=3e-3",
        "train.log_interval=1",
        "train.val_interval=0",
        "train.keep_last=0",
        *extra,
    ]


def launch(ranks: int, args: list[str], cwd: Path, port: int) -> subprocess.CompletedProcess:
    command = (
        [BIN / "dslm-train"]
        if ranks == 1
        else [BIN / "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), REPO / "dslm/train.py"]
    )
    proc = subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def tag_weights(run: Path, step: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A tag's fp32 weights, as the trained module names them, and the names of its frozen ones."""
    cfg = load_config(run / "config.yaml", [])
    tag = run / "checkpoints" / f"global_step{step}"
    return load_fp32_weights(tag, cfg.model, cfg.train.lora), sealed_state(tag).frozen


@pytest.mark.slow
@pytest.mark.parametrize("stage, adaptation", [(0, "freeze"), (1, "lora"), (2, "freeze"), (3, "lora")])
def test_frozen_weights_come_back_from_the_checkpoint_on_every_resume_path(
    tiny_shards, base_run, tmp_path, free_port, stage, adaptation
):
    """1 rank (steps 1-2), resumed on 1 rank (step 3, the same world size), on 2 ranks (step 4: 1 -> 2,
    DeepSpeed's universal form from ZeRO-1 on) and on 1 rank again (step 5: 2 -> 1). Every tag's frozen
    weights are the base's, bit for bit, never the seed's initialization."""
    shards, _ = tiny_shards
    runs = tmp_path / "runs"
    outputs = []
    for step, ranks in ((2, 1), (3, 1), (4, 2), (5, 1)):
        resume = ["--resume", "auto"] if step > 2 else []
        outputs.append(
            launch(
                ranks,
                tuning_args(
                    shards,
                    runs,
                    base_run,
                    stage,
                    step,
                    "train.checkpoint_interval=1",
                    *ADAPTATIONS[adaptation],
                    *resume,
                ),
                tmp_path,
                free_port,
            ).stdout
        )
    frozen_line = "LoRA adapters of rank 4" if adaptation == "lora" else "(14 tensors frozen)"
    assert "trainable parameters: " in outputs[0] and frozen_line in outputs[0]
    assert "on 2 ranks instead of 1" in outputs[2] and "on 1 rank instead of 2" in outputs[3]
    run = runs / "t"
    base = {name: t.bfloat16().float() for name, t in read_weights(base_run)[1].items()}  # as bf16 training holds it
    cfg = load_config(run / "config.yaml", [])
    torch.manual_seed(cfg.train.seed)
    seed_init = GPT(cfg.model).state_dict()
    first, frozen = tag_weights(run, 2)
    assert len(frozen) == (30 if adaptation == "lora" else 14)  # LoRA: every tensor of the model
    for name in frozen:
        plain = name.replace(BASE, ".")
        assert torch.equal(first[name], base[plain]) and not torch.equal(first[name], seed_init[plain]), name
    last = tag_weights(run, 5)[0]
    assert all(not torch.equal(first[name], last[name]) for name in first if name not in frozen)  # those train
    for step in (3, 4, 5):
        weights, frozen_then = tag_weights(run, step)
        assert frozen_then == frozen
        assert all(torch.equal(weights[name], first[name]) for name in frozen), f"step {step}: a frozen weight moved"
    loss = dict(read_scalars(run / "tb", "train/loss"))
    assert sorted(loss) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_resume_with_dropout_on_two_ranks_continues_bitwise(tiny_shards, base_run, tmp_path, free_port):
    """model.dropout and train.lora.dropout draw masks at every step: the RNG state a resume restores
    is the one the straight run had at that step, and nothing draws from it before training goes on."""
    shards, _ = tiny_shards
    runs, checkpoints = tmp_path / "runs", tmp_path / "runs" / "t" / "checkpoints"
    args = tuning_args(
        shards,
        runs,
        base_run,
        2,
        4,
        "train.checkpoint_interval=2",
        *ADAPTATIONS["lora"],
        "model.dropout=0.1",
        "train.lora.dropout=0.1",
    )
    launch(2, args, tmp_path, free_port)
    straight_loss = read_scalars(runs / "t" / "tb", "train/loss")
    launch(2, [*args, "--resume", str(checkpoints / "global_step2")], tmp_path, free_port)  # steps 3-4 again
    assert read_scalars(runs / "t" / "tb", "train/loss")[2:] == straight_loss[2:]  # steps 3 and 4, exactly
    cfg = load_config(runs / "t" / "config.yaml", [])
    straight = load_fp32_weights(
        checkpoints / "abandoned" / "after_global_step2" / "global_step4", cfg.model, cfg.train.lora
    )
    resumed, _ = tag_weights(runs / "t", 4)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_a_resume_at_another_zero_stage_goes_through_the_universal_form_or_is_one_line(
    tiny_shards, base_run, tmp_path, free_port
):
    """ZeRO-1 and 2 split the same optimizer state: a tag of one resumes at the other through its
    universal form (frozen weights loaded by dslm). DeepSpeed loads a ZeRO-1/2 tag into no ZeRO-3
    (or ZeRO-0) engine: one line, and the checkpoint folder is left as it was."""
    shards, _ = tiny_shards
    runs, checkpoints = tmp_path / "runs", tmp_path / "runs" / "t" / "checkpoints"
    launch(1, tuning_args(shards, runs, base_run, 1, 2, *ADAPTATIONS["freeze"]), tmp_path, free_port)
    before = sorted(p.name for p in checkpoints.iterdir())
    for stage in (3, 0):
        refused = subprocess.run(
            [
                BIN / "dslm-train",
                *tuning_args(shards, runs, base_run, stage, 3, *ADAPTATIONS["freeze"]),
                "--resume",
                "auto",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert (
            refused.stderr.strip()
            .splitlines()[-1]
            .endswith(
                f"was written at ZeRO stage 1 and this run asks for stage {stage}: DeepSpeed loads a ZeRO-1/2 checkpoint "
                f"only into ZeRO-1/2; resume with stage 1 (--deepspeed), or start a new run from its weights "
                f"(train.init_from)"
            )
        ), refused.stderr[-2000:]
        assert sorted(p.name for p in checkpoints.iterdir()) == before
    resumed = launch(
        1, [*tuning_args(shards, runs, base_run, 2, 3, *ADAPTATIONS["freeze"]), "--resume", "auto"], tmp_path, free_port
    )
    assert "at another ZeRO stage than the checkpoint's (through global_step2_universal)" in resumed.stdout
    (first, frozen), (then, _) = tag_weights(runs / "t", 2), tag_weights(runs / "t", 3)
    assert frozen and all(torch.equal(first[name], then[name]) for name in frozen)
