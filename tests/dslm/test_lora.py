"""LoRA adapters (train.lora): they start as the identity, only they train, a merge gives the plain
GPT the adapted logits, and a LoRA run's checkpoint reads, exports and evaluates as a plain GPT."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.checkpoint.resume import check_same_settings
from dslm.checkpoint.weights import load_fp32_weights, model_from, read_weights
from dslm.config import RunConfig, load_config, save_config
from dslm.data.loader import DataConfig
from dslm.errors import DslmError
from dslm.lora import LoraConfig, add_adapters, merge_lora_weights
from dslm.metrics import read_scalars
from dslm.model import GPT, ModelConfig
from dslm.optim import build_optimizer, freeze, param_groups
from dslm.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=600, block_size=32)
LORA = LoraConfig(rank=4, alpha=8.0)


def tokens(cfg: ModelConfig = CFG, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: GPT, cfg: ModelConfig = CFG) -> torch.Tensor:
    return model.eval()(tokens(cfg))


def adapted(source: GPT, lora: LoraConfig = LORA) -> GPT:
    """A copy of `source` with adapters."""
    model = GPT(source.cfg)
    model.load_state_dict(source.state_dict())
    add_adapters(model, lora)
    return model


def train_a_few_steps(model: GPT, steps: int = 3) -> None:
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0, max_steps=steps), steps)
    model.train()
    for step in range(steps):
        model(tokens(seed=step), tokens(seed=step + 10)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_adapters_start_as_the_model_and_only_they_train(trained_looking):
    source = trained_looking(CFG)
    model = adapted(source)
    assert torch.equal(logits(model), logits(source))  # B starts at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * CFG.n_layer and all(".lora_" in name for name in trainable)
    assert "blocks.0.attn.qkv.lora_A.default.weight" in trainable and "lm_head.weight" in model.state_dict()
    assert "blocks.1.mlp.proj.base_layer.weight" in model.state_dict()
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [16]  # no empty group (DeepSpeed would drop it)

    train_a_few_steps(model)
    after = model.state_dict()
    for name, tensor in source.state_dict().items():  # every weight of the model itself, bitwise
        layer, _, kind = name.rpartition(".")
        assert torch.equal(after.get(name, after.get(f"{layer}.base_layer.{kind}")), tensor), name
    assert all(after[name].abs().max() > 0 for name in trainable if ".lora_B." in name)


def test_merged_weights_give_the_plain_gpt_the_adapted_logits(trained_looking):
    model = adapted(trained_looking(CFG), LoraConfig(rank=4, alpha=16.0, dropout=0.1))
    train_a_few_steps(model)
    merged = merge_lora_weights(model.state_dict(), LoraConfig(rank=4, alpha=16.0))
    plain = model_from(CFG, merged)
    assert set(merged) == set(GPT(CFG).state_dict())
    assert (logits(plain) - logits(model)).abs().max().item() < 1e-4
    assert (logits(plain) - logits(trained_looking(CFG))).abs().max().item() > 1e-2  # the adapters did something
    assert merge_lora_weights(merged, LoraConfig()) is merged  # rank 0: nothing to merge


def test_freeze_applies_on_top_of_the_adapters():
    model = GPT(CFG)
    add_adapters(model, LoraConfig(rank=2, target_modules=["qkv", "attn.proj"]))
    frozen_adapters = freeze(model, ["blocks.0.*"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"blocks.1.attn.{layer}.lora_{x}.default.weight" for layer in ("qkv", "proj") for x in "AB"]
    assert "blocks.0.attn.qkv.lora_A.default.weight" in frozen_adapters


@pytest.mark.parametrize(
    "target, message",
    [
        ("nope", "'nope' matches no layer (the nn.Linear layers are fc, lm_head, proj, qkv)"),
        ("attn", "'attn' matches blocks.0.attn, a CausalSelfAttention; adapters go on nn.Linear layers"),
    ],
)
def test_a_target_that_is_no_linear_layer_is_one_line(target, message):
    with pytest.raises(DslmError, match=re.escape(message)):
        add_adapters(GPT(CFG), LoraConfig(rank=2, target_modules=["qkv", target]))


def test_a_tied_head_takes_no_adapter():
    tied = GPT(ModelConfig(preset="tiny", tie_embeddings=True))
    with pytest.raises(DslmError, match="matches lm_head, whose weight is tied"):
        add_adapters(tied, LoraConfig(rank=2, target_modules=["lm_head"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lora.rank=-1", "train.lora.rank=-1 must not be negative"),
        ("train.lora.alpha=0", "train.lora.alpha=0.0 must be positive"),
        ("train.lora.dropout=1.0", "train.lora.dropout=1.0 must be within [0, 1)"),
        ("train.lora.dropout=-0.1", "train.lora.dropout=-0.1 must be within [0, 1)"),
        ("train.lora.target_modules=[]", "train.lora.target_modules is empty"),
    ],
)
def test_bad_settings_name_the_field(override, message):
    with pytest.raises(DslmError, match=re.escape(message)):
        load_config(None, [override, "train.lora.rank=4"] if "target" in override else [override])


def test_a_bad_setting_stops_dslm_train_with_one_line(tmp_path):
    proc = subprocess.run([BIN / "dslm-train", "train.lora.alpha=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "train.lora.alpha" in proc.stderr


def test_a_target_that_matches_nothing_stops_dslm_train_with_one_line(tiny_shards, tmp_path):
    args = [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        f"data.shards={tiny_shards[0]}",
        f"runs_dir={tmp_path}",
        "train.lora.rank=4",
        "train.lora.target_modules=[qkv,mlp.nope]",
    ]
    proc = subprocess.run([BIN / "dslm-train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "dslm-train: error: train.lora.target_modules: 'mlp.nope' matches no layer "
        "(the nn.Linear layers are fc, lm_head, proj, qkv)"
    )
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_resumed_run_keeps_its_adapters_but_not_their_dropout(tmp_path):
    saved = load_config(None, ["train.lora.rank=4"])
    check_same_settings(load_config(None, ["train.lora.rank=4", "train.lora.dropout=0.1"]), tmp_path, saved)
    for change, message in (
        ("train.lora.rank=8", "train.lora.rank=8 differs from 4"),
        ("train.lora.alpha=4", "train.lora.alpha=4.0 differs from 16.0"),
        ("train.lora.target_modules=[qkv]", "train.lora.target_modules=['qkv'] differs"),
    ):
        with pytest.raises(DslmError, match=re.escape(message)):
            check_same_settings(load_config(None, ["train.lora.rank=4", change]), tmp_path, saved)


def test_a_lora_checkpoint_reads_as_the_merged_plain_gpt(tmp_path, tiny_shards, trained_looking, write_checkpoint):
    model = adapted(trained_looking(CFG))
    train_a_few_steps(model)
    cfg = RunConfig(
        name="lora",
        runs_dir=str(tmp_path),
        model=CFG,
        data=DataConfig(shards=str(tiny_shards[0])),
        train=TrainConfig(lora=LORA),
    )
    save_config(cfg)
    write_checkpoint(cfg.run_dir.path, 3, {"module": model.state_dict()})  # ZeRO-0's fp32 layout
    tag = cfg.run_dir.tag(3)
    assert set(load_fp32_weights(tag, CFG, LORA)) == set(model.state_dict())  # what resuming reads: the adapters
    for path in (tag, cfg.run_dir.path):  # what eval and train.init_from read: the plain GPT
        model_cfg, weights, _ = read_weights(path)
        assert (logits(model_from(model_cfg, weights)) - logits(model)).abs().max().item() < 1e-4


# ---- end to end: a LoRA run on 2 ranks at ZeRO-2, fine-tuning a checkpoint ----

TINY = ModelConfig(preset="tiny")


def lora_args(shards: Path, runs: Path, source: Path, max_steps: int) -> list[str]:
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=max_steps,
        warmup_steps=2,
        lr=1e-2,
        min_lr=1e-3,
        log_interval=1,
        checkpoint_interval=10,
        val_interval=10,
        val_batches=2,
        init_from=source,
    )
    return [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        "name=lora",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        "train.lora.rank=4",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]


def write_source(model: GPT, runs: Path, shards: Path, write_checkpoint) -> Path:
    """A run `src` with `model` in its sealed tag at step 5, for train.init_from."""
    src = RunConfig(name="src", runs_dir=str(runs), model=TINY, data=DataConfig(shards=str(shards)))
    save_config(src)
    return write_checkpoint(src.run_dir.path, 5, {"module": model.state_dict()})


def base_weights_of(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own weights in a LoRA checkpoint (adapters left out), under the plain names."""
    return {name.replace(".base_layer.", "."): t for name, t in raw.items() if ".lora_" not in name}


