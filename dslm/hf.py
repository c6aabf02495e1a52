"""dslm's GPT and Hugging Face's GPT2LMHeadModel, both directions: one table of names for the
config and one for the weights, used by `dslm-export` (to HF) and eval's loader (from HF).

The block is GPT-2's, so the weights map one to one (Linear weights transposed into GPT-2's
Conv1D layout), except the output head's bias, which the model cards count and GPT-2 lacks. It
is folded into the final LayerNorm and the head exactly: a LayerNorm's normalized output sums to
zero, so one hidden dimension k is a linear function of the others and the head can take its
weight over to them; dimension k is then set to the constant 1 (gain 0, bias 1) and its column
of the head carries the bias. k is the dimension whose move perturbs the head least. The logits
are the same up to float rounding; the last hidden state differs in dimension k.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from dslm.data.templates import DIRECTIONS, IM_END, IM_START, TEMPLATES, Framing, get_template, role_marker, stop_token
from dslm.data.tokens import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from dslm.errors import DslmError
from dslm.files import sha256_file
from dslm.model import ModelConfig

CONFIG_NAMES = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "intermediate_size": "n_inner",
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
}
"""ModelConfig's sizes -> GPT2Config's keys."""
DIRECTION_KEY, TEMPLATE_KEY, FIM_KEY = "dslm_direction", "dslm_template", "dslm_fim"
"""dslm's own config.json keys (GPT2Config keeps unknown keys as attributes): the model's Framing.
A "backward" model reads text reversed in token order: reverse a prompt's ids before the model and
the generated ids after it. Absent: forward, no template."""
ORIGIN_KEY = "dslm_origin"
"""dslm-export's record in config.json of the checkpoint the weights came from: {"path": the tag
(or an HF export without a record), "step": its step or null}. dslm-eval compares the export
with it (dslm_eval.parity)."""

BLOCK_NAMES = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight",
    "attn.proj.bias": "attn.c_proj.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
"""A block's tensors, dslm -> GPT-2. GPT-2's Conv1D stores the Linear weights transposed."""


def renamed(cfg: ModelConfig, outer: dict[str, str], block: dict[str, str], block_prefix: str) -> dict[str, str]:
    """dslm's tensor names -> another format's, for every tensor of a GPT-2 model of `cfg` (no head
    bias): `outer` for those outside the blocks, `block` for each block's, whose names there begin
    with `block_prefix` formatted with the block's index (`i`)."""
    names = dict(outer)
    for i in range(cfg.n_layer):
        names.update({f"blocks.{i}.{ours}": block_prefix.format(i=i) + theirs for ours, theirs in block.items()})
    return names


def weight_names(cfg: ModelConfig) -> dict[str, str]:
    """dslm's tensor names -> GPT2LMHeadModel's, for every tensor of the exported model."""
    outer = {
        "wte.weight": "transformer.wte.weight",
        "wpe.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight",
        "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    }
    return renamed(cfg, outer, BLOCK_NAMES, "transformer.h.{i}.")


def is_conv1d(name: str) -> bool:
    """Whether GPT-2 stores this dslm tensor transposed: a block's Linear weight."""
    return name.startswith("blocks.") and name.endswith(".weight") and ".ln_" not in name


def hf_config(cfg: ModelConfig, framing: Framing = Framing(), origin: dict | None = None) -> dict:
    """GPT2Config's config.json for `cfg` (no head bias: dslm-export folds it), its framing and,
    when given, the checkpoint it came from (`origin`, ORIGIN_KEY's record).
    Its eos_token_id is the token the model ends what it writes with (dslm.data.templates.stop_token):
    <|im_end|> for an instruction-tuned model, as generation_config.json says."""
    sizes = {theirs: getattr(cfg, ours) for ours, theirs in CONFIG_NAMES.items()}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **sizes,
        "activation_function": "gelu_new",  # GELU with the tanh approximation, as dslm's MLP
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": stop_token(framing),
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        DIRECTION_KEY: framing.direction,
        TEMPLATE_KEY: framing.template,
        FIM_KEY: framing.fim,
        **({ORIGIN_KEY: origin} if origin else {}),
    }


