"""dslm's GPT as an ONNX graph with a KV cache, for local inference without torch (dslm-complete,
in the light `dslm-local` package), in fp32 or with int8 weights.

The graph (one for the prompt and for every later token):
    inputs   input_ids (B, T) int64; past_keys, past_values (n_layer, B, n_head, P, head_dim) float32
    outputs  logits (B, T, vocab_size) float32; present_keys, present_values (n_layer, B, n_head, P + T, head_dim)
Positions run from P (the past's length) on, so P + T must stay within n_positions (block_size).
The first pass takes an empty past (P = 0); each later pass takes the previous pass's presents.
Keys and values of all layers are stacked in one tensor each, so a client holds two arrays.

It is exported with torch.onnx (the dynamo exporter) from the same GPT.forward that dslm-generate
runs, through PastKV, a cache that concatenates instead of writing in place. int8: ONNX Runtime's
dynamic quantization (onnxruntime.quantization.quantize_dynamic; weights int8 per output channel,
activations quantized per call), the method its documentation recommends for transformers on CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from dslm.data.templates import Framing
from dslm.errors import DslmError
from dslm.files import atomic_path
from dslm.hf import runtime_config
from dslm.logs import libraries
from dslm.model import GPT, causal_mask
from dslm_local.graph import DATA_NAME, INPUT_NAMES, ONNX_NAME, OUTPUT_NAMES, WEIGHTS_KEY

OPSET = 18
"""ONNX opset of the graph; ONNX Runtime has run opset 18 since 1.14."""


class PastKV:
    """A cache for one forward pass over explicit past tensors (n_layer, B, H, P, D): each layer's
    keys and values are the past's with the new chunk's appended, kept as the presents. It has
    KVCache's interface, so GPT.forward runs unchanged; its mask is always explicit, so the traced
    graph holds for every P (no branch on P = 0 or T = 1)."""

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values = past_keys, past_values
        self.length = past_keys.size(3)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(torch.cat([self.past_keys[layer], k], dim=2))  # (B, H, P + T, D)
        self.values.append(torch.cat([self.past_values[layer], v], dim=2))
        return self.keys[layer], self.values[layer]

    @staticmethod
    def attn_mask(start: int, T: int, device: torch.device) -> torch.Tensor:
        """Always the explicit (T, start + T) mask; `start` is a symbolic size while exporting."""
        return causal_mask(start, T, device)


class DecoderWithPast(nn.Module):
    """GPT.forward with the cache as tensors in and out (the graph's signature, above)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = PastKV(past_keys, past_values)
        logits = self.model(input_ids, cache=cache)
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def empty_past(model: GPT, batch: int, length: int) -> torch.Tensor:
    """Zeros (n_layer, batch, n_head, length, head_dim)."""
    cfg = model.cfg
    return torch.zeros(cfg.n_layer, batch, cfg.n_head, length, cfg.n_embd // cfg.n_head)


def export_graph(model: GPT, path: Path) -> None:
    """Write the fp32 graph of `model` (eval mode, on the CPU) to `path`."""
    model = model.float().cpu().eval()
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    cache_dims = {1: batch, 3: past}
    # sizes of 2+ for the example: torch.export specializes a size of 0 or 1 into a constant
    example = (torch.zeros(2, 3, dtype=torch.long), empty_past(model, 2, 2), empty_past(model, 2, 2))
    with torch.no_grad(), libraries():  # the exporter prints its progress and warns about torch.export's internals
        torch.onnx.export(
            DecoderWithPast(model).eval(),
            example,
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            dynamic_shapes=({0: batch, 1: seq}, cache_dims, cache_dims),
            verbose=False,
        )


def quantize_int8(source: Path, out: Path, work: Path) -> None:
    """`source` with int8 weights in `out`: ONNX Runtime's dynamic quantization with its default
    operator types, so every Linear layer's weight (MatMul: int8 per output channel) and the two
    embedding tables (Gather: uint8 per tensor), after its pre-processing (shape inference, graph
    optimizations), as its quantization guide asks; intermediate files go to the folder `work`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    with libraries():
        quant_pre_process(
            str(source),
            str(prepared),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            external_data_location=prepared.name + ".data",
        )
        quantize_dynamic(
            str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True
        )


def export_onnx(
    model: GPT,
    out: Path,
    framing: Framing,
    int8: bool,
    write_files: Callable[[Path], None],
    origin: dict | None = None,
) -> None:
    """An ONNX export folder: model.onnx with its weights in model.onnx.data (ONNX Runtime maps that
    file instead of copying a protobuf's weights, and a model over 2 GB fits), config.json
    (export_config, recording `origin`: dslm.hf.ORIGIN_KEY), the tokenizer files and the model card
    (`write_files(folder)`), written under a temporary
    name and renamed into place. Raises DslmError when `out` exists. Says what it does on stderr,
    with a progress bar over its stages (the graph; int8)."""
    if out.exists():
        raise DslmError(f"{out} already exists; remove it or name another folder")
    print(
        f"exporting the model to ONNX with torch.onnx{', then quantizing its weights to int8' if int8 else ''}...",
        file=sys.stderr,
        flush=True,
    )
    with atomic_path(out) as tmp, tqdm(total=1 + int8, desc="onnx export", unit="stage") as bar:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(export_config(model, framing, int8, origin), indent=2) + "\n")
        bar.set_postfix_str("graph")
        if int8:
            (work := tmp / "work").mkdir()
            export_graph(model, work / "fp32.onnx")
            bar.update()
            bar.set_postfix_str("int8")
            quantize_int8(work / "fp32.onnx", tmp / ONNX_NAME, work)
            shutil.rmtree(work)
        else:
            export_graph(model, tmp / ONNX_NAME)
        bar.update()
        for name in (ONNX_NAME, DATA_NAME):  # the writers' private temporary files leave them 0600
            shutil.copymode(tmp / "config.json", tmp / name)
        write_files(tmp)


def export_config(model: GPT, framing: Framing, int8: bool, origin: dict | None = None) -> dict:
    """config.json of an ONNX export: dslm.hf.runtime_config (recording `origin`) and WEIGHTS_KEY."""
    return {**runtime_config(model.cfg, framing, origin), WEIGHTS_KEY: "int8" if int8 else "fp32"}
