"""The memory a training run needs per rank, estimated from its config before anything is
allocated, against what the machine has: dslm-train refuses a run that cannot fit in one line
(memory_problem) instead of growing until the machine swaps or the kernel kills it.

Every figure is a lower bound, what the run allocates for certain; what it leaves out (DeepSpeed's
buckets, the CUDA context, the allocator's slack, other processes growing meanwhile) is what the
USABLE share keeps free. Torch-free, so that `dslm-shard` can ask what the host has.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from dslm.errors import DslmError

if TYPE_CHECKING:
    import torch

    from dslm.data.loader import DataConfig
    from dslm.model import ModelConfig
    from dslm.trainer import TrainConfig

GiB = 1 << 30
USABLE = 0.9
"""The share of the free memory a lower bound may take; the rest is headroom for what it leaves out."""
FP32_BYTES = 4
ADAM_BYTES = 8
"""AdamW's two fp32 moments per trainable parameter."""
MASTER_BYTES = 8
"""With 16-bit weights, DeepSpeed's fp32 master weight and fp32 gradient per trainable parameter
(the `4_grads_32bit + 4_params_32bit` of estimate_zero2_model_states_mem_needs)."""
SAMPLE_BYTES = 16
"""Per token of a sample as the loader hands it over: input_ids and labels, int64 each."""


@dataclass
class ModelStates:
    """Bytes per rank of the weights, their gradients and the optimizer state."""

    weights: int
    gradients: int
    optimizer: int
    """AdamW's moments and, with 16-bit weights, the fp32 master weights and gradients."""


def model_states(parameters: int, trainable: int, stage: int, world_size: int, element: int) -> ModelStates:
    """This rank's share of the model states, the accounting of ZeRO (Rajbhandari et al. 2020,
    "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3.1) with
    DeepSpeed's byte counts: `element` bytes per weight (2 in bf16) and per gradient of a trainable
    parameter, and per trainable parameter AdamW's 8 (two fp32 moments) plus, with 16-bit weights,
    8 of fp32 master weight and gradient. Stage 1 partitions the optimizer state over the
    `world_size` ranks, stage 2 also the gradients, stage 3 also the weights. Their sum at stage 2
    is the GPU figure of DeepSpeed's estimate_zero2_model_states_mem_needs (2P + 18P/N); at stage 3,
    that of estimate_zero3_model_states_mem_needs (18P/N, without the gathered layer) plus the
    16-bit gradients."""
    optimizer = trainable * (ADAM_BYTES + (MASTER_BYTES if element < FP32_BYTES else 0))
    return ModelStates(
        weights=parameters * element // (world_size if stage >= 3 else 1),
        gradients=trainable * element // (world_size if stage >= 2 else 1),
        optimizer=optimizer // (world_size if stage >= 1 else 1),
    )


@dataclass
class MemoryNeed:
    """Bytes one rank needs, by part."""

    parameters: int
    """The model's parameters (ModelConfig.num_params)."""
    trainable: int
    """Those counted with gradients and optimizer state: all, or none where train.freeze,
    train.freeze_blocks or LoRA freeze some (which ones depends on their names; none keeps the
    estimate a lower bound)."""
    states: ModelStates
    """This rank's share of weights, gradients and optimizer state (model_states)."""
    offloaded: dict[str, str]
    """Where DeepSpeed keeps "weights" and "optimizer" when not on the device: "cpu" (host memory)
    or "nvme" (disk), from zero_optimization.offload_param / offload_optimizer."""
    activations: int
    """One micro-batch's forward pass, kept for the backward pass (activation_bytes)."""
    build: int
    """The fp32 model as dslm builds it on the host of a GPU run, before it moves to the GPU."""
    batches: int
    """Host memory for samples: micro-batches the loader workers read ahead and the validation
    subset (batch_bytes)."""

    def states_on(self, place: str) -> int:
        """The model states kept at `place`: "device", "cpu" or "nvme"."""
        parts = {"weights": self.states.weights, "gradients": self.states.gradients, "optimizer": self.states.optimizer}
        return sum(size for part, size in parts.items() if self.offloaded.get(part, "device") == place)

    def host(self, cpu_run: bool) -> dict[str, int]:
        """Host bytes by part ("model states", "activations", "samples"); `cpu_run`: a run whose
        device is the host, which holds everything. A GPU run's host holds the fp32 build, the
        states offloaded to it and the samples."""
        if cpu_run:
            return {
                "model states": self.states_on("device") + self.states_on("cpu"),
                "activations": self.activations,
                "samples": self.batches,
            }
        return {"model states": self.build + self.states_on("cpu"), "samples": self.batches}

    def device(self) -> dict[str, int]:
        """A GPU's bytes by part ("model states", "activations")."""
        return {"model states": self.states_on("device"), "activations": self.activations}


