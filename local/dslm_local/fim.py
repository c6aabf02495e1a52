"""Fill-in-the-middle (FIM; Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle", arXiv:2207.14255): the four special tokens, with StarCoder's names, and the two orders
in which a document's prefix P, middle M and suffix S are laid out:

- PSM: `<fim_prefix> P <fim_suffix> S <fim_middle> M`
- SPM: `<fim_prefix> <fim_suffix> S <fim_middle> P M` (the variant SantaCoder and StarCoder train,
  in which the prefix runs on into the middle)

Training writes a document that way between `<bos>` and `<eos>` (dslm.data.fim), so the model ends
a middle with `<eos>`; completion at a cursor feeds PSM with an empty middle (FimIds.cursor_prompt,
the one home of that prompt for dslm-complete and dslm-generate). Here, without torch, for
dslm-complete as for training."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from dslm_local.errors import DslmError

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FIM_TOKENS = [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD]
"""Added after dslm's own special tokens by `dslm-shard tokenizer --fim`; `<fim_pad>` is reserved."""


@dataclass(frozen=True)
class FimIds:
    """The ids of the FIM tokens in one tokenizer."""

    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> FimIds | None:
        """The tokenizer's FIM ids, or None when it lacks any of the four tokens."""
        ids = [tokenizer.token_to_id(token) for token in FIM_TOKENS]
        return None if None in ids else cls(*ids)

    def psm(self, prefix: list[int], suffix: list[int], middle: list[int]) -> list[int]:
        return [self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]

    def spm(self, prefix: list[int], suffix: list[int], middle: list[int]) -> list[int]:
        return [self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]

    def cursor_prompt(self, bos: int, prefix: list[int], suffix: list[int], room: int | None = None) -> list[int]:
        """The prompt that asks for the middle at a cursor, as training lays out a PSM document:
        `<bos> <fim_prefix> prefix <fim_suffix> suffix <fim_middle>` (token ids; the model writes
        the middle and ends it with <eos>). Given `room` (tokens), a longer prompt keeps the code
        nearest the cursor (fit_around, in the room the four markers leave). Raises DslmError when
        `room` leaves no place for the markers."""
        if room is not None and 4 + len(prefix) + len(suffix) > room:
            if room < 4:
                raise DslmError(
                    f"a prompt at a cursor takes 4 tokens (<bos> and the FIM markers) and the context leaves room "
                    f"for {room} beside the new tokens: ask for fewer new tokens"
                )
            prefix, suffix = fit_around(prefix, suffix, room - 4)
        return [bos, *self.psm(prefix, suffix, [])]

    def unscramble(self, ids: list[int]) -> list[int]:
        """The document order (P M S) of `ids` laid out as PSM or SPM; `ids` as they are when they
        hold no FIM layout. Raises ValueError for a layout that is neither."""
        if not ids or ids[0] != self.prefix:
            return list(ids)
        if len(ids) > 1 and ids[1] == self.suffix:  # SPM: S, then P M run together
            mid = ids.index(self.middle)
            return [*ids[mid + 1 :], *ids[2:mid]]
        suffix, mid = ids.index(self.suffix), ids.index(self.middle)
        if not 0 < suffix < mid:
            raise ValueError("not a PSM or SPM layout")
        return [*ids[1:suffix], *ids[mid + 1 :], *ids[suffix + 1 : mid]]


def fit_around(before: list[int], after: list[int], room: int) -> tuple[list[int], list[int]]:
    """The tokens nearest a cursor that fit in `room` (>= 0) together: the end of `before` (the code
    before the cursor) and the start of `after` (the code after it), each given half the room where
    both need more, and what one leaves to the other (learned positions cannot slide)."""
    if len(before) + len(after) <= room:
        return before, after
    kept_before = min(len(before), room - min(len(after), room // 2))
    return before[len(before) - kept_before :], after[: room - kept_before]


def check_model_tokenizer(tokenizer: Tokenizer, fim: bool, where: str) -> None:
    """DslmError naming `where` (a model's folder) when its config says it was trained to fill in
    the middle (`fim`) and its tokenizer lacks the FIM tokens: the two do not belong together."""
    if fim and FimIds.of(tokenizer) is None:
        raise DslmError(
            f"{where} was trained to fill in the middle, but its tokenizer.json has no {', '.join(FIM_TOKENS)}: "
            f"it is not the tokenizer the model was trained with"
        )
