"""Document sources on real files: code folders and archives, local text, FineWeb from local files."""

import gzip
import io
import json
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dslm.data.manifest import SourceStats
from dslm.errors import DslmError
from dslm_shards.filters import DocumentFilter
from dslm_shards.sources import CodeSource, FineWebSource, Partition, TextSource, parse_source


def read(source):
    """(documents as (id, text, language) tuples, skip counts) of one full pass over `source`."""
    stats = SourceStats()
    docs = [(d.id, d.text, d.language) for d in source.documents(stats)]
    return docs, stats.filtered


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def fineweb_rows(prefix, n, language="en"):
    return [
        dict(
            text=f"{prefix} page {i}",
            id=f"<urn:{prefix}:{i}>",
            dump="CC-MAIN-2024-10",
            url=f"https://example.com/{prefix}/{i}",
            date="2024-02-20T10:00:00Z",
            file_path=f"s3://commoncrawl/{prefix}.warc.gz",
            language=language,
            language_score=0.93,
            token_count=3,
        )
        for i in range(n)
    ]


CODE_FILES = {
    "b/z.py": "z = 1\n",
    "a.c": "int a;\n",
    "b/inc/x.h": "#define X 1\n",
    "Main.java": "class Main {}\n",
    "README.md": "not code\n",
    "b/bad.py": b"\xff\xfe not utf-8\n",
    "b/empty.py": " \n\n",
    "skip/me.py": "excluded = True\n",
}
CODE_ORDER = ["Main.java", "a.c", "b/inc/x.h", "b/z.py"]
LANGUAGES = {"Main.java": "java", "a.c": "c", "b/inc/x.h": "c", "b/z.py": "python"}


@pytest.fixture
def code_folder(tmp_path):
    for name, content in CODE_FILES.items():
        write(tmp_path / "src" / name, content)
    return tmp_path / "src"


def test_code_folder_sorted_languages_skips_excludes(code_folder):
    source = parse_source(f"code:{code_folder}", exclude=("skip/*",))
    docs, filtered = read(source)
    assert [d[0] for d in docs] == CODE_ORDER  # paths below the folder
    assert [d[2] for d in docs] == [LANGUAGES[n] for n in CODE_ORDER]
    assert docs[0][1] == "class Main {}\n"
    assert filtered == {"invalid_utf8": 1, "empty": 1}
    assert source.spec == f"code:{code_folder}" and source.weight == 1.0


def make_zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in reversed(files.items()):  # stored order is not the order read
            archive.writestr(name, content)
    return path


def make_tar(path, files):
    with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as archive:
        for name, content in reversed(files.items()):
            data = content if isinstance(content, bytes) else content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "name, make", [("src.zip", make_zip), ("src.tar", make_tar), ("src.tar.gz", make_tar), ("src.tgz", make_tar)]
)
def test_code_archive_members_sorted_with_excludes(tmp_path, name, make):
    archive = make(tmp_path / name, CODE_FILES)
    docs, filtered = read(parse_source(f"code:{archive}", exclude=("skip/*", "*/inc/*")))
    expected = [n for n in CODE_ORDER if n != "b/inc/x.h"]
    assert [d[0] for d in docs] == expected
    assert [d[2] for d in docs] == [LANGUAGES[n] for n in expected]
    assert filtered == {"invalid_utf8": 1, "empty": 1}