def runtime_config(cfg: ModelConfig, framing: Framing = Framing(), origin: dict | None = None) -> dict:
    """config.json of an export that is no transformers model (ONNX, GGUF): hf_config's sizes,
    special token ids, framing and origin, without "architectures" and "torch_dtype", which would
    name a transformers model that is not in the folder."""
    config = hf_config(cfg, framing, origin)
    return {key: value for key, value in config.items() if key not in ("architectures", "torch_dtype")}


def recorded_origin(folder: Path) -> dict | None:
    """The checkpoint an export's config.json records it came from (ORIGIN_KEY), None for an export
    written before that record. Raises DslmError for a config.json that is not JSON."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text()).get(ORIGIN_KEY)
    except (json.JSONDecodeError, AttributeError) as e:
        raise DslmError(f"{path}: not an export's config ({e})") from None


def generation_config(framing: Framing) -> dict:
    """generation_config.json: what `transformers`' generate() (and the servers that read the file)
    stop at: the token the model was trained to end its text with (dslm.data.templates.stop_token)."""
    return {"bos_token_id": BOS_ID, "eos_token_id": stop_token(framing), "pad_token_id": PAD_ID}


BACKWARD_CHAT = (
    "this model reads text backward (dslm_direction=backward): its prompt is reversed in token order, "
    "which a chat template cannot write; use dslm-generate"
)
"""The one line a backward model's chat template raises."""


def chat_template(framing: Framing) -> str | None:
    """The Jinja chat template (transformers' apply_chat_template) of a model tuned with a template,
    None without one. It frames a conversation as dslm.data.templates.Framer frames an example:
    `<bos>`, the user message as the template's given block, the assistant message as its target
    block, then `<eos>`; with add_generation_prompt, a lone user message is followed by the target
    block's opening markers, which makes the ids dslm-generate --template feeds (Framer.prompt).
    Anything but one user message, or a user and an assistant message, is refused with one line,
    and so is every conversation of a backward model (BACKWARD_CHAT)."""
    if not framing.template:
        return None
    if framing.direction == "backward":
        return f"{{{{- raise_exception({BACKWARD_CHAT!r}) -}}}}"
    template = get_template(framing.template)
    given, target = template.given("forward"), template.target("forward")
    text = "message['content'].split() | reverse | join(' ')" if template.reverse_words else "message['content']"

    def opening(role: str) -> str:
        return f"{IM_START}{role_marker(role)}"

    return "".join(
        [
            "{%- if messages | length not in (1, 2) or messages[0]['role'] != 'user' or (messages | length == 2 "
            "and messages[1]['role'] != 'assistant') -%}",
            f"{{{{- raise_exception('the {template.name} template takes one user message, optionally followed by one "
            "assistant message') -}}{%- endif -%}",
            "{{- bos_token -}}",
            "{%- for message in messages -%}",
            "{%- if message['content'] is not string -%}{{- raise_exception('a message content must be a string "
            "(not a list of parts)') -}}{%- endif -%}",
            f"{{%- if message['role'] == 'user' -%}}{opening(given)}{{{{ {text} }}}}{IM_END}",
            f"{{%- else -%}}{opening(target)}{{{{ {text} }}}}{IM_END}{{{{- eos_token -}}}}{{%- endif -%}}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt and messages | length == 1 -%}}{opening(target)}{{%- endif -%}}",
        ]
    )


def framing_from_hf(hf: dict, source: Path) -> Framing:
    """The Framing a config.json records (forward, no template, when it records none). Raises
    DslmError naming `source` for a direction or template dslm does not know."""
    framing = Framing(hf.get(DIRECTION_KEY, "forward"), hf.get(TEMPLATE_KEY, ""), bool(hf.get(FIM_KEY, False)))
    if framing.direction not in DIRECTIONS or framing.template not in ("", *TEMPLATES):
        raise DslmError(
            f"{source}: {DIRECTION_KEY}={framing.direction!r} or {TEMPLATE_KEY}={framing.template!r} "
            f"is not one dslm knows"
        )
    return framing


