"""Generation: the KV cache against full recomputation, sampling, beam search, stops, the CLI."""

import itertools
import json
import random
import subprocess
import sys
import sysconfig
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dslm.data.templates import Framing
from dslm.data.tokens import BOS_ID, EOS_ID
from dslm.errors import DslmError
from dslm.export import write_tokenizer_files
from dslm.hf import hf_config, hf_state_dict
from dslm.model import GPT, KVCache, ModelConfig
from dslm_eval.generate import complete, generate, sample_filter
from dslm_eval.generate_cli import main
from dslm_local.decoding import GenerationConfig, cut_at_stop
from dslm_local.fim import FimIds
from dslm_shards.tokenizer import train_tokenizer

BIN = Path(sys.executable).parent
CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=300, block_size=32)
NO_STOP = dict(stop_tokens=())


def peaked_model(cfg: ModelConfig = CFG, seed: int = 0) -> GPT:
    """A random GPT whose next-token distributions are far from uniform (a scaled-up head), so
    that greedy choices are not near-ties that float rounding could flip."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding written out: the whole sequence through the model for every token."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt) :].tolist()


def sequence_logprobs(model: GPT, prompt: list[int], news: list[list[int]]) -> list[float]:
    """log P(new | prompt) for each of `news` (all of one length), in one batch."""
    seqs = torch.tensor([prompt + new for new in news])  # (N, T + n)
    with torch.no_grad():
        logprobs = F.log_softmax(model(seqs)[:, len(prompt) - 1 : -1], dim=-1)  # (N, n, V)
    return logprobs.gather(-1, seqs[:, len(prompt) :, None]).sum(dim=(1, 2)).tolist()


PROMPTS = [[5, 17, 2], [9, 1, 40, 41, 42, 43, 44], [7, 7, 7], [250]]  # two of length 3: one batch


def test_cached_logits_equal_full_logits_for_a_chunked_prefill():
    model = peaked_model()
    idx = torch.randint(0, CFG.vocab_size, (3, 20))
    cache = KVCache(CFG, batch=3, max_len=CFG.block_size)
    with torch.no_grad():
        chunks = [model(idx[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 20))]
        full = model(idx)
        assert cache.length == 20
        assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
        with pytest.raises(ValueError, match="model.block_size"):  # positions go on from the cache's length
            model(idx[:, :13], cache=cache)


def test_kv_cache_greedy_equals_full_recomputation_for_prompts_of_different_lengths():
    model = peaked_model()
    cached = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, **NO_STOP))
    recomputed = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, use_cache=False, **NO_STOP))
    assert cached == recomputed == [reference_greedy(model, p, 12) for p in PROMPTS]


def test_sampling_is_reproducible_with_its_seed_and_differs_with_another():
    model = peaked_model()
    cfg = dict(strategy="sample", temperature=3.0, max_new_tokens=16, **NO_STOP)
    first = generate(model, PROMPTS, GenerationConfig(seed=1, **cfg))
    assert generate(model, PROMPTS, GenerationConfig(seed=1, **cfg)) == first
    assert generate(model, PROMPTS, GenerationConfig(seed=1, use_cache=False, **cfg)) == first
    assert generate(model, PROMPTS, GenerationConfig(seed=2, **cfg)) != first


def test_top_k_1_is_greedy():
    model = peaked_model()
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, **NO_STOP))
    assert (
        generate(
            model,
            PROMPTS,
            GenerationConfig(strategy="sample", top_k=1, temperature=5.0, seed=3, max_new_tokens=10, **NO_STOP),
        )
        == greedy
    )


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(**kw):
        return torch.isfinite(sample_filter(logits, GenerationConfig(strategy="sample", **kw)))[0].tolist()

    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, then 0.5 + 0.3 reaches it
    assert kept(top_p=0.4) == [True, False, False, False]  # the most likely token always stays
    assert kept(top_p=0.9, top_k=2) == [True, True, False, False]


def kept_count(probs: list[float], top_p: float) -> int:
    """How many tokens sample_filter keeps for float32 logits log(probs) and top_p."""
    logits = torch.tensor([probs], dtype=torch.float64).log().float()
    return int(torch.isfinite(sample_filter(logits, GenerationConfig(strategy="sample", top_p=top_p))).sum())


def nucleus_size(parts: list[int], denominator: int, top_p: Fraction) -> int:
    """The smallest number of most likely tokens whose mass reaches top_p, in exact arithmetic."""
    ordered = sorted(parts, reverse=True)
    return next(k for k in range(1, len(parts) + 1) if Fraction(sum(ordered[:k]), denominator) >= top_p)


def test_top_p_keeps_the_smallest_nucleus_that_reaches_it_exactly_at_the_boundary():
    assert kept_count([0.5, 0.3, 0.1, 0.1], 0.8) == 2  # issue 15: float rounding kept 3
    assert kept_count([0.25] * 4, 0.75) == 3 and kept_count([0.5, 0.3, 0.1, 0.1], 0.9) == 3
    # masses that are sums of twentieths: top_p is exactly a prefix's mass
    rng = random.Random(0)
    for _ in range(1000):
        cuts = sorted(rng.sample(range(1, 20), rng.randrange(1, 6)))
        parts = sorted((b - a for a, b in zip([0, *cuts], [*cuts, 20])), reverse=True)
        top_p = Fraction(sum(parts[: rng.randrange(1, len(parts))]), 20)
        assert kept_count([q / 20 for q in parts], float(top_p)) == nucleus_size(parts, 20, top_p), (parts, top_p)


def test_top_p_adds_no_rounding_over_a_large_vocabulary():
    # one token of 0.4 and 30,000 of 0.6 / 30,000: top_p 0.7 needs 15,000 of them (float32 sums kept one fewer)
    assert kept_count([0.4] + [0.6 / 30000] * 30000, 0.7) == 1 + 15000
    assert kept_count([0.5, 0.5], 1e-9) == 1  # below the tolerance the most likely token still stays


def test_top_p_matches_transformers():
    warper = pytest.importorskip("transformers.generation.logits_process").TopPLogitsWarper
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log(), 0.8)]
    for top_p in (0.1, 0.5, 0.8, 0.9, 0.95, 0.99):  # random rows, and peaked ones
        cases += [(torch.randn(4, 50, generator=generator) * scale, top_p) for scale in (1.0, 5.0)]
    for logits, top_p in cases:
        ours = torch.isfinite(sample_filter(logits, GenerationConfig(strategy="sample", top_p=top_p)))
        theirs = torch.isfinite(warper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), (logits, top_p)


def test_beam_search_with_one_beam_is_greedy():
    model = peaked_model()
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, **NO_STOP))
    assert (
        generate(model, PROMPTS, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=10, **NO_STOP)) == greedy
    )
    assert (
        generate(
            model,
            PROMPTS,
            GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=10, use_cache=False, **NO_STOP),
        )
        == greedy
    )


def test_beam_search_as_wide_as_the_vocab_finds_the_most_likely_pair():
    # Two new tokens and V beams keep every first token: the search is exhaustive, so its answer is
    # the most likely of all V^2 pairs (beam search in general is not, and may even lose to greedy).
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, vocab_size=12, block_size=16)
    model = peaked_model(cfg, seed=4)
    with torch.no_grad():
        model.lm_head.weight.div_(10)  # flatter, so the best pair is often not greedy's
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 0]]
    beams = generate(model, prompts, GenerationConfig(strategy="beam", num_beams=12, max_new_tokens=2, **NO_STOP))
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=2, **NO_STOP))
    pairs = [list(p) for p in itertools.product(range(12), repeat=2)]
    for prompt, beam, greedy_pair in zip(prompts, beams, greedy):
        logprobs = sequence_logprobs(model, prompt, pairs)
        assert beam == pairs[max(range(len(pairs)), key=logprobs.__getitem__)]
        assert logprobs[pairs.index(beam)] >= logprobs[pairs.index(greedy_pair)]
    assert beams != greedy, "no prompt where the best pair differs from greedy's: the check is weak"


def test_beam_search_stops_at_a_likely_stop_token():
    model = peaked_model()
    prompt = PROMPTS[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
        probs = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    stop = int(probs.argmax())
    assert probs[stop] > 0.9  # so the one-token hypothesis beats every longer one by log-prob / length
    cfg = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=8, stop_tokens=(stop,))
    assert generate(model, [prompt, PROMPTS[0]], cfg)[0] == []


def test_stop_tokens_end_a_row_without_stopping_the_others():
    model = peaked_model()
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, **NO_STOP))
    row, token = next(
        (r, t)
        for r, tokens in enumerate(free)
        for i, t in enumerate(tokens[1:], 1)
        if t not in tokens[:i] and not any(t in other for other in free[:r] + free[r + 1 :])
    )
    stopped = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, stop_tokens=(token,)))
    assert stopped[row] == free[row][: free[row].index(token)]
    assert [s for i, s in enumerate(stopped) if i != row] == [f for i, f in enumerate(free) if i != row]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (dslm's) that fits CFG.vocab_size, trained on one stdlib file."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text()
    return train_tokenizer([text], vocab_size=CFG.vocab_size)


def test_stop_strings_cut_the_new_text_before_them(tokenizer):
    model = peaked_model()
    prompts = ["def encode(self, o):", "import json\n"]
    free = complete(model, tokenizer, prompts, GenerationConfig(max_new_tokens=20))
    assert all(free)
    text = free[0]
    start = next(i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip())
    stop = text[start : start + 2]
    cut = complete(model, tokenizer, prompts, GenerationConfig(max_new_tokens=20, stop_strings=(stop,)))
    assert cut[0] == text[: text.find(stop)]
    assert cut[1] == cut_at_stop(free[1], (stop,))
    kept = complete(
        model,
        tokenizer,
        prompts[:1],
        GenerationConfig(max_new_tokens=20, stop_strings=("@@", stop), keep_stop_string=True),
    )
    assert kept[0] == text[: text.find(stop) + len(stop)]


def test_a_long_prompt_keeps_its_last_tokens():
    model = peaked_model()
    long = list(range(1, 41))  # 40 tokens, context 32
    cfg = GenerationConfig(max_new_tokens=8, **NO_STOP)
    assert generate(model, [long], cfg) == generate(model, [long[-24:]], cfg)
    with pytest.raises(DslmError, match="no room for a prompt"):
        generate(model, [long], GenerationConfig(max_new_tokens=32))


def test_generation_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**CFG.__dict__, "dropout": 0.5})).train()
    cfg = GenerationConfig(max_new_tokens=6, **NO_STOP)
    first = generate(model, PROMPTS, cfg)
    assert model.training and generate(model, PROMPTS, cfg) == first == generate(model.eval(), PROMPTS, cfg)


@pytest.mark.parametrize(
    "bad",
    [
        dict(strategy="nucleus"),
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(strategy="sample", top_p=0.0),
        dict(strategy="sample", top_k=-1),
        dict(temperature=0.7),
        dict(num_beams=4),
        dict(strategy="beam", num_beams=0),
        dict(stop_tokens=(-1,)),
        dict(stop_strings=("",)),
        dict(seed=-1),
    ],
)
def test_bad_generation_settings_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def write_export(folder: Path, model: GPT, tokenizer) -> Path:
    """The files dslm-export writes, from a model in memory (its tokenizer.json, with the <bos>
    post-processor for transformers, included)."""
    folder.mkdir()
    save_file(hf_state_dict(model.state_dict(), model.cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    shards_tokenizer = folder.with_name(f"{folder.name}-tokenizer.json")
    tokenizer.save(str(shards_tokenizer))
    write_tokenizer_files(folder, shards_tokenizer)
    return folder


def test_cli_continues_prompts_of_an_export(tmp_path, tokenizer, capsys):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("class JSONEncoder:\n")
    main(
        [
            str(folder),
            "--prompt",
            "def encode(",
            "--prompt-file",
            str(prompt_file),
            "--max-new-tokens",
            "10",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    expected = complete(
        peaked_model(),
        tokenizer,  # the shards' tokenizer: the export's adds no second <bos>
        ["def encode(", "class JSONEncoder:\n"],
        GenerationConfig(max_new_tokens=10),
    )
    assert out == f"def encode({expected[0]}\n{'-' * 40}\nclass JSONEncoder:\n{expected[1]}\n"
    proc = subprocess.run(
        [
            BIN / "dslm-generate",
            folder,
            "--prompt",
            "def encode(",
            "--max-new-tokens",
            "10",
            "--strategy",
            "sample",
            "--top-p",
            "0.9",
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("def encode("), proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--temperature", "0.5"], "apply only to strategy='sample'"),
        (["--prompt", "x", "--max-new-tokens", "32"], "no room for a prompt"),
        ([], "give at least one --prompt"),
        (["--prompt", "x", "--device", "gpu"], "--device gpu: not a torch device"),
        (["--prompt", "x", "--device", "cuda:63"], "--device cuda:63: this machine has"),
        (["--prompt", "x", "--interactive"], "--interactive reads its prompts from the terminal"),
        (["--prompt", "x", "--out", "/no/such/dir/out.jsonl"], "its folder does not exist"),
        (["--prompt", "x", "--out", f"{__file__}/out.jsonl"], f"{__file__} is a file, not a folder"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tokenizer, capsys, args, message):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--prompt", "x"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_runs_a_fixed_prompt_set_on_several_models_side_by_side(tmp_path, tokenizer, capsys):
    first = write_export(tmp_path / "first", peaked_model(seed=0), tokenizer)
    second = write_export(tmp_path / "second", peaked_model(seed=1), tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def encode("}\n\n{"prompt": "import json\\n", "id": 2}\n')
    out = tmp_path / "side.jsonl"
    args = [
        str(first),
        str(second),
        "--prompts",
        str(prompts),
        "--seed",
        "3",
        "--strategy",
        "sample",
        "--temperature",
        "0.9",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
    ]
    main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cfg = GenerationConfig(strategy="sample", temperature=0.9, max_new_tokens=8, seed=3)
    for folder, seed in ((first, 0), (second, 1)):
        expected = complete(peaked_model(seed=seed), tokenizer, ["def encode(", "import json\n"], cfg)
        assert [row["outputs"][str(folder)] for row in rows] == expected
    assert [row["prompt"] for row in rows] == ["def encode(", "import json\n"] and rows[0]["seed"] == 3
    printed = capsys.readouterr().out
    assert f"[{first}]\ndef encode({rows[0]['outputs'][str(first)]}" in printed and f"[{second}]" in printed
    written = out.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(args)  # an --out that exists is kept
    assert exit_info.value.code == 2 and out.read_text() == written
    assert f"--out {out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    main([*args, "--overwrite"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # the same set, the same outputs
    with pytest.raises(SystemExit):
        main([str(first), str(first), "--prompt", "x"])
    assert "a model is named twice" in capsys.readouterr().err


def test_cli_interactive_changes_the_sampler_as_it_goes(tmp_path, tokenizer):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    lines = "temp=0.5\ntop_k=abc\ntokens=32\ntemp=0.7 tokens=6\ndef encode(\nquit\nnever read\n"
    proc = subprocess.run(
        [BIN / "dslm-generate", folder, "--interactive", "--seed", "2"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    # the card's sampler to start with, its 500 tokens cut to half the model's context of 32
    assert "max new tokens: 16 (half of model.block_size=32" in proc.stdout
    assert "temp=0.8 top_k=200 tokens=16" in proc.stdout
    assert "temp=0.5 top_k=200 tokens=16" in proc.stdout and "temp=0.7 top_k=200 tokens=6" in proc.stdout
    assert "not changed: invalid literal" in proc.stdout
    assert "not changed: tokens=32 leaves no room for a prompt in a context of 32" in proc.stdout
    expected = complete(
        peaked_model(),
        tokenizer,
        ["def encode("],
        GenerationConfig(strategy="sample", temperature=0.7, top_k=200, max_new_tokens=6, seed=2),
    )[0]
    assert f"def encode({expected}\n" in proc.stdout and "never read" not in proc.stdout


def test_cli_follows_the_direction_and_template_an_export_records(tmp_path, tokenizer, capsys):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dslm_direction": "backward"}))
    main([str(folder), "--prompt", "return x", "--max-new-tokens", "6"])
    expected = complete(
        peaked_model(), tokenizer, ["return x"], GenerationConfig(max_new_tokens=6), framing=Framing("backward")
    )[0]
    assert capsys.readouterr().out == f"{expected}return x\n"  # the new text goes before the prompt
    main([str(folder), "--prompt", "return x", "--max-new-tokens", "6", "--template", "instruct"])
    reply = complete(
        peaked_model(),
        tokenizer,
        ["return x"],
        GenerationConfig(max_new_tokens=6),
        framing=Framing("backward", "instruct"),
    )[0]
    assert capsys.readouterr().out == f"return x\n=> {reply}\n"
    (folder / "config.json").write_text(json.dumps({**config, "dslm_direction": "sideways"}))
    with pytest.raises(SystemExit):
        main([str(folder), "--prompt", "x"])
    assert "dslm_direction='sideways'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"\xff\xfe\x00", "prompts.jsonl: not UTF-8 text"),
        ('{"prompt": "a"}\n{"text": "b"}\n', 'prompts.jsonl:2: not a JSON object with a string "prompt"'),
        ('{"prompt": 3}\n', "prompts.jsonl:1: not a JSON object"),
        ("[1, 2]\n", "prompts.jsonl:1: not a JSON object"),
    ],
)
def test_cli_bad_prompt_set_is_one_line(tmp_path, tokenizer, capsys, content, message):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--prompts", str(prompts)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_templated_prompt_too_long_for_the_context_is_refused_and_a_plain_one_cut(tmp_path, tokenizer, capsys):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    long = "def encode(self, o):\n    return o\n" * 3  # more than the context of 32 tokens
    main([str(folder), "--prompt", long, "--max-new-tokens", "6"])  # plain text: its last tokens
    assert capsys.readouterr().out.startswith(long)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--prompt", "x", "--prompt", long, "--max-new-tokens", "6", "--template", "instruct"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert (
        "prompt 2 of 2 is" in err[0]
        and "tokens in the instruct template; model.block_size=32 leaves room for 26 beside 6 new tokens" in err[0]
    ), err
    lines = f"{long.replace(chr(10), ' ')}\nx\nquit\n"  # a prompt per line; the long one is still too long
    proc = subprocess.run(
        [
            BIN / "dslm-generate",
            folder,
            "--interactive",
            "--template",
            "instruct",
            "--max-new-tokens",
            "6",
            "--strategy",
            "greedy",
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "> not generated: the prompt is" in proc.stdout and "> x\n=> " in proc.stdout, proc.stdout


def test_cli_suffix_asks_a_fim_export_for_the_middle_and_keeps_both_sides_of_a_long_cursor(tmp_path, capsys):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text()
    tok = train_tokenizer([text], vocab_size=CFG.vocab_size, fim=True)
    folder = write_export(tmp_path / "fim", peaked_model(), tok)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dslm_fim": True}))
    before, after = "x = json.dumps(", ")\n"  # 19 tokens: within the room of 32 - 10
    main([str(folder), "--prompt", before, "--suffix", after, "--max-new-tokens", "10"])
    fim = FimIds.of(tok)
    prompt = [BOS_ID, fim.prefix, *tok.encode(before).ids, fim.suffix, *tok.encode(after).ids, fim.middle]
    cfg = GenerationConfig(max_new_tokens=10, stop_tokens=(EOS_ID,))
    middle = tok.decode(generate(peaked_model(), [prompt], cfg, decode=tok.decode)[0])
    assert capsys.readouterr().out == f"{before}{middle}{after}\n"  # the middle where it belongs
    long_before, long_after = "x = 1\n" * 40, "y = 2\n" * 40  # more than the context of 32 tokens
    main([str(folder), "--prompt", long_before, "--suffix", long_after, "--max-new-tokens", "6"])
    kept = fim.cursor_prompt(BOS_ID, tok.encode(long_before).ids, tok.encode(long_after).ids, CFG.block_size - 6)
    assert len(kept) == CFG.block_size - 6 and kept[:2] == [BOS_ID, fim.prefix] and kept[-1] == fim.middle
    middle = tok.decode(generate(peaked_model(), [kept], GenerationConfig(max_new_tokens=6, stop_tokens=(EOS_ID,)))[0])
    assert capsys.readouterr().out == f"{long_before}{middle}{long_after}\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "def f(", "--suffix", "):"], "was not trained to fill in the middle"),
        (["--prompt", "a", "--prompt", "b", "--suffix", "c"], "--suffix goes with one prompt"),
        (["--interactive", "--suffix", "c"], "--suffix goes with one prompt"),
        (["--prompt", "a", "--suffix", "c", "--template", "instruct"], "--suffix: a prompt at a cursor is plain code"),
    ],
)
def test_cli_suffix_without_fim_or_with_several_prompts_is_one_line(tmp_path, tokenizer, capsys, args, message):
    folder = write_export(tmp_path / "export", peaked_model(), tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