def test_text_jsonl_parquet_txt_in_sorted_order_with_skips(tmp_path):
    data = tmp_path / "data"
    lines = [
        json.dumps({"content": "first"}),
        "",
        "{not json",
        json.dumps({"other": 1}),
        json.dumps({"content": ""}),
        json.dumps({"content": None}),
        json.dumps({"content": "\udc80"}),
        json.dumps({"content": "last, ünïcode"}),
    ]
    write(data / "b.jsonl", ("\n".join(lines) + "\n").encode() + b'{"content": "\xff"}\n')
    with gzip.open(data / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "zipped"}) + "\n")
    pq.write_table(
        pa.table({"content": ["row one", "  ", "row three"], "n": [1, 2, 3]}), data / "a.parquet", row_group_size=2
    )
    write(data / "sub" / "d.txt", "a whole file\n")
    write(data / "e.csv", "ignored,format\n")

    docs, filtered = read(parse_source(f"text:{data},field=content"))
    assert docs == [
        (f"{data}/a.parquet:1", "row one", "text"),
        (f"{data}/a.parquet:3", "row three", "text"),
        (f"{data}/b.jsonl:1", "first", "text"),
        (f"{data}/b.jsonl:8", "last, ünïcode", "text"),
        (f"{data}/c.jsonl.gz:1", "zipped", "text"),
        (f"{data}/sub/d.txt", "a whole file\n", "text"),
    ]
    # bad_record: not JSON, no field, null field; invalid_utf8: lone surrogate and a bad byte
    assert filtered == {"bad_record": 3, "empty": 2, "invalid_utf8": 2}


BOM = b"\xef\xbb\xbf"
CODE = "x = 1\n"


def bom_jsonl_bytes(field="text", rows=None):
    """A jsonl file that starts with a BOM, whose first value starts with one too; its second
    record is a BOM and nothing else."""
    rows = rows or [{field: "\ufeff" + CODE}, {field: "\ufeff"}]
    return BOM + b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


def bom_fineweb_rows():
    first, second = fineweb_rows("bom", 2)
    return [{**first, "text": "\ufeff" + CODE}, {**second, "text": "\ufeff"}]


def bom_files(d, make, suffix):
    """A file holding CODE after a BOM and one holding only a BOM, made by `make(path, content)`."""
    make(d / f"a{suffix}", BOM + CODE.encode())
    make(d / f"b{suffix}", BOM)
    return d


def bom_parquet(d, rows):
    pq.write_table(pa.Table.from_pylist(rows), d / "a.parquet")
    return d / "a.parquet"


BOM_SOURCES = {
    "code folder": lambda d: f"code:{bom_files(d, write, '.py')}",
    "code zip": lambda d: f"code:{make_zip(d / 'a.zip', {'a.py': BOM + CODE.encode(), 'b.py': BOM})}",
    "code tar.gz": lambda d: f"code:{make_tar(d / 'a.tgz', {'a.py': BOM + CODE.encode(), 'b.py': BOM})}",
    "text txt": lambda d: f"text:{bom_files(d, write, '.txt')}",
    "text jsonl": lambda d: f"text:{write(d / 'a.jsonl', bom_jsonl_bytes())}",
    "text jsonl.gz": lambda d: f"text:{write(d / 'a.jsonl.gz', gzip.compress(bom_jsonl_bytes()))}",
    "text parquet": lambda d: f"text:{bom_parquet(d, [{'text': chr(0xFEFF) + CODE}, {'text': chr(0xFEFF)}])}",
    "fineweb jsonl": lambda d: f"fineweb:{write(d / 'a.jsonl', bom_jsonl_bytes(rows=bom_fineweb_rows()))}",
    "fineweb parquet": lambda d: f"fineweb:{bom_parquet(d, bom_fineweb_rows())}",
}


@pytest.mark.parametrize("kind", BOM_SOURCES)
def test_a_byte_order_mark_is_stripped_from_every_kind_of_source(tmp_path, kind):
    """A UTF-8 BOM at the start of a file or of a record's text is not text: the document reads as
    without it, and a document that is only a BOM is empty."""
    docs, filtered = read(parse_source(BOM_SOURCES[kind](tmp_path)))
    assert [text for _, text, _ in docs] == [CODE]
    assert filtered == {"empty": 1}


def test_a_byte_order_mark_does_not_stop_header_stripping(tmp_path):
    header = "".join(f"# license line {i}\n" for i in range(25))
    body = "def f(x):\n    return x + 1\n\n\nprint(f(1))\n"
    write(tmp_path / "plain" / "m.py", header + body)
    write(tmp_path / "bom" / "m.py", BOM + BOM + (header + body).encode())
    verdicts = [
        DocumentFilter().apply(doc)
        for folder in ("plain", "bom")
        for doc in CodeSource(spec=folder, root=tmp_path / folder).documents(SourceStats())
    ]
    assert [(v.text, v.header_stripped) for v in verdicts] == [(body, True)] * 2


