"""An export folder of any format as one kind of model: token ids in, next-token logits out.

Each format is one entry of BACKENDS: the files that identify its folder, the files that hold its
weights (their size is the export's), its format name (parity bounds are keyed by it) and how to
load it. A new format (GGUF for llama.cpp) is a new entry; dslm-eval and `dslm-export --check`
then compare it with its checkpoint as they do the others (dslm_eval.parity).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dslm.errors import DslmError
from dslm.model import GPT
from dslm.model_source import GGUF_FILES, HF_FILES, ONNX_FILES, holds
from dslm_eval.gguf_model import GgufModel
from dslm_eval.load import load_for_eval
from dslm_local.graph import DATA_NAME, ONNX_NAME, WEIGHTS_KEY
from dslm_local.onnx_model import PROMPT_CHUNK, OnnxModel


class ExportModel(Protocol):
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits (T, V) float32 at each position of the token ids `ids` (T,) int64,
        read from the start of a sequence (T at most the model's context)."""
        ...


class TorchLogits:
    """dslm's GPT (fp32, eval mode, on the CPU) as an ExportModel: a checkpoint's or an HF export's."""

    def __init__(self, model: GPT):
        self.model = model

    @torch.no_grad()
    def logits(self, ids: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(ids).long()[None])[0]  # (T, padded V)
        return out[:, : self.model.cfg.vocab_size].float().numpy()


class OnnxLogits:
    """An ONNX export run with ONNX Runtime as an ExportModel: each sequence fed PROMPT_CHUNK tokens
    per pass through the KV cache, as dslm-complete feeds a prompt."""

    def __init__(self, model: OnnxModel):
        self.model = model

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.model.reset()
        tokens = ids.tolist()
        return np.concatenate(
            [self.model.forward(tokens[start : start + PROMPT_CHUNK]) for start in range(0, len(tokens), PROMPT_CHUNK)]
        )


class GgufLogits:
    """A GGUF export run by llama.cpp (dslm_eval.gguf_model) as an ExportModel: each sequence in one
    batch from an empty cache."""

    def __init__(self, folder: Path, threads: int):
        context = json.loads((folder / "config.json").read_text())["n_positions"]
        self.model = GgufModel(gguf_file(folder), context, threads)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids)


def gguf_file(folder: Path) -> Path:
    """The GGUF file of an export folder (GGUF_FILES' model-TYPE.gguf)."""
    return next(folder.glob(GGUF_FILES[0]))


def gguf_format(folder: Path) -> str:
    """ "gguf-TYPE" for the folder's model-TYPE.gguf."""
    return "gguf-" + gguf_file(folder).stem.removeprefix("model-")


def onnx_format(folder: Path) -> str:
    """ "onnx" or "onnx-int8", as config.json records the weights' precision (WEIGHTS_KEY)."""
    try:
        weights = json.loads((folder / "config.json").read_text()).get(WEIGHTS_KEY, "fp32")
    except (json.JSONDecodeError, AttributeError) as e:
        raise DslmError(f"{folder / 'config.json'}: not the config of a dslm ONNX export ({e})") from None
    return "onnx-int8" if weights == "int8" else "onnx"


@dataclass(frozen=True)
class Backend:
    """How dslm-eval reads one export format."""

    files: tuple[str, ...]
    """The files (glob patterns) that make a folder this format's export (all of them present)."""
    weights: tuple[str, ...]
    """The files (glob patterns) that hold its weights: their sizes summed are the export's size."""
    format: Callable[[Path], str]
    """The folder -> its format name (a key of dslm_eval.parity.BOUNDS)."""
    load: Callable[[Path, int], ExportModel]
    """(folder, threads: 0 for one per core) -> the model."""


BACKENDS = (
    Backend(
        HF_FILES,
        ("model.safetensors",),
        lambda folder: "hf",
        lambda folder, threads: TorchLogits(load_for_eval(folder).model),
    ),
    Backend(
        ONNX_FILES, (ONNX_NAME, DATA_NAME), onnx_format, lambda folder, threads: OnnxLogits(OnnxModel(folder, threads))
    ),
    Backend(GGUF_FILES, GGUF_FILES[:1], gguf_format, GgufLogits),
)
"""Every export format dslm-eval reads, the first whose files a folder holds wins."""


def find_backend(folder: Path) -> Backend | None:
    """The backend whose files `folder` holds, None for a folder that is no export (or no folder)."""
    return next((b for b in BACKENDS if holds(folder, b.files)), None)


def backend_of(folder: Path) -> Backend:
    """The backend whose files `folder` holds. Raises DslmError for a folder that is no export."""
    if (backend := find_backend(folder)) is None:
        formats = "; ".join(", ".join(b.files) for b in BACKENDS)
        raise DslmError(f"{folder} is not an export folder (one of: {formats})")
    return backend


def load_export(folder: Path, threads: int = 0) -> ExportModel:
    """The model of the export at `folder` (`threads`: its runtime's threads, 0 for one per core;
    the torch backends use torch's). Raises DslmError for a folder that is no export, or one its
    runtime cannot load."""
    return backend_of(folder).load(folder, threads)


def export_format(folder: Path) -> str:
    """ "hf", "onnx", "onnx-int8", "gguf-f32", "gguf-f16" or "gguf-q8_0": the format of the
    export at `folder`. Raises DslmError for a folder that is no export."""
    return backend_of(folder).format(folder)


def export_size(folder: Path) -> int:
    """Bytes of the export's weight files."""
    return sum(p.stat().st_size for pattern in backend_of(folder).weights for p in folder.glob(pattern) if p.is_file())