def model_config_from_hf(hf: dict, source: Path) -> ModelConfig:
    """dslm's ModelConfig for a GPT-2 config.json read from `source` (named in errors).
    Raises DslmError for another architecture, a missing key or sizes that do not fit."""
    tanh_gelu = hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
    if hf.get("model_type") != "gpt2" or not tanh_gelu:
        raise DslmError(f"{source}: not a GPT-2 model with tanh GELU, as dslm-export writes")
    hf = {"n_inner": None, **hf}
    try:
        sizes = {ours: hf[theirs] for ours, theirs in CONFIG_NAMES.items()}
        sizes["intermediate_size"] = sizes["intermediate_size"] or 4 * sizes["n_embd"]  # GPT-2's default
        return ModelConfig(
            preset="", **sizes, lm_head_bias=False, tie_embeddings=hf.get("tie_word_embeddings", True)
        )  # GPT-2's default: tied
    except KeyError as e:
        raise DslmError(f"{source} has no {e.args[0]}") from None
    except ValueError as e:
        raise DslmError(f"{source}: {e}") from None


TOKENIZER_SHA_KEY = "dslm_tokenizer_sha256"
"""dslm's own tokenizer_config.json key (transformers keeps unknown keys): the sha256 of the
tokenizer.json the exported model was trained with (its shards' Manifest.tokenizer_sha256). The
export's tokenizer.json differs from that file by its post-processor (`hf_tokenizer`)."""


def export_tokenizer_sha256(folder: Path) -> str:
    """sha256 of the tokenizer.json the model exported to `folder` was trained with: the record in
    its tokenizer_config.json (TOKENIZER_SHA_KEY), else, for an export written before that record
    (its tokenizer.json then a plain copy), the sha256 of its tokenizer.json. Raises DslmError for
    a tokenizer_config.json that is not JSON."""
    config = folder / "tokenizer_config.json"
    try:
        recorded = json.loads(config.read_text()).get(TOKENIZER_SHA_KEY) if config.is_file() else None
    except (json.JSONDecodeError, AttributeError) as e:
        raise DslmError(f"{config}: not a tokenizer config ({e})") from None
    return recorded or sha256_file(folder / "tokenizer.json")


def tokenizer_config(source_sha256: str, framing: Framing = Framing()) -> dict:
    """Lets `AutoTokenizer.from_pretrained(OUT)` load tokenizer.json with dslm's special tokens.
    `source_sha256`: the sha256 of the tokenizer.json the model was trained with (TOKENIZER_SHA_KEY).

    A model without a template: a special token written in a prompt stays text, as dslm encodes it
    (load_text_tokenizer). tokenizer.json cannot record that (tokenizers does not save
    `encode_special_tokens`), so "split_special_tokens" asks transformers to set it; 5.x reads it
    from here. Where a version does not, the call that encodes as dslm is `tokenizer(prompt,
    split_special_tokens=True)`. ("add_bos_token" is not written: transformers drops it when there
    is a tokenizer.json; the <bos> comes from its post-processor, see `hf_tokenizer`.)

    A model tuned with a template: its chat_template, whose markers must encode as special tokens,
    so split_special_tokens stays off; in a user message that writes one of dslm's special tokens
    as text, it stays text with apply_chat_template(..., sanitize_control_tokens=True)."""
    pad, unk, bos, eos = SPECIAL_TOKENS[:4]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": pad,
        "unk_token": unk,
        "bos_token": bos,
        "eos_token": eos,
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "model_max_length": None,
        "split_special_tokens": not framing.template,
        TOKENIZER_SHA_KEY: source_sha256,
    }
    if (template := chat_template(framing)) is not None:
        config["chat_template"] = template
    return config