def test_text_single_file_and_glob_with_excludes(tmp_path):
    for name in ("2024/b.txt", "2024/a.txt", "2023/c.txt", "2024/old/x.txt"):
        write(tmp_path / name, name)
    by_glob, _ = read(parse_source(f"text:{tmp_path}/20*/**/*.txt", exclude=("*/old/*",)))
    assert [d[1] for d in by_glob] == ["2023/c.txt", "2024/a.txt", "2024/b.txt"]
    one, _ = read(parse_source(f"text:{tmp_path}/2024/a.txt"))
    assert [d[1] for d in one] == ["2024/a.txt"]


def test_text_default_field_and_missing_parquet_column(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"text": "default field"}) + "\n")
    assert read(parse_source(f"text:{tmp_path}/a.jsonl"))[0][0][1] == "default field"
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DslmError, match=r"b\.parquet: no column 'text' \(columns: body\)"):
        read(parse_source(f"text:{tmp_path}/b.parquet"))


def test_fineweb_local_parquet_and_jsonl(tmp_path):
    fw = tmp_path / "fw"
    fw.mkdir()
    pq.write_table(pa.Table.from_pylist(fineweb_rows("b", 2)), fw / "b.parquet")
    pq.write_table(
        pa.Table.from_pylist(fineweb_rows("a", 2) + [{**fineweb_rows("a", 1)[0], "text": " "}]), fw / "a.parquet"
    )
    rows = fineweb_rows("c", 2, language="de")
    write(fw / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    docs, filtered = read(parse_source(f"fineweb:{fw}"))
    assert docs == [
        ("<urn:a:0>", "a page 0", "en"),
        ("<urn:a:1>", "a page 1", "en"),
        ("<urn:b:0>", "b page 0", "en"),
        ("<urn:b:1>", "b page 1", "en"),
        ("<urn:c:0>", "c page 0", "de"),
        ("<urn:c:1>", "c page 1", "de"),
    ]
    assert filtered == {"empty": 1}
    by_glob, _ = read(parse_source(f"fineweb:{fw}/*.jsonl,weight=2"))
    assert [d[0] for d in by_glob] == ["<urn:c:0>", "<urn:c:1>"]


def test_fineweb_missing_columns_are_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("dump", "token_count")} for r in fineweb_rows("x", 2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    with pytest.raises(DslmError, match="lack FineWeb's column.* dump, token_count"):
        read(parse_source(f"fineweb:{tmp_path}/x.parquet"))


def test_fineweb_hub_streams_the_named_config(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(fineweb_rows("hub", 1)).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read(parse_source("fineweb:"))[0] == [("<urn:hub:0>", "hub page 0", "en")]
    calls.clear()
    read(parse_source("fineweb:HuggingFaceFW/fineweb-edu,config=sample-10BT"))
    assert calls == [("HuggingFaceFW/fineweb-edu", dict(name="sample-10BT", split="train", streaming=True))]


def test_fineweb_hub_units_are_the_datasets_shards(monkeypatch):
    """A hub dataset (a real `datasets` stream of 3 data files here) splits by its files."""
    import datasets

    rows = fineweb_rows("hub", 7)
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, **kwargs: datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=3),
    )
    source = parse_source("fineweb:")
    assert source.units() == 3
    parts = [[(d.id, d.unit) for d in source.documents(SourceStats(), Partition(2, k))] for k in range(2)]
    whole = [(d.id, d.unit) for d in source.documents(SourceStats())]
    assert sorted(parts[0] + parts[1]) == sorted(whole) and len(whole) == 7
    assert {u for _, u in parts[0]} == {0, 2} and {u for _, u in parts[1]} == {1}


