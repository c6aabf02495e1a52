import io
import json
import re
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
from dslm_shards.build import ShardConfig, TokenizerSample, build_shards, train_and_save_tokenizer
from dslm_shards.filters import DocumentFilter
from dslm_shards.sources import CodeSource
from dslm_shards.tokenizer import train_tokenizer

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
    train_tokenizer(TRICKY * 20 + ["some more ordinary text for merges"] * 20, vocab_size=300).save(
        str(tmp_path / "t.json")
    )
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
    first_doc = tok.decode(stream[1 : stream.index(EOS_ID)], skip_special_tokens=False)
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "code:/no/such/folder"], "is not a folder"),
        (["--source", "web:/tmp"], "expected code:FOLDER"),
    ],
)
def test_cli_bad_source_is_one_line(tmp_path, args, message):
    cmd = [sys.executable, "-m", "dslm_shards.cli", "build", *args, "--tokenizer", "t.json", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def test_cli_empty_source_for_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    cmd = [
        sys.executable,
        "-m",
        "dslm_shards.cli",
        "tokenizer",
        "--source",
        f"code:{tmp_path / 'src'}",
        "--out",
        str(tmp_path / "tok.json"),
    ]
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
    a = write_files(
        tmp_path / "a",
        {
            "m.py": header + body,
            "tests/t.py": body + "#t\n",
            "test_x.py": body + "#x\n",
            "tiny.py": "x = 1\n",
            "Main.java": "class Main {\n  int x;\n}\n" * 5,
        },
    )
    b = write_files(tmp_path / "b", {"copy.py": body})  # m.py without its header: a duplicate
    out, _ = tiny_shards
    cfg = ShardConfig(out=tmp_path / "out", tokenizer=out / "tokenizer.json", seq_len=16, samples_per_shard=100)
    manifest = build_shards(cfg, [CodeSource(spec="a", root=a), CodeSource(spec="b", root=b)]).manifest
    assert manifest.sources["a"].filtered == {"test_file": 2, "too_few_lines": 1}
    assert (manifest.sources["a"].documents, manifest.sources["a"].headers_stripped) == (2, 1)
    assert manifest.sources["b"].filtered == {"duplicate": 1} and manifest.sources["b"].documents == 0


def test_tokenizer_sample_is_weighted_and_reports_tokens_per_byte(tmp_path, code_corpus):
    out = tmp_path / "tok.json"
    sources = [
        CodeSource(spec="json", root=code_corpus / "json", weight=1.0),
        CodeSource(spec="email", root=code_corpus / "email", weight=3.0),
    ]
    sample = TokenizerSample(sample_bytes=40_000)
    list(sample.texts(sources, DocumentFilter()))
    taken = {spec: sum(len(t.encode()) for t in texts) for (spec, _), texts in sample.report.items()}
    json_bytes = sum(p.stat().st_size for p in (code_corpus / "json").rglob("*.py"))
    assert 10_000 <= taken["json"] < json_bytes  # a quarter of the sample, then it stops
    assert taken["email"] >= 30_000
    ratios = train_and_save_tokenizer(sources, 400, 40_000, out)
    assert set(ratios) == {("json", "python"), ("email", "python")}
    assert all(0.1 < r < 1.0 for r in ratios.values()) and out.is_file()


def small_tree(root):
    """Issue 15's case: 3 Python files that fill samples, and 1 C and 1 Java file too short for one."""
    body = "".join(f"def f{i}(x):\n    return x * {i} + {i}\n" for i in range(12))
    return write_files(
        root,
        {
            **{f"py/m{n}.py": f"# module {n}\n" + body for n in range(3)},
            "cj/a.c": "int a(void) {\n  return 1;\n}\n",
            "cj/Main.java": "class Main {\n  int x;\n}\n",
        },
    )


def test_tokens_dropped_at_stream_ends_are_counted_and_a_language_without_a_sample_is_named(
    tiny_shards, tmp_path, capsys
):
    """Each (split, copy, language) stream's last, partial sample is dropped: every token is either
    in a shard or counted as dropped, per stream and per source, and a language or source left with
    no sample gets one warning line each."""
    root = small_tree(tmp_path / "tree")
    sources = [CodeSource(spec="py", root=root / "py"), CodeSource(spec="cj", root=root / "cj")]
    cfg = ShardConfig(
        out=tmp_path / "out",
        tokenizer=tiny_shards[0] / "tokenizer.json",
        seq_len=64,
        samples_per_shard=100,
        val_fraction=0.0,
        workers=0,
    )
    manifest = build_shards(cfg, sources).manifest
    py, cj = manifest.sources["py"], manifest.sources["cj"]
    assert (py.documents, cj.documents) == (3, 2)
    assert {language for entry in manifest.shards for language in entry.languages} == {"python"}
    assert set(manifest.dropped_tokens) == {"train.0.c", "train.0.java", "train.0.python"}
    assert (
        cj.dropped_tokens == cj.tokens == manifest.dropped_tokens["train.0.c"] + manifest.dropped_tokens["train.0.java"]
    )
    assert py.dropped_tokens == manifest.dropped_tokens["train.0.python"] < manifest.seq_len + 1
    assert sum(e.tokens for e in manifest.shards) + sum(manifest.dropped_tokens.values()) == py.tokens + cj.tokens
    warnings = re.findall(r"dslm-shard: warning: (.*)", capsys.readouterr().err)
    assert [w.split(" has no sample: ")[0] for w in warnings] == ["language 'c'", "language 'java'", "source 'cj'"]
    assert all("in the last, partial sample" in w and "lower --seq-len" in w for w in warnings)
    assert Manifest.load(cfg.out) == manifest


def test_the_summary_shows_the_dropped_tokens(tiny_shards, tmp_path):
    root = small_tree(tmp_path / "tree")
    cmd = [
        sys.executable,
        "-m",
        "dslm_shards.cli",
        "build",
        "--source",
        f"code:{root}",
        "--tokenizer",
        str(tiny_shards[0] / "tokenizer.json"),
        "--out",
        str(tmp_path / "out"),
        "--seq-len",
        "64",
        "--val-fraction",
        "0",
        "--workers",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dropped = Manifest.load(tmp_path / "out").dropped_tokens
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("dropped: ")]
    assert all(f"{name} {n:,}" in line for name, n in dropped.items())
    assert f"{sum(dropped.values()):,} tokens dropped at stream ends" in proc.stdout
    assert proc.stderr.count("has no sample") == 2  # c and java; the source has python too


def test_a_manifest_written_before_the_dropped_counts_loads(tiny_shards, tmp_path):
    out, manifest = tiny_shards
    raw = json.loads((out / "manifest.json").read_text())
    del raw["dropped_tokens"]
    for stats in raw["sources"].values():
        del stats["dropped_tokens"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    old = Manifest.load(tmp_path)
    assert old.dropped_tokens == {} and all(s.dropped_tokens == 0 for s in old.sources.values())
    assert old.shards == manifest.shards
