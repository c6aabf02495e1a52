"""dslm-complete: completion from an ONNX export without torch, its cursor and prompt options,
sampling, the inputs it refuses, and the light install (pip install ./local)."""

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from dslm_local.complete import Completer, main
from dslm_local.decoding import GenerationConfig
from dslm_local.onnx_model import OnnxModel

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NO_TORCH = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "deepspeed", "transformers", "dslm", "dslm_eval", "dslm_shards",
                                  "dslm_launch"}:
            raise ImportError(f"dslm-complete imported {name}")
sys.meta_path.insert(0, Refuse())
"""
"""A sitecustomize.py that makes importing torch (and dslm's torch packages) fail in its process."""


def run_complete(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "dslm-complete", *map(str, args)], capture_output=True, text=True, env=env, timeout=900
    )


def test_completion_runs_with_torch_unimportable(onnx_exports, tmp_path):
    _, _, fp32, _ = onnx_exports
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    prompt = "def encode(self, o):\n    "
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(BIN)}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert "dslm-complete imported torch" in blocked.stderr  # the guard works
    proc = run_complete(fp32, "--prompt", prompt, env=env)
    assert proc.returncode == 0, proc.stderr
    expected = Completer(OnnxModel(fp32), GenerationConfig(stop_strings=("\n",))).complete(prompt)
    assert proc.stdout == expected + "\n"


def test_a_file_cursor_completes_the_text_before_it(onnx_exports, tmp_path, capsys):
    _, _, fp32, _ = onnx_exports
    source = tmp_path / "f.py"
    source.write_text("import json\n\ndef load(path):\n    with open(path) as f:\n        return json.lo\n")
    main([str(fp32), "--file", str(source), "--line", "5"])
    at_end = capsys.readouterr().out
    main([str(fp32), "--file", str(source), "--line", "5", "--column", "16"])
    before_lo = capsys.readouterr().out
    completer = Completer(OnnxModel(fp32), GenerationConfig(stop_strings=("\n",)))
    text = source.read_text()
    assert at_end == completer.complete(text[: text.index(".lo\n") + 3], keep_last=True) + "\n"
    assert before_lo == completer.complete(text[: text.index(".lo\n") + 1], keep_last=True) + "\n"
    assert "\n" not in at_end.rstrip("\n")  # one line


def test_a_long_file_keeps_the_code_nearest_the_cursor_but_a_long_prompt_is_refused(onnx_exports, tmp_path):
    _, _, fp32, _ = onnx_exports
    source = tmp_path / "long.py"
    source.write_text("".join(f"value_{i} = compute({i}, scale=2)\n" for i in range(200)))
    proc = run_complete(fp32, "--file", source, "--line", "200")
    assert proc.returncode == 0, proc.stderr
    proc = run_complete(fp32, "--prompt", source.read_text())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "leaves room for 32 beside --max-new-tokens 64: shorten the prompt" in proc.stderr, proc.stderr