@pytest.mark.parametrize(
    "spec, weight",
    [("code:{d}", 1.0), ("code:{d},weight=0.5", 0.5), ("text:{d},weight=3", 3.0), ("fineweb:{d},weight=1e-2", 0.01)],
)
def test_weight(tmp_path, spec, weight):
    source = parse_source(spec.format(d=tmp_path))
    assert source.weight == weight and source.spec == spec.format(d=tmp_path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("web:/tmp", "unknown kind 'web'; expected code:FOLDER"),
        ("/tmp", "no KIND: prefix"),
        ("code:{d},field=text", "unknown key 'field' for code"),
        ("text:{d},config=x", "unknown key 'config' for text"),
        ("text:{d},field", "'field' is not key=value"),
        ("text:{d},weight=1,weight=2", "key 'weight' given twice"),
        ("code:{d},weight=0", "weight '0' is not a positive number"),
        ("code:{d},weight=-1", "weight '-1' is not a positive number"),
        ("code:{d},weight=heavy", "weight 'heavy' is not a positive number"),
        ("code:{d},weight=nan", "weight 'nan' is not a positive number"),
        ("code:{d}/missing", "is not a folder or a .zip/.tar/.tar.gz/.tgz archive"),
        ("code:", "'' is not a folder"),
        ("text:{d}/*.jsonl", "matches no folder or .parquet/.jsonl/.jsonl.gz/.txt file"),
        ("text:{d}/notes.csv", "matches no folder"),
        ("fineweb:{d}/fw/*.parquet", "matches no folder or .parquet/.jsonl/.jsonl.gz file"),
        ("fineweb:{d},config=sample-10BT", "local files have none"),
    ],
)
def test_bad_specs_are_one_line_naming_the_spec(tmp_path, spec, message):
    write(tmp_path / "notes.csv", "a,b\n")
    spec = spec.format(d=tmp_path)
    with pytest.raises(DslmError) as error:
        parse_source(spec)
    assert str(error.value).startswith(f"source {spec!r}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_kinds_and_fields(tmp_path):
    assert isinstance(parse_source(f"code:{tmp_path}"), CodeSource)
    assert parse_source(f"text:{tmp_path},field=content").field == "content"
    hub = parse_source("fineweb:HuggingFaceFW/fineweb")
    assert isinstance(hub, FineWebSource) and hub.config == "sample-100BT"
    assert isinstance(parse_source(f"fineweb:{tmp_path}"), FineWebSource)
    assert isinstance(parse_source(f"text:{tmp_path}"), TextSource)


def test_stdlib_corpus_fixture_still_reads(code_corpus):
    """The session's stdlib copy, through parse_source as the CLI builds it, matches a direct CodeSource."""
    parsed, filtered = read(parse_source(f"code:{code_corpus}", exclude=("email/*",)))
    direct, _ = read(CodeSource(spec="code", root=code_corpus / "json"))
    assert [(f"json/{i}", t, lang) for i, t, lang in direct] == parsed
    assert len(parsed) == len(list((code_corpus / "json").rglob("*.py")))
    assert all(lang == "python" for _, _, lang in parsed) and not filtered


# --- damaged input ---------------------------------------------------------------------------------


def test_damaged_archive_and_unreadable_file_are_counted_and_named(tmp_path, code_folder, capsys):
    write(tmp_path / "broken.zip", b"PK\x03\x04 not really a zip" * 50)
    assert read(parse_source(f"code:{tmp_path / 'broken.zip'}")) == ([], {"unreadable_file": 1})
    assert "broken.zip" in capsys.readouterr().err
    (code_folder / "gone.py").symlink_to(tmp_path / "nowhere.py")  # unreadable even for root
    docs, skipped = read(parse_source(f"code:{code_folder}", exclude=("skip/*",)))
    assert [d[0] for d in docs] == CODE_ORDER and skipped["unreadable_file"] == 1
    assert "gone.py" in capsys.readouterr().err


def test_zip_member_with_a_bad_checksum_is_counted(tmp_path):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.py", "a = 1\n" * 20)
        z.writestr("b.py", "b = 2\n" * 20)
    data = path.read_bytes().replace(b"b = 2", b"b = 3", 1)  # stored, not deflated: the CRC no longer matches
    path.write_bytes(data)
    docs, skipped = read(parse_source(f"code:{path}"))
    assert [d[0] for d in docs] == ["a.py"] and skipped == {"unreadable_file": 1}


def test_truncated_text_files_keep_what_was_read(tmp_path):
    lines = "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(2000))
    packed = gzip.compress(lines.encode())
    write(tmp_path / "t" / "a.jsonl.gz", packed[: len(packed) // 2])
    pq.write_table(pa.table({"text": ["x " * 50] * 10}), tmp_path / "t" / "b.parquet")
    write(tmp_path / "t" / "c.parquet", (tmp_path / "t" / "b.parquet").read_bytes()[:100])
    docs, skipped = read(parse_source(f"text:{tmp_path / 't'}"))
    from_gzip = [d for d in docs if "a.jsonl.gz" in d[0]]
    assert 0 < len(from_gzip) < 2000 and len(docs) == len(from_gzip) + 10
    assert skipped == {"unreadable_file": 2}


def test_damaged_fineweb_file_is_one_error_line(tmp_path):
    pq.write_table(pa.Table.from_pylist(fineweb_rows("a", 5)), tmp_path / "a.parquet")
    write(tmp_path / "a.parquet", (tmp_path / "a.parquet").read_bytes()[:200])
    with pytest.raises(DslmError, match="reading failed"):
        read(parse_source(f"fineweb:{tmp_path / 'a.parquet'}"))


def partition_inputs(tmp_path, kind):
    if kind == "code folder":
        for name, content in CODE_FILES.items():
            write(tmp_path / "src" / name, content)
        return f"code:{tmp_path / 'src'}", len(CODE_FILES) - 2  # README.md is not code, skip/* excluded
    if kind == "code zip":
        return f"code:{make_zip(tmp_path / 'src.zip', CODE_FILES)}", len(CODE_FILES) - 2
    if kind == "fineweb":  # 2 row groups of a parquet file and a jsonl file: 3 units
        pq.write_table(pa.Table.from_pylist(fineweb_rows("pq", 6)), tmp_path / "a.parquet", row_group_size=3)
        write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in fineweb_rows("js", 2)))
        return f"fineweb:{tmp_path}", 3
    # 3 row groups of a parquet file (rows 1-4, 5-8, 9-10) and 2 jsonl files: 5 units
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), tmp_path / "a.parquet", row_group_size=4)
    for name in ("b", "c"):
        write(tmp_path / f"{name}.jsonl", "".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(3)))
    return f"text:{tmp_path}", 5


