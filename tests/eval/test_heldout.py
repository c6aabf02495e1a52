"""The val split as eval reads it: samples labelled by language, whole held-out documents, bytes per
token, and perplexity per language."""

import shutil
import unicodedata

import pytest
import torch

from dslm.data.loader import ShardSamples
from dslm.data.tokens import BOS_ID, EOS_ID, load_text_tokenizer
from dslm.model import GPT, ModelConfig
from dslm_eval.heldout import LabeledSamples, heldout_documents, split_documents, token_bytes
from dslm_eval.perplexity import ALL, perplexity
from dslm_shards.build import ShardConfig, build_shards, train_and_save_tokenizer
from dslm_shards.sources import CodeSource

C_FILE = """#include <stdio.h>

static int scale_{i}(int x) {{
    int total = 0;
    for (int k = 0; k < x; k++) {{
        total += k * {i};
    }}
    return total;
}}

int main(void) {{
    printf("%d\\n", scale_{i}({i}));
    return 0;
}}
"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, code_corpus):
    """Shards of real Python (stdlib json and email) and small C programs, a third of them in val."""
    root = tmp_path_factory.mktemp("mixed")
    corpus = root / "corpus"
    shutil.copytree(code_corpus, corpus)
    for i in range(40):
        (corpus / f"prog{i}.c").write_text(C_FILE.format(i=i))
    sources = [CodeSource(spec=f"code:{corpus}", root=corpus)]
    out = root / "shards"
    train_and_save_tokenizer(sources, 512, sample_bytes=10**9, out=out / "tokenizer.json")
    cfg = ShardConfig(
        out=out, tokenizer=out / "tokenizer.json", seq_len=64, samples_per_shard=200, val_fraction=0.3, workers=0
    )
    manifest = build_shards(cfg, sources).manifest
    return corpus, out, manifest


def test_samples_carry_their_language_and_the_manifest_counts_them(mixed):
    _, out, manifest = mixed
    val = manifest.split("val")
    samples = LabeledSamples(ShardSamples(out, manifest, "val"))
    assert samples.languages == ["c", "python"]
    counts = {name: samples.labels.count(i) for i, name in enumerate(samples.languages)}
    assert counts == {name: sum(e.languages.get(name, 0) for e in val) for name in samples.languages}


def test_held_out_documents_are_whole_val_files(mixed):
    corpus, out, manifest = mixed
    tokenizer = load_text_tokenizer(out / "tokenizer.json")
    documents = heldout_documents(
        LabeledSamples(ShardSamples(out, manifest, "val")), tokenizer, {"python", "c"}, limit=1000
    )
    c_files = {unicodedata.normalize("NFKC", p.read_text()) for p in corpus.glob("*.c")}
    py_files = [unicodedata.normalize("NFKC", p.read_text()) for p in corpus.rglob("*.py")]
    assert documents["c"] and all(doc in c_files for doc in documents["c"]), "a C document is a whole file"
    # Python files may lose a long leading header to the filters: what is kept ends the file
    assert documents["python"] and all(any(f.endswith(doc) for f in py_files) for doc in documents["python"])
    assert (
        len(heldout_documents(LabeledSamples(ShardSamples(out, manifest, "val")), tokenizer, {"c"}, limit=3)["c"]) == 3
    )


def test_split_documents_leaves_out_a_document_cut_at_the_end():
    stream = torch.tensor([BOS_ID, 10, 11, EOS_ID, BOS_ID, 12, EOS_ID, BOS_ID, 13]).numpy()
    assert [d.tolist() for d in split_documents(stream)] == [[10, 11], [12]]


def test_token_bytes_count_the_text_each_token_decodes_to(mixed):
    _, out, _ = mixed
    tokenizer = load_text_tokenizer(out / "tokenizer.json")
    table = token_bytes(tokenizer, 512)
    assert table[BOS_ID] == 0 and table[EOS_ID] == 0
    ids = tokenizer.encode("def f(x):\n    return 'é'\n").ids
    assert int(table[ids].sum()) == len("def f(x):\n    return 'é'\n".encode())


def test_perplexity_per_language_adds_up_to_the_whole(mixed):
    _, out, manifest = mixed
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=512, block_size=64)).eval()
    samples = LabeledSamples(ShardSamples(out, manifest, "val"))
    table = token_bytes(load_text_tokenizer(out / "tokenizer.json"), 512)
    results = perplexity(model, samples, table, batch_size=7, device=torch.device("cpu"))
    assert set(results) == {ALL, "c", "python"}
    parts = [results["c"], results["python"]]
    assert sum(p.tokens for p in parts) == results[ALL].tokens
    assert sum(p.bytes for p in parts) == results[ALL].bytes
    assert abs(sum(p.loss * p.tokens for p in parts) / results[ALL].tokens - results[ALL].loss) < 1e-9
    whole = results[ALL]
    assert abs(whole.bpb - whole.loss * whole.tokens / (whole.bytes * 0.6931471805599453)) < 1e-9
