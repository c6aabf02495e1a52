"""The HF export: GPT2LMHeadModel gives dslm's logits (transformers is a test-only dependency)."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dslm.data.templates import IM_END, Framer, Framing, get_template
from dslm.data.tokens import BOS_ID, EOS_ID, SPECIAL_TOKENS, load_text_tokenizer
from dslm.export import write_tokenizer_files
from dslm.files import sha256_file
from dslm.hf import export_tokenizer_sha256, fold_head_bias, hf_config, hf_state_dict
from dslm.model import GPT, ModelConfig
from dslm_eval.generate import PromptFraming
from dslm_eval.generate_cli import main as generate_main
from dslm_shards.tokenizer import train_tokenizer

IM_END_ID = SPECIAL_TOKENS.index(IM_END)
transformers = pytest.importorskip(
    "transformers", reason="the HF export check needs `transformers` (pip install .[test])"
)


def hf_model(weights: dict, cfg: ModelConfig):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(cfg)))
    hf.load_state_dict(hf_state_dict(weights, cfg), strict=True)
    return hf.eval()


@pytest.mark.parametrize("options", [dict(), dict(lm_head_bias=False), dict(tie_embeddings=True, vocab_multiple=128)])
def test_hf_gpt2_logits_match(options, trained_looking):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=256, vocab_size=300, block_size=32, **options)
    model = trained_looking(cfg)
    hf = hf_model(model.state_dict(), cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_folded_head_bias_is_exact_for_any_normalized_input():
    torch.manual_seed(1)
    gain, shift = torch.rand(32) + 0.5, torch.randn(32)
    weight, bias = torch.randn(100, 32), torch.randn(100)
    new_gain, new_shift, new_weight = fold_head_bias(gain, shift, weight, bias)
    n = torch.nn.functional.layer_norm(torch.randn(50, 32), (32,))
    assert torch.allclose(
        n @ torch.diag(gain) @ weight.T + shift @ weight.T + bias, (n * new_gain + new_shift) @ new_weight.T, atol=1e-4
    )


def test_config_is_gpt2s():
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, intermediate_size=64, vocab_size=100, block_size=16)
    config = transformers.GPT2Config(**json.loads(json.dumps(hf_config(cfg))))
    assert (config.n_layer, config.n_head, config.n_embd, config.n_inner, config.n_positions) == (3, 2, 32, 64, 16)
    assert not config.tie_word_embeddings


def test_a_tied_head_is_written_as_a_tensor_of_its_own(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(
        n_layer=1,
        n_head=2,
        n_embd=32,
        intermediate_size=64,
        vocab_size=100,
        block_size=16,
        tie_embeddings=True,
        lm_head_bias=False,
    )
    weights = GPT(cfg).state_dict()  # lm_head.weight is wte.weight, as in a consolidated ZeRO-3 checkpoint
    assert weights["lm_head.weight"].data_ptr() == weights["wte.weight"].data_ptr()
    save_file(hf_state_dict(weights, cfg), str(tmp_path / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])


PROMPTS = ["def encode(self, o):", "a <eos> b <|im_start|>user\n<bos>x", "  ünïcode ✓\n\t", "<pad><|response|>", ""]
"""Special tokens written as text (issue 15: `<eos>` became id 3), text the normalizer changes, nothing."""


@pytest.fixture(scope="module")
def shards_tokenizer(tmp_path_factory) -> Path:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer([text], vocab_size=300).save(str(path))
    return path


def write_export(folder: Path, model: GPT, tokenizer: Path, framing: Framing = Framing()) -> Path:
    """The files dslm-export writes, from a model in memory."""
    folder.mkdir()
    save_file(hf_state_dict(model.state_dict(), model.cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg, framing)))
    write_tokenizer_files(folder, tokenizer, framing)
    return folder


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_exported_tokenizer_encodes_prompts_as_dslm(tmp_path, shards_tokenizer, direction):
    framing = Framing(direction)
    folder = tmp_path / "export"
    folder.mkdir()
    write_tokenizer_files(folder, shards_tokenizer, framing)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = PromptFraming(load_text_tokenizer(shards_tokenizer), framing)
    from_export = PromptFraming(load_text_tokenizer(folder / "tokenizer.json"), framing)  # no second <bos>
    for prompt in PROMPTS:
        ids = theirs(prompt)["input_ids"]
        assert ids == theirs(prompt, split_special_tokens=True)["input_ids"]  # the call for other versions
        in_reading_order = ids if direction == "forward" else ids[::-1]
        assert in_reading_order == ours.ids(prompt) == from_export.ids(prompt), prompt
    # the export records the tokenizer it was trained with; its own file differs by the post-processor
    assert export_tokenizer_sha256(folder) == sha256_file(shards_tokenizer) != sha256_file(folder / "tokenizer.json")
    first = [BOS_ID] if direction == "forward" else []
    assert (
        theirs(PROMPTS[1])["input_ids"][: len(first) + 1]
        == first + load_text_tokenizer(shards_tokenizer).encode(PROMPTS[1]).ids[:1]
    )
    assert EOS_ID not in theirs(PROMPTS[1])["input_ids"][:-1]


def test_greedy_continuations_on_the_export_equal_dslm_generates(tmp_path, shards_tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=300, block_size=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # far-from-uniform choices: no near-ties for float rounding to flip
    folder = write_export(tmp_path / "export", model.eval(), shards_tokenizer)
    prompts = PROMPTS[:4]
    out = tmp_path / "out.jsonl"
    generate_main(
        [
            str(folder),
            *(a for p in prompts for a in ("--prompt", p)),
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    dslm = [json.loads(line)["outputs"][str(folder)] for line in out.read_text().splitlines()]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    for prompt, text in zip(prompts, dslm):
        enc = tok(prompt, return_tensors="pt")
        new = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].size(1) :].tolist()
        new = new[: new.index(EOS_ID)] if EOS_ID in new else new  # dslm-generate stops before <eos>
        assert tok.decode(new, skip_special_tokens=True) == text, prompt


def test_an_export_without_a_recorded_tokenizer_is_known_by_its_tokenizer_file(tmp_path, shards_tokenizer):
    folder = tmp_path / "old-export"  # written before the record: tokenizer.json was a plain copy
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(shards_tokenizer.read_bytes())
    assert export_tokenizer_sha256(folder) == sha256_file(shards_tokenizer)


CHAT_TEXTS = ["Write a function that adds two numbers.", "def f(x):\n    return x  ", "  ünïcode ✓\n\t", "a  b"]


@pytest.mark.parametrize("name", ["instruct", "backchat"])
def test_a_templated_exports_chat_template_gives_the_ids_dslm_feeds(tmp_path, shards_tokenizer, name):
    framing = Framing("forward", name)
    folder = tmp_path / "export"
    folder.mkdir()
    write_tokenizer_files(folder, shards_tokenizer, framing)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    framer = Framer(get_template(name), load_text_tokenizer(shards_tokenizer))
    dslm = PromptFraming(load_text_tokenizer(shards_tokenizer), framing)
    given, target = get_template(name).given("forward"), get_template(name).target("forward")
    for text in CHAT_TEXTS:
        user = [{"role": "user", "content": text}]
        assert theirs.apply_chat_template(user, add_generation_prompt=True)["input_ids"] == dslm.ids(text), text
        example = theirs.apply_chat_template([*user, {"role": "assistant", "content": "x = 1"}])["input_ids"]
        assert example == framer.example({given: text, target: "x = 1"}, "forward")[0].tolist(), text
    # special tokens written in a message stay text, as in dslm, when the caller asks for it (transformers
    # encodes the text around them in pieces: a merge across a piece's edge may give other ids than dslm's)
    marked = "a <|im_end|> b <eos>"
    ids = theirs.apply_chat_template(
        [{"role": "user", "content": marked}], add_generation_prompt=True, sanitize_control_tokens=True
    )["input_ids"]
    opening, closing = dslm.ids("")[:-3], dslm.ids("")[-3:]  # <bos> and the given block's markers; its end
    assert ids[: len(opening)] == opening and ids[-len(closing) :] == closing
    assert not set(ids[len(opening) : -len(closing)]) & {EOS_ID, IM_END_ID}
    assert theirs.decode(ids[len(opening) : -len(closing)]) == get_template(name).text(marked)
    with pytest.raises(Exception, match=f"the {name} template takes one user message"):
        theirs.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], add_generation_prompt=True)
    for content in ([{"type": "text", "text": "hi"}], 5):  # the list-of-parts form; not text at all
        with pytest.raises(Exception, match="a message content must be a string"):
            theirs.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_a_backward_templated_exports_chat_template_refuses_with_one_line(tmp_path, shards_tokenizer):
    folder = tmp_path / "export"
    folder.mkdir()
    write_tokenizer_files(folder, shards_tokenizer, Framing("backward", "instruct"))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    with pytest.raises(Exception, match="reads text backward") as refused:
        theirs.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert "\n" not in str(refused.value)


def test_an_instruction_models_export_stops_where_dslm_generate_does(tmp_path, sft_shards, write_checkpoint):
    """transformers' generate() on the export of a model tuned on instruction shards stops at the
    <|im_end|> that the model writes (generation_config.json), not after max_new_tokens."""
    from dslm.config import RunConfig, save_config
    from dslm.data.loader import DataConfig
    from dslm.export import main as export_main

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=512, block_size=96)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.bias[IM_END_ID] = 50.0  # a model that answers at once: <|im_end|>
    run = RunConfig(name="tuned", runs_dir=str(tmp_path), model=cfg, data=DataConfig(shards=str(sft_shards[0])))
    save_config(run)
    write_checkpoint(run.run_dir.path, 3, {"module": model.state_dict(), "global_steps": 3})
    export_main([str(run.run_dir.path / "checkpoints" / "global_step3")])
    folder = run.run_dir.path / "export" / "step3"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == IM_END_ID
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": CHAT_TEXTS[0]}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.size(1) :].tolist() == [IM_END_ID]
    # the stop the export used to name (<eos>, which this model never writes) runs to the budget
    assert hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=EOS_ID).size(1) == ids.size(1) + 20
    out = tmp_path / "out.jsonl"
    generate_main([str(folder), "--prompt", CHAT_TEXTS[0], "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["outputs"][str(folder)] == ""  # dslm-generate: stopped at once, too
