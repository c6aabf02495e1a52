"""Fill-in-the-middle training data (dslm.data.fim, dslm_local.fim, `dslm-shard tokenizer --fim`,
`dslm-shard build --fim-rate`), from documents of real Python."""

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dslm.config import RunConfig, check_against_manifest
from dslm.data.fim import FimConfig, fim_cut, fim_layout, fim_pieces
from dslm.data.loader import DataConfig
from dslm.data.manifest import Manifest
from dslm.data.tokens import BOS_ID, EOS_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm.export import main as export_main
from dslm_local.fim import FimIds
from dslm_shards.build import ShardConfig, build_shards, train_and_save_tokenizer
from dslm_shards.encode import Encoder, EncoderConfig
from dslm_shards.filters import FilterConfig
from dslm_shards.sources import CodeSource, Document
from tests.conftest import TINY_SEQ_LEN
from tests.dslm.test_train import BIN, train_args
from tests.shards.test_build import read_samples


@pytest.fixture(scope="module")
def fim_tokenizer(fim_shards):
    return fim_shards / "tokenizer.json"


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


FIM_STEPS = 1200
SHAPES = {"rectangle": "w * h", "triangle": "w * h / 2", "ellipse": "math.pi * w * h / 4"}


def shape_file(number: int, shape: str) -> str:
    """Files alike up to the line that computes the area, told apart by it and the comment after it."""
    return f"# shape {number}\ndef area(w, h):\n    result = {SHAPES[shape]}\n    return result  # {shape}\n"


def trained_export(corpus: Path, tokenizer: Path, out: Path, fim: FimConfig, steps: int) -> Path:
    """Shards of `corpus`, a tiny model trained on them for `steps`, and its ONNX export."""
    shards = out / "shards"
    shards.mkdir(parents=True)
    shutil.copy(tokenizer, shards / "tokenizer.json")
    # 50 copies of each file, each with a FIM cut of its own: the model learns to fill in, not 60 cuts
    source = CodeSource(spec=f"code:{corpus},weight=50", root=corpus, weight=50.0)
    cfg = ShardConfig(
        out=shards, tokenizer=shards / "tokenizer.json", seq_len=128, val_fraction=0.0, workers=0, fim=fim
    )  # seq_len: a sample holds a few whole documents
    build_shards(cfg, [source])
    settings = dict(micro_batch_size=16, grad_accum=1, max_steps=steps, lr=5e-3, min_lr=5e-4, warmup_steps=10)
    args = train_args(shards, out, "m", **settings, log_interval=100, checkpoint_interval=steps, val_interval=0)
    fp32 = out / "fp32.json"  # float32 without ZeRO: on a CPU, several times the steps per second of bf16
    fp32.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}))
    args[args.index("--deepspeed") + 1] = str(fp32)
    subprocess.run([BIN / "dslm-train", *args], check=True, capture_output=True, cwd=out, timeout=1800)
    export_main([str(out / "m"), "--format", "onnx"])
    return out / "m" / "export" / f"step{steps}-onnx"


@pytest.mark.slow
def test_a_fim_model_fills_a_masked_line_at_a_cursor_which_a_prefix_only_model_cannot(tmp_path):
    """A tiny model trained on FIM shards of a few files fills the line masked in each of three
    files through `dslm-complete --file --line --column`. The three share the text before the
    cursor, so the same model trained without FIM, which sees only that text, gives one
    completion for all three and fills at most one."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(20):
        for shape in SHAPES:
            (corpus / f"{shape}_{number}.py").write_text(shape_file(number, shape))
    tokenizer = tmp_path / "tokenizer.json"
    train_and_save_tokenizer([CodeSource(spec=f"code:{corpus}", root=corpus)], 300, 10**9, tokenizer, fim=True)
    fim = trained_export(corpus, tokenizer, tmp_path / "fim", FimConfig(rate=1.0, spm_rate=0.0), FIM_STEPS)  # PSM
    # shorter: what it is given is the same for the three files, however long it trains
    plain = trained_export(corpus, tokenizer, tmp_path / "plain", FimConfig(), FIM_STEPS // 6)

    def complete_masked(export: Path, shape: str) -> subprocess.CompletedProcess:
        lines = shape_file(7, shape).splitlines(keepends=True)
        lines[2] = "\n"  # the line that computes the area, emptied; the cursor at its start
        masked = tmp_path / f"{shape}.py"
        masked.write_text("".join(lines))
        return subprocess.run(
            [BIN / "dslm-complete", export, "--file", masked, "--line", "3", "--column", "1"],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )

    wanted = {shape: f"    result = {expr}\n" for shape, expr in SHAPES.items()}
    assert {shape: complete_masked(fim, shape).stdout for shape in SHAPES} == wanted
    prefix_only = {shape: complete_masked(plain, shape) for shape in SHAPES}
    assert len({done.stdout for done in prefix_only.values()}) == 1
    assert sum(prefix_only[shape].stdout == wanted[shape] for shape in SHAPES) <= 1
    assert all(
        "not trained to fill in the middle" in done.stderr and done.stderr.count("\n") == 1
        for done in prefix_only.values()
    )
