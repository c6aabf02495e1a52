"""Fill-in-the-middle training data (dslm.data.fim, dslm_local.fim, `dslm-shard tokenizer --fim`,
`dslm-shard build --fim-rate`), from documents of real Python."""

import dataclasses
import shutil

import numpy as np
import pytest

from dslm.config import RunConfig, check_against_manifest
from dslm.data.fim import FimConfig, fim_cut, fim_layout, fim_pieces
from dslm.data.loader import DataConfig
from dslm.data.manifest import Manifest
from dslm.data.tokens import BOS_ID, EOS_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm_local.fim import FimIds
from dslm_shards.build import ShardConfig, build_shards, train_and_save_tokenizer
from dslm_shards.encode import Encoder, EncoderConfig
from dslm_shards.filters import FilterConfig
from dslm_shards.sources import CodeSource, Document
from tests.conftest import TINY_SEQ_LEN, TINY_VOCAB
from tests.shards.test_build import read_samples


@pytest.fixture(scope="module")
def fim_tokenizer(tmp_path_factory, code_corpus):
    out = tmp_path_factory.mktemp("fim_tok") / "tokenizer.json"
    train_and_save_tokenizer(
        [CodeSource(spec=f"code:{code_corpus}", root=code_corpus)], TINY_VOCAB, 10**9, out, fim=True
    )
    return out


def documents(code_corpus, n):
    return [path.read_text() for path in sorted(code_corpus.rglob("*.py"))][:n]


def test_the_fim_tokens_follow_dslms_own(fim_tokenizer):
    tok = load_text_tokenizer(fim_tokenizer)
    assert FimIds.of(tok) == FimIds(prefix=8, middle=9, suffix=10, pad=11)
    assert tok.encode("<fim_prefix>").ids != [8]  # written in a document, it stays text


def test_every_layout_gives_the_document_back(fim_tokenizer, code_corpus):
    tok = load_text_tokenizer(fim_tokenizer)
    ids = FimIds.of(tok)
    seen = set()
    for text in documents(code_corpus, 60):
        cut = fim_cut(text, FimConfig(rate=1.0))
        tokens = fim_layout(ids, cut, [tok.encode(piece).ids for piece in fim_pieces(text, cut)])
        seen.add(cut.spm)
        assert tokens[0] == ids.prefix and tokens.count(ids.middle) == tokens.count(ids.suffix) == 1
        assert tok.decode(ids.unscramble(tokens)) == text
    assert seen == {True, False}


def test_the_rates_hold_over_a_thousand_documents_and_a_document_always_gets_its_cut():
    cfg = FimConfig(rate=0.5, spm_rate=0.5)
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(1000)]
    cuts = [fim_cut(text, cfg) for text in texts]
    chosen = [cut for cut in cuts if cut is not None]
    assert abs(len(chosen) / 1000 - 0.5) <= 0.02
    every = [fim_cut(text, dataclasses.replace(cfg, rate=1.0)) for text in texts]  # spm_rate over 1000 too
    assert abs(sum(cut.spm for cut in every) / 1000 - 0.5) <= 0.02
    assert all(0 <= cut.start <= cut.end <= len(text) for text, cut in zip(texts, cuts) if cut is not None)
    assert [fim_cut(text, cfg) for text in reversed(texts)] == cuts[::-1]  # its text's, not its place's
    assert [fim_cut(text, FimConfig(rate=0.5, seed=1)) for text in texts] != cuts


@pytest.mark.parametrize("rate, spm_rate", [(-0.1, 0.5), (1.5, 0.5), (0.5, 2.0)])
def test_rates_outside_0_to_1_are_one_line(rate, spm_rate):
    with pytest.raises(DslmError, match="must be within 0..1"):
        FimConfig(rate=rate, spm_rate=spm_rate)