def hf_tokenizer(tok: Tokenizer, framing: Framing = Framing()) -> Tokenizer:
    """A copy of dslm's tokenizer `tok` whose encode frames a prompt as dslm's generation does
    (dslm_eval.generate.PromptFraming), through a TemplateProcessing post-processor: <bos> before the
    text for a forward model; <eos> after it for a backward one (the ids in page order: reversed,
    they are what the model reads). A template's blocks are not added: build those ids as
    PromptFraming does. dslm's own loader drops the post-processor again
    (dslm.data.tokens.load_text_tokenizer): dslm adds its special tokens itself."""
    out = Tokenizer.from_str(tok.to_str())
    bos, eos = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID]
    forward = framing.direction == "forward"
    single, pair = (f"{bos} $A", f"{bos} $A $B:1") if forward else (f"$A {eos}", f"$A $B:1 {eos}")
    out.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(bos, BOS_ID), (eos, EOS_ID)]
    )
    return out


def fold_head_bias(
    gain: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gain, shift, weight) of a final LayerNorm and a bias-free head with the same logits as
    `weight @ (gain * n + shift) + bias` for every normalized n (which sums to zero).
    Shapes: gain, shift (C,); weight (V, C); bias (V,). Raises DslmError if a gain is zero."""
    gain, shift, weight, bias = (t.double() for t in (gain, shift, weight, bias))
    k = int(torch.argmin(gain.abs() * weight.norm(dim=0)))
    others = torch.arange(len(gain)) != k
    if gain[others].abs().min() < 1e-6:
        raise DslmError("cannot fold the output head's bias: a final LayerNorm gain is zero")
    moved = torch.outer(weight[:, k], gain[k] / gain)  # head weight taken over from k, per dimension
    new_weight = weight - moved
    new_weight[:, k] = bias + weight[:, k] * shift[k] + (moved[:, others] * shift[others]).sum(dim=1)
    new_gain, new_shift = gain.clone(), shift.clone()
    new_gain[k], new_shift[k] = 0.0, 1.0
    return new_gain.float(), new_shift.float(), new_weight.float()


def gpt2_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """dslm's `weights` under dslm's names as GPT-2 holds them: padded vocab rows dropped, the
    head's bias folded into the final LayerNorm and the head (fold_head_bias) and dropped. A tied
    head stays tied only where there was no bias to fold. Shapes as in dslm (Linear: (out, in))."""
    vocab = cfg.vocab_size
    weights = {
        **weights,
        "wte.weight": weights["wte.weight"][:vocab],
        "lm_head.weight": weights["lm_head.weight"][:vocab],
    }
    if "lm_head.bias" in weights:
        folded = fold_head_bias(
            weights["ln_f.weight"], weights["ln_f.bias"], weights["lm_head.weight"], weights.pop("lm_head.bias")[:vocab]
        )
        weights.update(zip(("ln_f.weight", "ln_f.bias", "lm_head.weight"), folded))
    return weights


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict for dslm's `weights` (gpt2_weights; a tied head is written as
    its own tensor, since folding the bias changes it)."""
    weights = gpt2_weights(weights, cfg)
    # copies: a tied head and the embedding are one tensor, and safetensors refuses shared storage
    return {
        theirs: (weights[ours].t() if is_conv1d(ours) else weights[ours]).to(torch.float32, copy=True).contiguous()
        for ours, theirs in weight_names(cfg).items()
    }


def dslm_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    """dslm's weights for GPT2LMHeadModel's read from `source` (named in errors): the inverse of
    `hf_state_dict`. A tied head may be left out of the file. Raises DslmError for a missing tensor."""
    out = {}
    for ours, theirs in weight_names(cfg).items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            out[ours] = out["wte.weight"]
        elif theirs not in hf:
            raise DslmError(f"{source} has no tensor {theirs}")
        else:
            out[ours] = hf[theirs].t() if is_conv1d(ours) else hf[theirs]
    return out
