"""Instruction templates: how an (instruction, response) example is framed in tokens for training,
and how a prompt is framed for generation, in either reading direction.

A template is data: the order of its two blocks in the text and whether their words are
reversed. Each block is `<|im_start|><|ROLE|>` text `<|im_end|>` with the tokenizer's reserved
tokens (dslm.data.tokens), and an example is `<bos>` block block `<eos>`. The loss is on the
block the model reads last (its *target*): its text and the marker that closes it in the reading
direction, `<|im_end|>` forward, `<|ROLE|><|im_start|>` backward (read right to left). The other
block is what the model is given.

- `instruct` (instruction, then response): forward, the model answers the instruction; trained
  backward, it writes the instruction that leads to a given response.
- `backchat` (response, then instruction, each reversed word by word), the BackChat model's
  format (docs/architecture.md, "The model cards"): trained forward, the model reads a response and writes the
  instruction, both word-reversed; generation turns the words back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from dslm.data.tokens import BOS_ID, EOS_ID, SPECIAL_TOKENS
from dslm.errors import DslmError

DIRECTIONS = ("forward", "backward")
"""Reading directions: forward predicts token t + 1 from tokens 0..t (GPT); backward reads each
sample reversed in token order, so it predicts token t from the tokens after it."""
ROLES = ("instruction", "response")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def role_marker(role: str) -> str:
    return f"<|{role}|>"


def reverse_words(text: str) -> str:
    """The words of `text` (split on whitespace) in reverse order, joined by single spaces, as the
    BackChat card frames its examples; line breaks become spaces. Its own inverse on such text."""
    return " ".join(reversed(text.split()))


@dataclass(frozen=True)
class Template:
    """One registry entry. `order` lists the two roles (ROLES) in text order."""

    name: str
    order: tuple[str, str]
    reverse_words: bool = False
    """Each block's words are reversed (reverse_words) before encoding."""
    summary: str = ""

    def target(self, direction: str) -> str:
        """The role the model writes: the block it reads last in `direction`."""
        return self.order[-1] if direction == "forward" else self.order[0]

    def given(self, direction: str) -> str:
        """The role the model is given: the block it reads first in `direction`."""
        return self.order[0] if direction == "forward" else self.order[-1]

    def text(self, text: str) -> str:
        return reverse_words(text) if self.reverse_words else text


TEMPLATES = {
    "instruct": Template(
        "instruct",
        ("instruction", "response"),
        summary="instruction then response; forward: the loss is on the response",
    ),
    "backchat": Template(
        "backchat",
        ("response", "instruction"),
        reverse_words=True,
        summary="response then instruction, words reversed (the BackChat card); forward: the "
        "loss is on the instruction",
    ),
}


@dataclass(frozen=True)
class Framing:
    """How a model reads its input, as it was trained: generation and eval follow it."""

    direction: str = "forward"
    """data.direction of its training run (DIRECTIONS)."""
    template: str = ""
    """The template of its instruction shards (TEMPLATES); "" when it was trained on documents."""
    fim: bool = False
    """Trained with fill-in-the-middle documents (dslm.data.fim): it can complete at a cursor with
    the code after it."""


def stop_token(framing: Framing) -> int:
    """The token after which a model of `framing` has written what it was trained to write, in its
    reading order: with a template, the marker that closes the target (<|im_end|> forward,
    <|im_start|> backward); without one, the text's end (<eos> forward, <bos> backward)."""
    forward = framing.direction == "forward"
    if framing.template:
        return SPECIAL_TOKENS.index(IM_END if forward else IM_START)
    return EOS_ID if forward else BOS_ID


def get_template(name: str) -> Template:
    """Raises DslmError naming the known templates for another name."""
    if name not in TEMPLATES:
        raise DslmError(f"template {name!r} is not one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_direction(direction: str, what: str = "direction") -> str:
    """`direction` when it is one of DIRECTIONS; ValueError naming `what` otherwise."""
    if direction not in DIRECTIONS:
        raise ValueError(f"{what}={direction!r} is not one of {', '.join(DIRECTIONS)}")
    return direction


def marker_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the template markers in `tok`: each must be the special token dslm reserves for it
    (dslm.data.tokens.SPECIAL_TOKENS). Raises DslmError naming a marker the tokenizer lacks."""
    ids = {}
    for marker in (IM_START, IM_END, *map(role_marker, ROLES)):
        if tok.token_to_id(marker) != SPECIAL_TOKENS.index(marker):
            raise DslmError(
                f"the tokenizer has no special token {marker} at id {SPECIAL_TOKENS.index(marker)} "
                f"(templates need dslm's reserved tokens: build it with `dslm-shard tokenizer`)"
            )
        ids[marker] = SPECIAL_TOKENS.index(marker)
    return ids


class Framer:
    """Frames examples and prompts of one template with one tokenizer (text is encoded with the
    tokenizer's special tokens read as text, as dslm.data.tokens.load_text_tokenizer sets)."""

    def __init__(self, template: Template, tok: Tokenizer):
        self.template, self.tok = template, tok
        self.ids = marker_ids(tok)

    def opening(self, role: str) -> list[int]:
        return [self.ids[IM_START], self.ids[role_marker(role)]]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(self.template.text(text), add_special_tokens=False).ids

    def example(self, texts: dict[str, str], direction: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both (N,) in text order: `<bos>` block block `<eos>`; mask 1 on the target's
        text and the marker that closes it in `direction`. `texts` maps each role to its text."""
        target = self.template.target(direction)
        ids, mask = [BOS_ID], [0]
        for role in self.template.order:
            body = self.encode(texts[role])
            is_target = int(role == target)
            closes_backward = is_target and direction == "backward"
            ids += self.opening(role) + body + [self.ids[IM_END]]
            mask += [closes_backward] * 2 + [is_target] * len(body) + [is_target and not closes_backward]
        ids.append(EOS_ID)
        mask.append(0)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)

    def prompt(self, text: str, direction: str) -> list[int]:
        """Generation input in reading order: the given block holding `text`, then the target's
        opening marker(s) in `direction`, so the model writes the target's text next."""
        given, target = self.template.given(direction), self.template.target(direction)
        block = self.opening(given) + self.encode(text) + [self.ids[IM_END]]
        if direction == "forward":
            return [BOS_ID, *block, *self.opening(target)]
        return [*reversed(block + [EOS_ID]), self.ids[IM_END]]

    def stop_token(self, direction: str) -> int:
        """The token that closes the target in reading order."""
        return stop_token(Framing(direction, self.template.name))

    def reply(self, new: list[int], direction: str) -> str:
        """The target's text from generated ids in reading order (markers dropped, words turned back)."""
        ordered = new if direction == "forward" else new[::-1]
        text = self.tok.decode(ordered, skip_special_tokens=True)
        return self.template.text(text).strip() if self.template.reverse_words else text.strip()
