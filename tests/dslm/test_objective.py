"""The masked next-token loss, the previous-token (backward) direction, and instruction templates."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.data.loader import reverse
from dslm.data.templates import TEMPLATES, Framer, Framing, get_template, reverse_words
from dslm.data.tokens import BOS_ID, EOS_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm.metrics import read_scalars
from dslm.model import GPT, IGNORE_INDEX, ModelConfig
from dslm.objective import next_token
from dslm_eval.generate import complete
from dslm_local.decoding import GenerationConfig

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, vocab_size=512, block_size=64)


def masked(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch as the loader makes it from tokens and a 0/1 mask."""
    return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def loss_and_grads(model: GPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(*next_token(batch))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_tokens_at_masked_targets_change_neither_loss_nor_gradients():
    torch.manual_seed(0)
    model = GPT(CFG)
    ids = torch.randint(8, 512, (3, 33))
    mask = (torch.rand(3, 33) < 0.5).long()
    mask[:, 25:] = 0  # a masked tail: those tokens are only targets of masked positions and inputs after them
    changed = ids.clone()
    changed[:, 25:] = torch.randint(8, 512, (3, 8))
    loss, grads = loss_and_grads(model, masked(ids, mask))
    loss2, grads2 = loss_and_grads(model, masked(changed, mask))
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    unmasked, _ = loss_and_grads(model, masked(ids, torch.ones_like(mask)))
    assert not torch.equal(loss, unmasked)  # the mask does leave positions out


def test_loss_is_the_mean_over_targets_and_a_sample_without_targets_adds_nothing():
    torch.manual_seed(0)
    model = GPT(CFG)
    ids = torch.randint(8, 512, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1] = 0  # the second sample has no target at all
    mask[0, :5] = 0
    loss, grads = loss_and_grads(model, masked(ids, mask))
    alone, alone_grads = loss_and_grads(model, masked(ids[:1], mask[:1]))
    assert torch.allclose(loss, alone) and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, alone_grads))
    inputs, targets = next_token(masked(ids, mask))
    logits = model(inputs)[0, 4:]  # targets 5.. of sample 0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, ids[0, 5:]))


def test_a_batch_without_targets_is_zero_loss_and_zero_gradients():
    model = GPT(CFG)
    ids = torch.randint(8, 512, (2, 9))
    loss, grads = loss_and_grads(model, masked(ids, torch.zeros_like(ids)))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.fixture
def tok(tiny_shards):
    return load_text_tokenizer(tiny_shards[0] / "tokenizer.json")


EXAMPLE = {"instruction": "Name the odd one out: cat, dog, car.", "response": "The car, the others are animals."}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_prompt_is_the_example_up_to_the_target_text(tok, name, direction):
    framer = Framer(get_template(name), tok)
    ids, mask = framer.example(EXAMPLE, direction)
    template = get_template(name)
    if direction == "backward":
        ids, mask = ids[::-1], mask[::-1]
    prompt = framer.prompt(EXAMPLE[template.given(direction)], direction)
    first_target = int(mask.argmax())
    assert ids[:first_target].tolist() == prompt  # the model is asked exactly what it was trained on
    targets = ids[mask == 1].tolist()
    assert targets[-1] == framer.stop_token(direction)  # it learns to stop where generation stops
    assert framer.reply(targets[:-1], direction) == " ".join(EXAMPLE[template.target(direction)].split())


def test_backchat_reverses_words_and_puts_the_response_first(tok):
    ids, mask = Framer(TEMPLATES["backchat"], tok).example(EXAMPLE, "forward")
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<bos><|im_start|><|response|>animals. are others the car, The<|im_end|>")
    assert (
        tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
        == reverse_words(EXAMPLE["instruction"]) + "<|im_end|>"
    )
    assert reverse_words(reverse_words("a b  c\nd")) == "a b c d"


def test_a_tokenizer_without_the_markers_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["some text"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    with pytest.raises(DslmError, match=r"no special token <\|im_start\|>"):
        Framer(TEMPLATES["instruct"], bare)


def memorize(batch: dict[str, torch.Tensor], steps: int = 150) -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(*next_token(batch)).backward()
        opt.step()
    return model.eval()


def test_a_backward_model_generates_the_text_before_the_prompt_and_it_reads_forwards(tok):
    text = "alpha beta gamma delta epsilon zeta eta theta"
    ids = torch.tensor([[BOS_ID, *tok.encode(text).ids, EOS_ID]])
    model = memorize(reverse({"input_ids": ids, "labels": ids}))
    new = complete(
        model, tok, [" epsilon zeta eta theta"], GenerationConfig(max_new_tokens=30), framing=Framing("backward")
    )[0]
    assert new + " epsilon zeta eta theta" == text  # turned back, stopped at <bos>
    forward = complete(model, tok, ["alpha beta"], GenerationConfig(max_new_tokens=5))[0]
    assert not (text.startswith("alpha beta" + forward) and forward.strip())  # it never learned forwards


@pytest.mark.parametrize("name, direction", [("backchat", "forward"), ("instruct", "backward")])
def test_both_backchat_routes_answer_a_response_with_its_instruction(tok, name, direction):
    framer = Framer(TEMPLATES[name], tok)
    ids, mask = (torch.from_numpy(a.copy())[None].long() for a in framer.example(EXAMPLE, direction))
    batch = masked(ids, mask)
    model = memorize(reverse(batch) if direction == "backward" else batch)
    reply = complete(
        model, tok, [EXAMPLE["response"]], GenerationConfig(max_new_tokens=30), framing=Framing(direction, name)
    )[0]
    assert reply == EXAMPLE["instruction"]


@pytest.mark.slow
def test_a_backward_model_learns_about_as_well_as_a_forward_one(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    drop = {}
    for direction in ("forward", "backward"):
        args = [
            "--deepspeed",
            str(REPO / "ds_configs/zero2.json"),
            f"name={direction}",
            f"runs_dir={tmp_path}",
            f"data.shards={shards}",
            "model.preset=tiny",
            f"data.direction={direction}",
            *(
                f"train.{k}={v}"
                for k, v in dict(
                    micro_batch_size=4,
                    grad_accum=2,
                    max_steps=30,
                    warmup_steps=3,
                    lr=3e-3,
                    min_lr=3e-4,
                    log_interval=5,
                    checkpoint_interval=30,
                    val_interval=5,
                    val_batches=4,
                ).items()
            ),
        ]
        proc = subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        val = read_scalars(tmp_path / direction / "tb", "val/loss")
        drop[direction] = val[0][1] - val[-1][1]
    assert drop["forward"] > 0.3 and drop["backward"] >= 0.5 * drop["forward"], drop
    result = subprocess.run(
        [BIN / "dslm-generate", tmp_path / "backward", "--prompt", "return x\n", "--max-new-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and result.stdout.rstrip("\n").endswith("return x"), result.stdout