def build(out, tokenizer, code_corpus, workers, **fim):
    out.mkdir()
    shutil.copy(tokenizer, out / "tokenizer.json")
    cfg = ShardConfig(
        out=out,
        tokenizer=out / "tokenizer.json",
        seq_len=TINY_SEQ_LEN,
        samples_per_shard=200,
        val_fraction=0.1,
        workers=workers,
        fim=FimConfig(**fim),
    )
    return build_shards(cfg, [CodeSource(spec=f"code:{code_corpus}", root=code_corpus)]).manifest


def test_a_fim_build_lays_out_train_documents_only_the_same_for_any_workers(tmp_path, fim_tokenizer, code_corpus):
    manifest = build(tmp_path / "a", fim_tokenizer, code_corpus, workers=0, rate=0.5)
    assert manifest.fim == {"rate": 0.5, "spm_rate": 0.5, "seed": 0}
    again = build(tmp_path / "b", fim_tokenizer, code_corpus, workers=2, rate=0.5)
    assert [e.sha256 for e in again.shards] == [e.sha256 for e in manifest.shards]
    ids = FimIds.of(load_text_tokenizer(fim_tokenizer))

    def count(split):
        tokens = np.concatenate([s for e in manifest.split(split) for s in read_samples(tmp_path / "a" / e.name)])
        return {name: int((tokens == getattr(ids, name)).sum()) for name in ("prefix", "middle", "suffix")} | {
            "bos": int((tokens == BOS_ID).sum()),
            "eos": int((tokens == EOS_ID).sum()),
        }

    train, val = count("train"), count("val")
    assert train["prefix"] == train["middle"] == train["suffix"] > 0
    assert val["prefix"] == val["middle"] == val["suffix"] == 0 and val["bos"] > 0
    plain = build(tmp_path / "c", fim_tokenizer, code_corpus, workers=0)
    assert plain.fim == {} and [e.sha256 for e in plain.split("val")] == [e.sha256 for e in manifest.split("val")]


def test_fim_on_a_tokenizer_without_its_tokens_is_one_line(tmp_path, tiny_shards, code_corpus):
    with pytest.raises(DslmError, match=r"--fim-rate 0.5 needs the FIM tokens.*dslm-shard tokenizer --fim"):
        build(tmp_path / "a", tiny_shards[0] / "tokenizer.json", code_corpus, workers=0, rate=0.5)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_a_backward_run_on_fim_shards_is_one_line(tiny_shards):
    fim = Manifest(**{**tiny_shards[1].__dict__, "fim": {"rate": 0.5, "spm_rate": 0.5, "seed": 0}})
    check_against_manifest(RunConfig(), fim)
    with pytest.raises(DslmError, match="a backward run"):
        check_against_manifest(RunConfig(data=DataConfig(direction="backward")), fim)


def test_each_copy_of_a_document_has_its_own_cut_and_gives_the_document_back(fim_tokenizer, code_corpus):
    """A source weight above 1 repeats a document: each repeat teaches another cut."""
    tok = load_text_tokenizer(fim_tokenizer)
    ids = FimIds.of(tok)
    docs = [Document(id=str(i), text=text, language="python") for i, text in enumerate(documents(code_corpus, 20))]
    cfg = EncoderConfig(fim_tokenizer, FilterConfig(), 0.0, "uint16", fim=FimConfig(rate=1.0))
    encoded = [enc for enc in Encoder(cfg)((docs, 3.0)) if enc.reason is None]
    assert encoded and all(len(enc.copies) == 3 for enc in encoded)
    for enc in encoded:
        assert len({tok.decode(ids.unscramble(copy[1:-1].tolist())) for copy in enc.copies}) == 1
    assert sum(len({copy.tobytes() for copy in enc.copies}) == 3 for enc in encoded) >= len(encoded) - 2
    plain = Encoder(dataclasses.replace(cfg, fim=FimConfig()))((docs, 3.0))
    assert all(len({id(copy) for copy in enc.copies}) == 1 for enc in plain if enc.reason is None)