def weight_bytes(ds_config: dict) -> int:
    """Bytes per weight as the engine holds them: 2 with bf16 or fp16 on, else 4."""
    return 2 if any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "bfloat16", "fp16")) else FP32_BYTES


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool, element: int) -> int:
    """Bytes of one micro-batch's forward pass kept for the backward pass, and of the loss's logits.

    A block keeps, per token, the inputs of its two LayerNorms, of qkv, of attn.proj and of mlp.fc
    (n_embd each), q, k and v (3 n_embd), and the input and output of the GELU (intermediate_size
    each): `element` * (8 n_embd + 2 intermediate_size) bytes, plus 1-byte dropout masks on the two
    residual branches. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", eq. 1: sbh(34 + 5as/h) at intermediate_size 4h) with fused attention
    (SDPA), which keeps no seq_len x seq_len scores (the math path that dropout takes on a CPU
    does). With activation checkpointing each block keeps only its input, and one block's
    activations are recomputed at a time. At the loss, per token: the inputs of the final
    LayerNorm and the head (n_embd each), the logits, their fp32 copy and cross_entropy's fp32
    log-softmax (`element` + 8 bytes per padded vocab entry). tests/dslm/test_memory.py holds it
    against the tensors a real forward pass saves."""
    per_block = element * (8 * model.n_embd + 2 * model.intermediate_size) + (2 * model.n_embd if model.dropout else 0)
    blocks = model.n_layer * element * model.n_embd + per_block if checkpointing else model.n_layer * per_block
    loss = element * 2 * model.n_embd + (element + 2 * FP32_BYTES) * model.padded_vocab_size
    return micro_batch * seq_len * (blocks + loss)


def kv_cache_bytes(model: ModelConfig, rows: int, positions: int, element: int) -> int:
    """Bytes of a KV cache (dslm.model.KVCache) of `rows` sequences of `positions` tokens: a key
    and a value of n_embd per layer, position and row."""
    return rows * positions * 2 * model.n_layer * model.n_embd * element


def forward_bytes(model: ModelConfig, rows: int, positions: int, element: int, loss: bool) -> int:
    """Bytes of a no-grad forward pass of `rows` x `positions` tokens at its peak: the residual
    stream and an MLP's hidden layer (2 n_embd + intermediate_size per token), the logits, and
    with `loss` their fp32 copy and cross_entropy's fp32 log-softmax."""
    vocab = (element + (2 * FP32_BYTES if loss else 0)) * model.padded_vocab_size
    return rows * positions * (element * (2 * model.n_embd + model.intermediate_size) + vocab)


def batch_bytes(data: DataConfig, micro_batch: int, seq_len: int, validation_batches: int) -> int:
    """Host bytes of samples: data.num_workers x data.prefetch_factor micro-batches read ahead,
    and the `validation_batches` micro-batches the validation keeps (seq_len + 1 tokens a sample)."""
    ahead = data.num_workers * data.prefetch_factor
    return (ahead + validation_batches) * micro_batch * (seq_len + 1) * SAMPLE_BYTES


