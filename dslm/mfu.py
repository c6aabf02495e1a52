"""Model FLOPs utilization: training FLOPs per token against the GPU's dense bf16 peak; the
hardware a run records."""

from __future__ import annotations

import platform

import torch

from dslm.model import GPT

PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is slower, but reports "H100 PCIe"
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}
"""Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, by a name fragment of
torch.cuda.get_device_name(); the longest fragment that matches wins."""


def flops_per_token(model: GPT, seq_len: int) -> float:
    """6N + 12·L·H·Q·T (PaLM, appendix B): multiply-adds of the weights forward and backward, plus
    attention over T positions. N leaves out the embedding tables, which are lookups, not matmuls."""
    cfg = model.cfg
    lookups = model.wpe.weight.numel() + (0 if cfg.tie_embeddings else model.wte.weight.numel())
    n = model.num_params() - lookups
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


def peak_flops(device_name: str) -> float | None:
    matches = [name for name in PEAK_BF16_FLOPS if name in device_name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def device_peak_flops() -> float | None:
    """This process's GPU's bf16 peak, or None on a CPU or an unknown GPU (then no MFU is logged)."""
    return peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def hardware(device: torch.device, world_size: int) -> str:
    """What `world_size` ranks on devices like `device` train on, as a tag records it
    (TrainState.hardware): "8 x NVIDIA H100 80GB HBM3", or "2 x CPU (x86_64)"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return f"{world_size} x {name}"
