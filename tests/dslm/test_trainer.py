"""The training step and validation (dslm/trainer.py), through dslm-train."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.metrics import read_scalars

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def one_step(shards: Path, runs: Path, name: str, ranks: int, grad_accum: int, micro_batch: int, port: int) -> Path:
    """A run of one optimizer step that reads global samples 0..7, split as ranks x grad_accum x micro_batch."""
    args = [
        "--deepspeed",
        REPO / "ds_configs/zero2.json",
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        "model.vocab_size=512",
        f"train.micro_batch_size={micro_batch}",
        f"train.grad_accum={grad_accum}",
        "train.max_steps=1",
        "train.warmup_steps=0",
        "train.log_interval=1",
        "train.val_interval=0",
        "data.num_workers=0",
    ]
    launch = (
        [BIN / "dslm-train"]
        if ranks == 1
        else [BIN / "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), REPO / "dslm/train.py"]
    )
    proc = subprocess.run([*launch, *args], cwd=runs, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / name


@pytest.mark.slow
def test_a_masked_step_gives_the_same_loss_and_gradients_however_it_is_split(sft_shards, tmp_path, free_port):
    """Each sample of the instruction shards holds another number of targets: the step's loss is the
    mean over all of the step's targets, not a mean of per-micro-batch means."""
    splits = {"1x1x8": (1, 1, 8), "1x8x1": (1, 8, 1), "2x4x1": (2, 4, 1), "2x1x4": (2, 1, 4)}
    runs = {name: one_step(sft_shards[0], tmp_path, name, *split, free_port) for name, split in splits.items()}
    losses = {name: read_scalars(run / "tb", "train/loss")[0][1] for name, run in runs.items()}
    norms = {name: read_scalars(run / "tb", "train/grad_norm")[0][1] for name, run in runs.items()}
    # bf16 forward and backward: the same samples in other batch shapes round differently
    assert max(losses.values()) - min(losses.values()) < 2e-4 * losses["1x1x8"], losses
    assert max(norms.values()) - min(norms.values()) < 1e-3 * norms["1x1x8"], norms


# In a child process: init_distributed sets up a world of one for the whole process.
PLAIN_MEANS = """
import json
import torch
from dslm.data.loader import DeviceBatches
from dslm.engine import build_engine, init_distributed, load_ds_config
from dslm.model import GPT, ModelConfig
from dslm.objective import next_token
from dslm.trainer import TrainConfig, train_step

init_distributed()
train = TrainConfig(micro_batch_size=3, grad_accum=2, warmup_steps=0, max_steps=10)
torch.manual_seed(1)
batches = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 2048, (4, 3, 33))]


def engine():
    torch.manual_seed(0)
    return build_engine(GPT(ModelConfig(dropout=0.0)), train, load_ds_config("ds_configs/zero2.json", train, 1))


ours, plain = engine(), engine()
losses = [train_step(ours, DeviceBatches(iter(batches[2 * k:2 * k + 2] + batches[:1]), ours.device), next_token, 2)
          for k in range(2)]
plain_losses = []
for k in range(2):
    means = []
    for batch in batches[2 * k:2 * k + 2]:
        loss = plain(*next_token(batch))  # GPT.forward: the micro-batch's mean over its targets
        plain.backward(loss)
        plain.step()
        means.append(loss.detach())
    plain_losses.append(sum(means) / 2)
print(json.dumps({
    "losses_equal": [torch.equal(a, b) for a, b in zip(losses, plain_losses)],
    "weights_equal": all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), plain.module.parameters())),
    "weights_moved": any(not torch.equal(a, b) for a, b in zip(ours.module.parameters(), engine().module.parameters())),
}))
"""


@pytest.mark.slow
def test_where_every_token_is_a_target_a_step_is_bitwise_the_mean_of_each_micro_batch(tmp_path):
    """Pretraining shards: the step's loss and update are those of the plain loop that backpropagates
    each micro-batch's own mean (GPT.forward's loss), bit for bit."""
    proc = subprocess.run([sys.executable, "-c", PLAIN_MEANS], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "losses_equal": [True, True],
        "weights_equal": True,
        "weights_moved": True,
    }