def test_a_prompt_set_gives_one_json_line_per_prompt(onnx_exports, tmp_path):
    _, _, fp32, _ = onnx_exports
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["import ", "class A:\n    def "]))
    proc = run_complete(fp32, "--prompts", prompts, "--jsonl", "--multiline", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["import ", "class A:\n    def "]
    assert all(1 <= r["new_tokens"] <= 8 and r["seconds"] >= 0 for r in rows)


def test_sampling_is_seeded_and_top_k_1_is_greedy(onnx_exports):
    _, _, fp32, _ = onnx_exports
    prompt = ["--prompt", "def f(x):\n", "--multiline", "--max-new-tokens", "20"]
    greedy = run_complete(fp32, *prompt).stdout
    sample = ["--strategy", "sample", "--temperature", "3.0"]
    assert run_complete(fp32, *prompt, *sample, "--top-k", "1", "--seed", "5").stdout == greedy
    first, again, other = (run_complete(fp32, *prompt, *sample, "--seed", str(s)).stdout for s in (1, 1, 2))
    assert first == again != other


def test_the_int8_export_completes_too(onnx_exports):
    _, _, _, int8 = onnx_exports
    proc = run_complete(int8, "--prompt", "import os\nimport ", "--stop", "\n")
    assert proc.returncode == 0 and proc.stdout.endswith("\n"), proc.stderr


@pytest.mark.parametrize(
    "case",
    [
        "no_model",
        "no_tokenizer",
        "other_config",
        "backward",
        "line_range",
        "line_without_file",
        "beam_like",
        "not_a_folder",
        "other_tokenizer",
        "longer_context_in_config",
        "stdio_with_jsonl",
    ],
)
def test_bad_input_is_one_line(onnx_exports, tmp_path, case):
    run, _, fp32, _ = onnx_exports
    folder = tmp_path / "export"
    shutil.copytree(fp32, folder)
    args = [folder, "--prompt", "x = "]
    if case == "no_model":
        (folder / "model.onnx").unlink()
    elif case == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif case == "other_config":  # a config.json of another preset beside this model
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_layer": 8, "n_head": 8, "n_embd": 512}))
    elif case == "backward":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dslm_direction": "backward"}))
    elif case == "line_range":
        (tmp_path / "f.py").write_text("a = 1\n")
        args = [folder, "--file", tmp_path / "f.py", "--line", "7"]
    elif case == "line_without_file":
        args = [folder, "--prompt", "x", "--line", "2"]
    elif case == "beam_like":
        args = [folder, "--prompt", "x", "--temperature", "0.5"]  # a sampler setting with greedy
    elif case == "not_a_folder":
        args = [tmp_path / "nothing", "--prompt", "x"]
    elif case == "other_tokenizer":  # a tokenizer of more tokens than the model predicts
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab.update({f"extra{i}": len(vocab) + i for i in range(600)})
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    elif case == "longer_context_in_config":  # positions past the graph's table
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_positions": 1024}))
        args = [folder, "--prompt", "x = 1\n" * 60, "--max-new-tokens", "8"]
    elif case == "stdio_with_jsonl":
        args = [folder, "--stdio", "--jsonl"]
    proc = run_complete(*args)
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("dslm-complete: error: "), proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_the_light_package_installs_and_runs_without_torch(onnx_exports, tmp_path):
    """`pip install ./local` in a fresh virtual environment: dslm-complete and its three
    dependencies, no torch, no deepspeed (pip finds the wheels in its cache or the registry)."""
    _, _, _, int8 = onnx_exports
    venv.create(tmp_path / "venv", with_pip=True)
    pip = [tmp_path / "venv" / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    package = shutil.copytree(REPO / "local", tmp_path / "local", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([*pip, "install", "-q", package], check=True, timeout=900)  # pip builds in the folder it is given
    installed = subprocess.run([*pip, "list", "--format", "json"], capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert {"dslm-local", "onnxruntime", "tokenizers", "numpy"} <= names
    assert not names & {"torch", "deepspeed", "dslm"}
    proc = subprocess.run(
        [tmp_path / "venv" / "bin" / "dslm-complete", int8, "--prompt", "import "],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_byte_order_mark_is_not_part_of_the_prompt(onnx_exports, tmp_path, capsys):
    _, _, fp32, _ = onnx_exports
    plain, marked = tmp_path / "plain.py", tmp_path / "marked.py"
    plain.write_text("import os\nimport sys\n", encoding="utf-8")
    marked.write_text("\ufeffimport os\nimport sys\n", encoding="utf-8")
    outputs = []
    for path in (plain, marked):
        main([str(fp32), "--file", str(path), "--line", "1", "--column", "8"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_a_reader_that_goes_away_ends_it_quietly(onnx_exports, tmp_path):
    _, _, fp32, _ = onnx_exports
    prompts = tmp_path / "many.txt"
    prompts.write_text("import \n" * 40)
    proc = subprocess.run(
        f"'{BIN / 'dslm-complete'}' '{fp32}' --prompts '{prompts}' --jsonl | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def fim_export(fp32: Path, folder: Path, code_corpus: Path) -> Path:
    """A copy of the export that says it was trained to fill in the middle, with a tokenizer of its
    vocabulary's size that holds the FIM tokens (its prompts are checked, never run)."""
    from dslm_shards.build import train_and_save_tokenizer
    from dslm_shards.sources import CodeSource

    shutil.copytree(fp32, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dslm_fim": True}))
    source = CodeSource(spec=f"code:{code_corpus}", root=code_corpus)
    train_and_save_tokenizer([source], config["vocab_size"], 10**9, folder / "tokenizer.json", overwrite=True, fim=True)
    return folder


def test_a_fim_model_gets_the_code_after_the_cursor_in_psm_and_a_long_file_keeps_both_sides(
    onnx_exports, tmp_path, code_corpus
):
    from dslm_local.fim import FimIds

    folder = fim_export(onnx_exports[2], tmp_path / "fim", code_corpus)
    completer = Completer(OnnxModel(folder), GenerationConfig(max_new_tokens=8))
    fim, encode = completer.fim, lambda text: completer.tokenizer.encode(text, add_special_tokens=False).ids
    assert fim == FimIds.of(completer.tokenizer) and fim is not None
    before, after = "def load(path):\n    return json.", "(open(path))\n"
    assert completer.prompt_ids(before, suffix=after) == [
        completer.model.config.bos_token_id,
        fim.prefix,
        *encode(before),
        fim.suffix,
        *encode(after),
        fim.middle,
    ]
    long_before, long_after = "x = 1\n" * 200, "y = 2\n" * 200
    ids = completer.prompt_ids(long_before, keep_last=True, suffix=long_after)
    room = completer.model.config.block_size - 8
    assert len(ids) == room and ids[:2] == [completer.model.config.bos_token_id, fim.prefix] and ids[-1] == fim.middle
    middle = ids.index(fim.suffix)
    assert ids[2:middle] == encode(long_before)[-(middle - 2) :]  # the code nearest the cursor, both sides
    assert ids[middle + 1 : -1] == encode(long_after)[: room - 2 - middle]


def test_a_suffix_for_a_model_without_fim_is_one_line_and_a_file_cursor_warns_once(onnx_exports, tmp_path):
    fp32 = onnx_exports[2]
    proc = run_complete(fp32, "--prompt", "def f(", "--suffix", "):\n")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"dslm-complete: error: --suffix: {fp32} was not trained to fill in the middle (no dslm_fim in its "
        f"config.json); complete with --prompt alone, or export a model trained with `dslm-shard build --fim-rate`"
    ]
    source = tmp_path / "f.py"
    source.write_text("import json\n\ndef load(path):\n    return json.lo\n")
    proc = run_complete(fp32, "--file", source, "--line", "4", "--column", "17")
    assert proc.returncode == 0 and proc.stderr.strip().splitlines() == [
        f"dslm-complete: warning: {fp32} was not trained to fill in the middle: the code after the cursor is not used"
    ]


def test_a_fim_model_with_a_tokenizer_without_the_fim_tokens_is_one_line(onnx_exports, tmp_path):
    """config.json says dslm_fim but tokenizer.json is another one: dslm-complete and dslm-generate
    --suffix say so in one line, before any prompt."""
    folder = tmp_path / "mixed"
    shutil.copytree(onnx_exports[3], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dslm_fim": True}))
    expected = f"{folder} was trained to fill in the middle, but its tokenizer.json has no <fim_prefix>"
    proc = run_complete(folder, "--prompt", "def f(", "--suffix", "):\n")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    run = tmp_path / "run"  # a run (torch weights, for dslm-generate) said to be FIM-trained, likewise
    shutil.copytree(onnx_exports[0], run, ignore=shutil.ignore_patterns("export"))
    shutil.copy(folder / "tokenizer.json", run / "tokenizer.json")  # its shards' tokenizer, without FIM tokens
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("\nfim: false\n", "\nfim: true\n"))
    proc = subprocess.run(
        [BIN / "dslm-generate", run, "--prompt", "def f(", "--suffix", "):\n"], capture_output=True, text=True
    )
    expected = expected.replace(str(folder), str(run / "checkpoints" / "global_step7"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr


def serve(export: Path, lines: list[str], *args) -> subprocess.CompletedProcess:
    """dslm-complete --stdio fed `lines` (one request each) on stdin, which then ends."""
    return subprocess.run(
        [BIN / "dslm-complete", export, "--stdio", *map(str, args)],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("fim", [False, True])
def test_stdio_answers_each_request_line_in_order_as_a_file_cursor_does(onnx_exports, tmp_path, code_corpus, fim):
    export = fim_export(onnx_exports[2], tmp_path / "fim", code_corpus) if fim else onnx_exports[2]
    short = "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.lo\n"
    long = "".join(f"value_{i} = compute({i}, scale=2)\n" for i in range(150)) + "print(value_3)\n"
    offset = long.index("scale=2)\nvalue_100") + 6  # mid-line, before "2)"
    line, column = long.count("\n", 0, offset) + 1, offset - long.rindex("\n", 0, offset)
    requests = [
        json.dumps({"id": "a", "text": short, "line": 5, "column": 16}),
        "{not json",
        json.dumps({"id": 2, "text": long, "offset": offset, "max_new_tokens": 8}),
        json.dumps({"id": 3, "text": short, "line": 9}),
        json.dumps({"text": short, "line": 3, "multiline": True, "max_new_tokens": 6}),
        json.dumps({"id": 5, "text": short, "line": 1, "max_tokens": 4}),
    ]
    proc = serve(export, requests, "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == len(requests)
    files = {"short.py": short, "long.py": long}
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    def one_shot(name: str, *args) -> str:
        proc = run_complete(export, "--file", tmp_path / name, *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.removesuffix("\n")

    assert replies[0]["id"] == "a"
    assert replies[0]["completion"] == one_shot("short.py", "--line", 5, "--column", 16, "--max-new-tokens", 12)
    assert set(replies[1]) == {"error"} and "not JSON" in replies[1]["error"]
    assert replies[2]["id"] == 2
    assert replies[2]["completion"] == one_shot("long.py", "--line", line, "--column", column, "--max-new-tokens", 8)
    assert replies[3] == {"id": 3, "error": "line 9: the text has lines 1..6"}
    expected = one_shot("short.py", "--line", 3, "--multiline", "--max-new-tokens", 6)
    assert "id" not in replies[4] and replies[4]["completion"] == expected
    assert replies[5]["id"] == 5 and "max_tokens" in replies[5]["error"]
    for reply in (replies[0], replies[2], replies[4]):
        assert set(reply) <= {"id", "completion", "prompt_tokens", "new_tokens", "time_ms"}
        assert reply["time_ms"] > 0 and reply["prompt_tokens"] > 0 and 0 <= reply["new_tokens"] <= 12
    warning = f"dslm-complete: warning: {export} was not trained to fill in the middle: the code after the cursor"
    assert proc.stderr.strip().splitlines() == ([] if fim else [f"{warning} is not used"])


def test_stdio_reads_a_text_of_crlf_newlines_and_a_byte_order_mark_as_a_file_is_read(onnx_exports):
    text = "import os\n\ndef here():\n    return os.pa\n"
    crlf = "\ufeff" + text.replace("\n", "\r\n")
    requests = [
        {"text": text, "line": 4, "column": 17},
        {"text": crlf, "line": 4, "column": 17},
        {"text": text, "offset": text.index("pa\n") + 2},
        {"text": crlf, "offset": crlf.index("pa\r\n") + 2},
    ]
    proc = serve(onnx_exports[2], [json.dumps(r) for r in requests], "--multiline", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == 4 and len({(r["completion"], r["prompt_tokens"]) for r in replies}) == 1, replies


def test_stdio_replies_line_by_line_as_requests_come(onnx_exports):
    """An editor writes a request and waits for its reply before the next: each reply is flushed."""
    proc = subprocess.Popen(
        [BIN / "dslm-complete", onnx_exports[2], "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for i in range(3):
            proc.stdin.write(json.dumps({"id": i, "text": "import os\nimport ", "offset": 17}) + "\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline())["id"] == i
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0 and proc.stdout.read() == ""
    finally:
        proc.kill()


def test_the_code_nearest_a_cursor_is_encoded_from_a_window_as_the_whole_text_encodes_it(onnx_exports):
    """A long file is not encoded whole at each completion: the tokens nearest the cursor come from
    a window of its text cut at the end of a line that ends with code, and are the whole text's."""
    from dslm_local.tokens import first_ids, last_ids

    tokenizer = OnnxModel(onnx_exports[3]).tokenizer
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    stdlib = Path(sys.modules["json"].__file__).parents[1]
    spaced = "x = 1   \n\n  \nif y:\n    z = 2\n\t\n    s = 'ﬁné ✓'\n" * 200  # blanks, indents, NFKC
    for text in [(stdlib / name).read_text() for name in ("argparse.py", "json/decoder.py", "textwrap.py")] + [spaced]:
        for cut in (0, 5, len(text) // 3, len(text) // 2 + 7, len(text) - 40, len(text)):
            before, after = text[:cut], text[cut:]
            for n in (0, 1, 60, 500):
                assert last_ids(tokenizer, before, n) == (encode(before)[-n:] if n else []), (text[:40], cut, n)
                assert first_ids(tokenizer, after, n) == encode(after)[:n], (text[:40], cut, n)
    indented = "    x = 1 \n" * 400 + "\n\n  \n" + "\ty = 2\t\n" * 300  # no line ends with code: the whole text
    assert last_ids(tokenizer, indented, 30) == encode(indented)[-30:]
    assert first_ids(tokenizer, indented, 30) == encode(indented)[:30]