def adapted_from(raw: dict[str, torch.Tensor], lora: LoraConfig) -> GPT:
    model = GPT(TINY)
    add_adapters(model, lora)
    model.load_state_dict(raw)
    return model.eval()


@pytest.mark.slow
def test_a_lora_run_at_zero2_trains_only_adapters_and_exports_and_evaluates_merged(
    tiny_shards, tmp_path, free_port, trained_looking, write_checkpoint
):
    shards, _ = tiny_shards
    source = trained_looking(TINY)
    source_tag = write_source(source, tmp_path, shards, write_checkpoint)
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = lora_args(shards, tmp_path, source_tag, max_steps=10)
    proc = subprocess.run([*launch, *args], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "trainable parameters: 16,384 of " in proc.stdout and "LoRA adapters of rank 4" in proc.stdout
    loss = [v for _, v in read_scalars(tmp_path / "lora" / "tb", "train/loss")]
    assert len(loss) == 10 and sum(loss[-3:]) < sum(loss[:3]) - 0.3, loss

    run, lora = tmp_path / "lora", load_config(tmp_path / "lora" / "config.yaml", []).train.lora
    tag = run / "checkpoints" / "global_step10"
    raw = load_fp32_weights(tag, TINY, lora)
    assert "blocks.0.attn.qkv.lora_A.default.weight" in raw and "blocks.0.attn.qkv.base_layer.weight" in raw
    as_trained = {name: t.bfloat16().float() for name, t in source.state_dict().items()}  # the run's bf16 copy
    assert all(torch.equal(t.float(), as_trained[name]) for name, t in base_weights_of(raw).items())
    model = adapted_from(raw, lora)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        expected = model(ids)

    subprocess.run([BIN / "dslm-export", tag, tmp_path / "hf"], cwd=tmp_path, check=True, timeout=900)
    transformers = pytest.importorskip("transformers", reason="checking the export needs `transformers`")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    from dslm_eval.load import load_for_eval

    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max().item() < 1e-4
        assert (load_for_eval(tag).model(ids) - expected).abs().max().item() < 1e-4

    refused = subprocess.run(
        [BIN / "dslm-train", *args, "train.lora.rank=8", "--resume", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert refused.returncode == 2 and "train.lora.rank=8 differs from 4" in refused.stderr.splitlines()[-1]
    longer = lora_args(shards, tmp_path, source_tag, max_steps=12)
    subprocess.run([*launch, *longer, "--resume", "auto"], cwd=tmp_path, check=True, timeout=900, capture_output=True)
    assert [s for s, _ in read_scalars(run / "tb", "train/loss")] == list(range(1, 13))
    resumed = load_fp32_weights(run / "checkpoints" / "global_step12", TINY, lora)
    assert all(torch.equal(t.float(), as_trained[name]) for name, t in base_weights_of(resumed).items())
    adapter = "blocks.1.mlp.fc.lora_B.default.weight"
    assert not torch.equal(resumed[adapter], raw[adapter])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_lora_run_trains_resumes_and_reads_merged_at_every_zero_stage(tiny_shards, base_run, tmp_path, stage):
    shards, _ = tiny_shards
    source = model_from(*read_weights(base_run)[:2])  # weights no seed produces
    for max_steps, resume in ((2, []), (3, ["--resume", "auto"])):
        args = [a.replace("zero2.json", f"zero{stage}.json") for a in lora_args(shards, tmp_path, base_run, max_steps)]
        proc = subprocess.run(
            [BIN / "dslm-train", *args, "train.checkpoint_interval=1", *resume],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    tag, lora = tmp_path / "lora" / "checkpoints" / "global_step3", LoraConfig(rank=4)
    raw = load_fp32_weights(tag, TINY, lora)
    as_trained = {name: t.bfloat16().float() for name, t in source.state_dict().items()}
    assert all(torch.equal(t.float(), as_trained[name]) for name, t in base_weights_of(raw).items())
    assert all(raw[name].abs().max() > 0 for name in raw if ".lora_B." in name)
    ids = torch.randint(0, 512, (2, 64))
    model_cfg, weights, _ = read_weights(tag)
    with torch.no_grad():
        assert (model_from(model_cfg, weights)(ids) - adapted_from(raw, lora)(ids)).abs().max().item() < 1e-4