def estimate(
    model: ModelConfig,
    train: TrainConfig,
    data: DataConfig,
    ds_config: dict,
    stage: int,
    world_size: int,
    seq_len: int,
    validation_batches: int,
) -> MemoryNeed:
    """What one rank of a run of `world_size` ranks at ZeRO stage `stage` (engine.zero_stage of
    `ds_config`) on samples of `seq_len` (+ 1) tokens needs; `validation_batches`: the
    micro-batches each rank's validation keeps (0 without one)."""
    element = weight_bytes(ds_config)
    parameters = model.num_params()
    trainable = 0 if train.lora.rank or train.freeze or train.freeze_blocks else parameters
    zero = ds_config.get("zero_optimization", {})
    offloaded = {
        part: zero.get(f"offload_{key}", {}).get("device", "none")
        for part, key in (("weights", "param"), ("optimizer", "optimizer"))
    }
    return MemoryNeed(
        parameters=parameters,
        trainable=trainable,
        states=model_states(parameters, trainable, stage, world_size, element),
        offloaded={part: place for part, place in offloaded.items() if place in ("cpu", "nvme")},
        activations=activation_bytes(model, train.micro_batch_size, seq_len, train.activation_checkpointing, element),
        build=parameters * FP32_BYTES,
        batches=batch_bytes(data, train.micro_batch_size, seq_len, validation_batches),
    )


def available_host_memory(shared_by: int = 1) -> int:
    """Bytes this process can still take on the host: its share of what the system can give
    without swapping (psutil's `available`) among `shared_by` processes, or less under an
    address-space limit (`ulimit -v`, RLIMIT_AS)."""
    available = psutil.virtual_memory().available // shared_by
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        available = min(available, limit - psutil.Process().memory_info().vms)
    return max(available, 0)


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: a GPU's (torch.cuda.mem_get_info), else the host's
    (available_host_memory)."""
    if device.type == "cuda":
        import torch  # here only: dslm-shard asks about the host alone, without torch

        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()


def check_fits(need: int, device: torch.device, what: str, advice: str) -> None:
    """DslmError when `need` bytes for `what` (e.g. "a batch of 16 samples") are more than
    `device` has free; `advice` says which setting to lower."""
    if need > USABLE * (free := free_memory(device)):
        where = "GPU" if device.type == "cuda" else "host"
        raise DslmError(
            f"{what} needs at least {gib(need)} of {where} memory, more than {USABLE:.0%} of the "
            f"{gib(free)} free; {advice}"
        )


def gib(size: int) -> str:
    return f"{size / GiB:,.1f} GiB"


ADVICE = {
    "model states": "a smaller model (model.*), or its states spread over more ranks (a higher ZeRO stage, e.g. "
    "ds_configs/zero3.json)",
    "activations": "a smaller train.micro_batch_size (a larger train.grad_accum keeps the batch) or "
    "train.activation_checkpointing=true",
    "samples": "fewer micro-batches read ahead (data.num_workers x data.prefetch_factor) or held for "
    "validation (train.val_batches)",
}
"""What to change when each part of the need is the largest."""


def memory_problem(need: MemoryNeed, local_ranks: int, device_free: int | None) -> str:
    """The line that refuses a run needing `need` per rank, or "" when it fits. The host's
    available memory is shared by the `local_ranks` ranks on this machine; `device_free`: bytes
    free on this rank's GPU (torch.cuda.mem_get_info), None on a CPU run."""
    host = (
        "host memory",
        need.host(cpu_run=device_free is None),
        available_host_memory(local_ranks),
        "available to this rank"
        if local_ranks == 1
        else f"available to each of the {local_ranks} ranks on this machine",
    )
    for where, parts, free, whose in (host, ("GPU memory", need.device(), device_free, "free on its GPU")):
        if free is None or sum(parts.values()) <= USABLE * free:
            continue
        breakdown = ", ".join(f"{part} {gib(size)}" for part, size in parts.items())
        return (
            f"the run needs at least {gib(sum(parts.values()))} of {where} per rank, more than {USABLE:.0%} of "
            f"the {gib(free)} {whose} ({need.parameters:,} parameters; {breakdown}); try "
            f"{ADVICE[max(parts, key=parts.get)]}"
        )
    return ""
