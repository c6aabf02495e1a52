"""dslm's GPT as a GGUF file that llama.cpp (and so Ollama, LM Studio, llama-cpp-python) runs
natively: dslm's block is GPT-2's, llama.cpp's `gpt2` architecture (written with the `gguf`
package, the format's own writer, as llama.cpp's convert_hf_to_gguf.py writes GPT-2).

The tensors are GPT-2's (dslm.hf.gpt2_weights: the head's bias folded into the final LayerNorm
and the head) under llama.cpp's names, in ggml's layout, which is PyTorch's Linear layout (out,
in). `--type`: f32 keeps every tensor in float32; f16 stores the matrices in float16; q8_0 stores
them in llama.cpp's 8-bit blocks (32 weights and one float16 scale each). As llama.cpp's converter
does, vectors (norms, biases) and the position embedding stay float32, and a matrix whose rows do
not split into 32-weight blocks stays float16.

The tokenizer is written as llama.cpp's `gpt2` BPE (byte-level, GPT-2's pre-tokenizer, which is
dslm's: ByteLevel without a prefix space) with its merges, dslm's special tokens as control
tokens (text that spells one stays text, as dslm encodes a prompt), <bos> added before a prompt,
the FIM tokens and the chat template where the model has them. dslm normalizes text with NFKC
before it encodes it and llama.cpp does not: text that NFKC changes (full-width forms,
ligatures, compatibility characters) can encode to other ids there; docs/export.md says how
often and what to do.
"""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from dslm.data.templates import Framing, stop_token
from dslm.data.tokens import BOS_ID, PAD_ID, SPECIAL_TOKENS
from dslm.errors import DslmError
from dslm.hf import chat_template, gpt2_weights, renamed
from dslm.model import ModelConfig
from dslm_local.fim import FimIds

GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""--type -> (the type of the weight matrices, general.file_type)."""
GGUF_NAME = "model-{type}.gguf"
"""The file's name in its export folder."""
LAYER_NORM_EPS = 1e-5
"""nn.LayerNorm's default, which dslm's model uses."""
KEPT_F32 = ("wpe.weight",)
"""Matrices llama.cpp's converter keeps in float32 whatever the type (the position embedding)."""

BLOCK_TENSORS = {
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.qkv.weight": "attn_qkv.weight",
    "attn.qkv.bias": "attn_qkv.bias",
    "attn.proj.weight": "attn_output.weight",
    "attn.proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.fc.weight": "ffn_up.weight",
    "mlp.fc.bias": "ffn_up.bias",
    "mlp.proj.weight": "ffn_down.weight",
    "mlp.proj.bias": "ffn_down.bias",
}
"""A block's tensors, dslm -> llama.cpp (gguf.TENSOR_NAMES of MODEL_ARCH.GPT2, blk.N.*)."""
FIM_KEYS = (gguf.Keys.Tokenizer.FIM_PRE_ID, gguf.Keys.Tokenizer.FIM_MID_ID, gguf.Keys.Tokenizer.FIM_SUF_ID,
            gguf.Keys.Tokenizer.FIM_PAD_ID)  # fmt: skip
"""llama.cpp's keys for the ids of dslm_local.fim.FimIds, in its fields' order."""
DSLM_KEYS = {"direction": "dslm.direction", "template": "dslm.template", "fim": "dslm.fim"}
"""dslm's own keys: the model's Framing (llama.cpp ignores keys it does not know)."""


OUTER_TENSORS = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
"""The tensors outside the blocks, dslm -> llama.cpp."""


def stored(name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`tensor` as the file stores it: vectors and KEPT_F32 in float32; matrices in `qtype`
    (float16 for a Q8_0 matrix whose rows are not whole 32-weight blocks). A quantized array is
    uint8, (rows, bytes per row)."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or name in KEPT_F32 or qtype == gguf.GGMLQuantizationType.F32:
        return data
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def check_exportable(framing: Framing) -> None:
    """DslmError for a model llama.cpp would run wrongly: a backward model reads its prompt reversed
    in token order, which no llama.cpp client does."""
    if framing.direction != "forward":
        raise DslmError(
            f"--format gguf: this model reads text {framing.direction} (dslm_direction), which llama.cpp "
            "cannot: it would feed the prompt forward; export it as hf or onnx and use dslm-generate"
        )


def write_gguf(
    path: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor], tok: Tokenizer, framing: Framing, type: str
) -> None:
    """The GGUF file of a model of `cfg` with dslm's `weights` and tokenizer `tok` at `path` (the
    caller renames it into place). `type`: a GGUF_TYPES key. Raises DslmError for a backward model
    (check_exportable) or a tokenizer whose vocabulary is not the model's."""
    check_exportable(framing)
    qtype, file_type = GGUF_TYPES[type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    write_model_keys(writer, cfg, file_type)
    write_tokenizer_keys(writer, tok, cfg.vocab_size, framing)
    weights = gpt2_weights(weights, cfg)
    for ours, theirs in renamed(cfg, OUTER_TENSORS, BLOCK_TENSORS, "blk.{i}.").items():
        data = stored(ours, weights[ours], qtype)
        writer.add_tensor(theirs, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_keys(writer: gguf.GGUFWriter, cfg: ModelConfig, file_type: gguf.LlamaFileType) -> None:
    """The `gpt2.*` hyperparameters llama.cpp reads, and the file type."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(file_type)


def vocabulary(tok: Tokenizer, vocab_size: int) -> list[str]:
    """`tok`'s tokens in id order. Raises DslmError unless they are ids 0..vocab_size-1."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(vocab_size)):
        raise DslmError(
            f"the tokenizer holds {len(vocab):,} tokens with ids that are not 0..{vocab_size - 1}: "
            "not the model's vocabulary"
        )
    return tokens


def merges(tok: Tokenizer) -> list[str]:
    """The BPE merges of `tok` in rank order, as "left right" (tokenizers saves a pair as a list
    or, in older files, as that string)."""
    return [pair if isinstance(pair, str) else " ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]


def write_tokenizer_keys(writer: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int, framing: Framing) -> None:
    """llama.cpp's `gpt2` BPE tokenizer for dslm's `tok` and the model's `framing`."""
    tokens = vocabulary(tok, vocab_size)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's pre-tokenizer regex
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges(tok))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(stop_token(framing))  # where generation ends, as generation_config.json says
    writer.add_pad_token_id(PAD_ID)
    writer.add_unk_token_id(SPECIAL_TOKENS.index("<unk>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if (fim := FimIds.of(tok)) is not None:  # llama.cpp's infill (llama-server /infill) reads them
        for key, id in zip(FIM_KEYS, astuple(fim)):
            writer.add_uint32(key, id)
    if (template := chat_template(framing)) is not None:
        writer.add_chat_template(template)
    writer.add_string(DSLM_KEYS["direction"], framing.direction)
    writer.add_string(DSLM_KEYS["template"], framing.template)
    writer.add_bool(DSLM_KEYS["fim"], framing.fim)
