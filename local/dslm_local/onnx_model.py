"""A `dslm-export --format onnx` folder run with ONNX Runtime on the CPU: its model.onnx (the
graph's inputs and outputs are in dslm/onnx_export.py), config.json and tokenizer.json.

One sequence at a time, as an editor asks for completions: the prompt in one pass, then one
token per pass, the keys and values of the past carried from each pass's outputs to the next's
inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dslm_local.errors import DslmError
from dslm_local.fim import check_model_tokenizer
from dslm_local.graph import INPUT_NAMES, ONNX_NAME, OUTPUT_NAMES, WEIGHTS_KEY
from dslm_local.tokens import load_text_tokenizer


@dataclass(frozen=True)
class ExportConfig:
    """What config.json says about an ONNX export (GPT-2's keys, as dslm.hf.hf_config writes them)."""

    n_layer: int
    """Transformer blocks: the first axis of the graph's past and present keys and values."""
    n_head: int
    """Attention heads per block."""
    head_dim: int
    """Size of one head (n_embd // n_head)."""
    block_size: int
    """The context in tokens (GPT-2's n_positions): past and new tokens together at most."""
    vocab_size: int
    """Token ids the model predicts: the last axis of its logits."""
    bos_token_id: int
    """<bos>, which starts every training document and so every prompt."""
    eos_token_id: int
    """<eos>, which ends a training document: generation stops on it."""
    direction: str
    """"forward" or "backward" (dslm_direction): how the model reads text."""
    template: str
    """The instruction template the model was tuned with (dslm_template), "" for none."""
    fim: bool
    """Trained to fill in the middle (dslm_fim): completion at a cursor feeds the code after it too."""
    weights: str
    """"fp32" or "int8" (WEIGHTS_KEY)."""

    @classmethod
    def read(cls, folder: Path) -> ExportConfig:
        """Raises DslmError when config.json is missing, not JSON or lacks a key."""
        path = folder / "config.json"
        try:
            hf = json.loads(path.read_text())
            return cls(
                hf["n_layer"],
                hf["n_head"],
                hf["n_embd"] // hf["n_head"],
                hf["n_positions"],
                hf["vocab_size"],
                hf["bos_token_id"],
                hf["eos_token_id"],
                hf.get("dslm_direction", "forward"),
                hf.get("dslm_template", ""),
                bool(hf.get("dslm_fim", False)),
                hf[WEIGHTS_KEY],
            )
        except FileNotFoundError:
            raise DslmError(f"{folder}: no config.json; is it a dslm-export --format onnx folder?") from None
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DslmError(f"{path}: not the config of a dslm ONNX export ({type(e).__name__}: {e})") from None


PROMPT_CHUNK = 64
"""Prompt tokens per pass (last_logits): a 230-token prompt in one pass of code-33m's int8 export
raised the peak RSS by about 5 MiB more than in chunks of 64, at the same speed
(bench/RESULTS.md)."""


def session_options(threads: int, mem_pattern: bool = False) -> ort.SessionOptions:
    """CPU settings for a small footprint: ONNX Runtime's memory arena, without its memory
    patterns. A pattern is planned and kept per input shape, and the past grows by one position
    each token, so with patterns memory grew with every new length: code-33m's int8 export peaked
    at 164 MiB over 120 held-out completions, 146 MiB without (bench/RESULTS.md). `threads`:
    intra-op threads (0: one per core); `mem_pattern`: ONNX Runtime's default, for comparison."""
    options = ort.SessionOptions()
    options.enable_mem_pattern = mem_pattern
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, reported in one line
    return options


class OnnxModel:
    """An ONNX export's model and tokenizer. Raises DslmError for a folder without model.onnx,
    config.json or tokenizer.json, or whose config.json does not describe its model.onnx."""

    def __init__(self, folder: str | Path, threads: int = 0, mem_pattern: bool = False):
        """`threads`: ONNX Runtime's intra-op threads (0: one per core); `mem_pattern`: see
        session_options."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DslmError(f"{folder}: no such folder; name a dslm-export --format onnx folder")
        if not (folder / ONNX_NAME).is_file():
            raise DslmError(f"{folder}: no {ONNX_NAME}; write one with dslm-export CHECKPOINT --format onnx")
        self.config = ExportConfig.read(folder)
        if not (folder / "tokenizer.json").is_file():
            raise DslmError(f"{folder}: no tokenizer.json; export it again with dslm-export --format onnx")
        self.tokenizer = load_text_tokenizer(folder / "tokenizer.json")
        check_model_tokenizer(self.tokenizer, self.config.fim, str(folder))
        if self.tokenizer.get_vocab_size() > self.config.vocab_size:
            raise DslmError(
                f"{folder}: tokenizer.json has {self.tokenizer.get_vocab_size()} tokens, more than the "
                f"model's {self.config.vocab_size}: it is another model's tokenizer"
            )
        try:
            self.session = ort.InferenceSession(
                str(folder / ONNX_NAME), session_options(threads, mem_pattern), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DslmError(f"{folder / ONNX_NAME}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.check_shapes(folder)
        self.past: tuple[np.ndarray, np.ndarray] | None = None

    def check_shapes(self, folder: Path) -> None:
        """config.json's sizes against the graph's: a config copied from another model would give
        wrong positions and stops."""
        cfg = self.config
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        logits = {o.name: o.shape for o in self.session.get_outputs()}.get("logits", [None])
        past = inputs.get("past_keys", [None] * 5)
        if (past[0], past[2], past[4], logits[-1]) != (cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size):
            raise DslmError(
                f"{folder}: config.json (n_layer {cfg.n_layer}, n_head {cfg.n_head}, head size "
                f"{cfg.head_dim}, vocab {cfg.vocab_size}) does not describe its {ONNX_NAME} (past "
                f"{past}, logits {logits}); export the model again"
            )

    def empty_past(self) -> np.ndarray:
        """Zeros (n_layer, 1, n_head, 0, head_dim) float32: the past of a sequence's first pass."""
        cfg = self.config
        return np.zeros((cfg.n_layer, 1, cfg.n_head, 0, cfg.head_dim), dtype=np.float32)

    def forward(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), vocab_size) float32 for `ids` after the tokens passed so far (since
        `reset`); their keys and values join the past."""
        past_keys, past_values = self.past or (self.empty_past(), self.empty_past())
        if past_keys.shape[3] + len(ids) > self.config.block_size:
            raise DslmError(
                f"{past_keys.shape[3] + len(ids)} tokens do not fit the model's context of {self.config.block_size}"
            )
        inputs = (np.array([ids], dtype=np.int64), past_keys, past_values)
        try:
            logits, keys, values = self.session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, inputs)))
        except Exception as e:  # onnxruntime's own error types: a graph that config.json does not describe
            raise DslmError(
                f"ONNX Runtime failed on {past_keys.shape[3] + len(ids)} tokens "
                f"({str(e).splitlines()[0][:200]}); is config.json this model's?"
            ) from None
        self.past = keys, values
        return logits[0]

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (vocab_size,) after `ids`, fed PROMPT_CHUNK tokens per pass (as `forward`)."""
        for start in range(0, len(ids), PROMPT_CHUNK):
            logits = self.forward(ids[start : start + PROMPT_CHUNK])
        return logits[-1]

    def reset(self) -> None:
        """Forget the past: the next `forward` starts a sequence."""
        self.past = None
