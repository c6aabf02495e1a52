import io
import subprocess
import sys
import tarfile
import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer

from dslm.data.manifest import Manifest
from dslm.data.tokens import BOS_ID, EOS_ID, SPECIAL_TOKENS, load_text_tokenizer
from dslm.files import sha256_file
from shards.build import ShardConfig, TokenizerSample, build_shards, train_and_save_tokenizer
from shards.filters import DocumentFilter
from shards.sources import CodeSource
from shards.tokenizer import train_tokenizer

TRICKY = [
    "def f(x):\n\treturn x  \n",
    "café naïve ﬁne ① Ｆｕｌｌ",  # NFKC folds the ligature, circled digit and full-width letters
    "emoji 🚀 and 中文, trailing spaces   \n\n",
    "  leading spaces and <bos> as plain text",
]


def read_samples(path):
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".tokens.npy")), key=lambda m: m.name)
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in members]


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    train_tokenizer(TRICKY * 20 + ["some more ordinary text for merges"] * 20, vocab_size=300).save(str(tmp_path / "t.json"))
    tok = load_text_tokenizer(tmp_path / "t.json")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for text in TRICKY:
        normalized = unicodedata.normalize("NFKC", text)
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == normalized
        assert BOS_ID not in ids  # "<bos>" written in a document stays text
    assert "ﬁ" not in tok.decode(tok.encode("ﬁ").ids)


def test_shard_round_trip(tiny_shards, code_corpus):
    out, manifest = tiny_shards
    assert Manifest.load(out) == manifest
    assert not list(out.glob(".*tmp")), "temporary files left behind"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert manifest.tokenizer_sha256 == sha256_file(out / "tokenizer.json")
    assert manifest.vocab_size == tok.get_vocab_size() == 512
    stream = []
    for entry in manifest.split("train"):
        samples = read_samples(out / entry.name)
        assert len(samples) == entry.samples
        assert all(s.dtype == np.uint16 and s.shape == (manifest.seq_len + 1,) for s in samples)
        assert entry.sha256 == sha256_file(out / entry.name)
        assert entry.tokens == entry.samples * (manifest.seq_len + 1)
        stream.extend(np.concatenate(samples).tolist())
    assert stream[0] == BOS_ID
    # Documents come back whole (less a long leading header), framed <bos> ... <eos>.
    first_doc = tok.decode(stream[1:stream.index(EOS_ID)], skip_special_tokens=False)
    assert len(first_doc) > 100 and any(p.read_text().endswith(first_doc) for p in code_corpus.rglob("*.py"))
    total = sum(e.tokens for e in manifest.shards)
    assert 0 < manifest.sources[f"code:{code_corpus}"].tokens - total < 2 * (manifest.seq_len + 1)
    assert manifest.split("val"), "val split is empty"


def test_rebuild_needs_overwrite(tiny_shards, code_corpus, tmp_path):
    out, _ = tiny_shards
    target = tmp_path / "again"
    cfg = ShardConfig(out=target, tokenizer=out / "tokenizer.json", seq_len=32, samples_per_shard=50)
    sources = [CodeSource(spec="code", root=code_corpus / "json")]
    first = build_shards(cfg, sources).manifest
    with pytest.raises(Exception, match="--overwrite"):
        build_shards(cfg, sources)
    cfg.overwrite = True
    assert build_shards(cfg, sources).manifest == first  # deterministic
    assert sorted(p.name for p in target.glob("*.tar")) == sorted(e.name for e in first.shards)


@pytest.mark.parametrize("args, message", [
    (["--source", "code:/no/such/folder"], "is not a folder"),
    (["--source", "web:/tmp"], "expected code:FOLDER"),
])
def test_cli_bad_source_is_one_line(tmp_path, args, message):
    cmd = [sys.executable, "-m", "shards.cli", "build", *args, "--tokenizer", "t.json", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def test_cli_empty_source_for_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    cmd = [sys.executable, "-m", "shards.cli", "tokenizer", "--source", f"code:{tmp_path / 'src'}",
           "--out", str(tmp_path / "tok.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "sources are empty" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "tok.json").exists()


def write_files(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_build_filters_and_counts_per_reason(tiny_shards, tmp_path):
    body = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40))
    header = "".join(f"# license line {i}\n" for i in range(25))
    a = write_files(tmp_path / "a", {"m.py": header + body, "tests/t.py": body + "#t\n", "test_x.py": body + "#x\n",
                                     "tiny.py": "x = 1\n", "Main.java": "class Main {\n  int x;\n}\n" * 5})
    b = write_files(tmp_path / "b", {"copy.py": body})  # m.py without its header: a duplicate
    out, _ = tiny_shards
    cfg = ShardConfig(out=tmp_path / "out", tokenizer=out / "tokenizer.json", seq_len=16, samples_per_shard=100)
    manifest = build_shards(cfg, [CodeSource(spec="a", root=a), CodeSource(spec="b", root=b)]).manifest
    assert manifest.sources["a"].filtered == {"test_file": 2, "too_few_lines": 1}
    assert (manifest.sources["a"].documents, manifest.sources["a"].headers_stripped) == (2, 1)
    assert manifest.sources["b"].filtered == {"duplicate": 1} and manifest.sources["b"].documents == 0


def test_tokenizer_sample_is_weighted_and_reports_tokens_per_byte(tmp_path, code_corpus):
    out = tmp_path / "tok.json"
    sources = [CodeSource(spec="json", root=code_corpus / "json", weight=1.0),
               CodeSource(spec="email", root=code_corpus / "email", weight=3.0)]
    sample = TokenizerSample(sample_bytes=40_000)
    list(sample.texts(sources, DocumentFilter()))
    taken = {spec: sum(len(t.encode()) for t in texts) for (spec, _), texts in sample.report.items()}
    json_bytes = sum(p.stat().st_size for p in (code_corpus / "json").rglob("*.py"))
    assert 10_000 <= taken["json"] < json_bytes  # a quarter of the sample, then it stops
    assert taken["email"] >= 30_000
    ratios = train_and_save_tokenizer(sources, 400, 40_000, out)
    assert set(ratios) == {("json", "python"), ("email", "python")}
    assert all(0.1 < r < 1.0 for r in ratios.values()) and out.is_file()