@pytest.mark.parametrize("kind", ["code folder", "code zip", "text", "fineweb"])
@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_tasks_split_the_units_and_together_read_everything_once(tmp_path, kind, tasks):
    spec, units = partition_inputs(tmp_path, kind)
    source = parse_source(spec, exclude=("skip/*",))
    assert source.units() == units
    whole = [(d.unit, d.id, d.text) for d in source.documents(SourceStats())]
    parts = [
        [(d.unit, d.id, d.text) for d in source.documents(SourceStats(), Partition(tasks, k))] for k in range(tasks)
    ]
    for k, part in enumerate(parts):
        assert all(unit % tasks == k for unit, _, _ in part)
    assert sorted(sum(parts, []), key=lambda d: (d[0], whole.index(d))) == whole  # whole is in unit order
    if kind == "text":
        assert [d[1].rsplit(":", 1)[1] for d in whole[:10]] == [str(i) for i in range(1, 11)]  # rows of the file
        assert [d[0] for d in whole[:10]] == [0] * 4 + [1] * 4 + [2] * 2


@pytest.mark.parametrize(
    "task, tasks, message",
    [
        (2, 2, "--task 2 must be in [0, --tasks 2)"),
        (-1, 2, "--task -1 must be in [0, --tasks 2)"),
        (0, 0, "--tasks 0 must be within 1..10,000"),
        (0, 10**9, "--tasks 1000000000 must be within 1..10,000"),
    ],
)
def test_a_task_outside_the_tasks_is_one_line(task, tasks, message):
    with pytest.raises(DslmError) as e:
        Partition(tasks, task)
    assert str(e.value) == message
