"""The model card every export folder holds (dslm.model_card): each figure in it is the run's."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from tokenizers import Tokenizer

from dslm.checkpoint.format import TrainState, seal, sealed_state
from dslm.checkpoint.weights import model_config_of, read_weights
from dslm.config import load_config, read_run_config, save_config
from dslm.data.manifest import Manifest
from dslm.data.tokens import SPECIAL_TOKENS
from dslm.errors import DslmError
from dslm.export import main as export_main
from dslm.metrics import ScalarLog, read_rows
from dslm.model import GPT
from dslm.model_card import CARD_NAME, LOSS_CURVE_NAME, render_model_card, write_model_card
from dslm.model_source import resolve_source
from dslm.run_dir import RunDir
from dslm_eval.cli import main as eval_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def front_matter(card: str) -> dict:
    """The card's YAML metadata block (between the first two `---` lines), parsed."""
    first, metadata, _ = card.split("---\n", 2)
    assert first == ""
    return yaml.safe_load(metadata)


def section(card: str, title: str) -> str:
    """The text of the card's `## title` section."""
    (text,) = [part.split("\n", 1)[1] for part in card.split("\n## ") if part.split("\n", 1)[0] == title]
    return text


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in `text`, each as its cells (an escaped "|" read as "|")."""
    rows = [
        [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return [row for row in rows if not all(cell and set(cell) <= set("-:") for cell in row)][1:]


def table(text: str, header: str) -> dict[str, str]:
    """The two-column table under the line `header` in `text`, as {first cell: second cell}."""
    block = text.split(header + "\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    return {row[0]: row[1] for row in table_rows(block)}


@pytest.fixture
def card_run(base_run, tmp_path) -> Path:
    """A copy of base_run as a trained run leaves it: metrics.csv (train and val loss), its tag's
    state with the samples, time and hardware the trainer records, and dslm-eval's result."""
    run = tmp_path / "runs" / "base"
    shutil.copytree(base_run, run)
    log = ScalarLog(RunDir(run).metrics_csv, 0)
    for step in range(1, 6):
        log.log(step, {"train/loss": 6.0 - 0.3 * step, "train/tokens": step * 8 * 64})
        if step in (3, 5):
            log.log(step, {"val/loss": 6.1 - 0.25 * step, "val/ppl": 2.0})
    log.close()
    tag = RunDir(run).tag(5)
    manifest = Manifest.load(read_run_config(RunDir(run)).data.shards)
    shards = {"tokenizer_sha256": manifest.tokenizer_sha256, "seq_len": manifest.seq_len, "train_samples": 1}
    state = TrainState(step=5, samples=40, shards=shards, train_seconds=4321.5, hardware="1 x CPU (x86_64)")
    seal(tag, state)
    eval_main([str(run), "--metrics", "perplexity"])
    return run


def flat(settings: dict, prefix: str) -> dict[str, str]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = f"`{json.dumps(value)}`"
    return out


def test_every_figure_of_a_runs_card_is_the_runs(card_run):
    source = resolve_source(card_run)
    cfg, run = read_run_config(RunDir(card_run)), RunDir(card_run)
    card = render_model_card(source, "hf")

    meta = front_matter(card)
    assert {"license", "language", "tags", "library_name"} <= meta.keys() and "base_model" not in meta
    assert meta["library_name"] == "transformers" and "dslm" in meta["tags"] and meta["language"] == ["code"]

    tokenizer = Tokenizer.from_file(str(Path(cfg.data.shards) / "tokenizer.json"))
    tokenizer_json = json.loads((Path(cfg.data.shards) / "tokenizer.json").read_text())
    _, weights, _ = read_weights(card_run)
    model = GPT(cfg.model)
    model.load_state_dict(weights)
    architecture = table(section(card, "Architecture"), "")
    assert architecture == {
        "parameters": f"{model.num_params():,}",
        "layers": str(cfg.model.n_layer),
        "attention heads": str(cfg.model.n_head),
        "embedding width": str(cfg.model.n_embd),
        "MLP width": str(cfg.model.intermediate_size),
        "context length": f"{cfg.model.block_size:,} tokens",
        "output vocabulary": f"{cfg.model.vocab_size:,}",
        "tied embeddings": "no",
        "output head bias": "yes",
        "tokenizer": f"{tokenizer_json['model']['type']}, {tokenizer.get_vocab_size():,} tokens",
        "normalizer": tokenizer_json["normalizer"]["type"],
        "special tokens": ", ".join(f"`{t}` {tokenizer.token_to_id(t)}" for t in SPECIAL_TOKENS),
        "direction": "forward",
        "template": "none",
        "fill-in-the-middle": "no",
    }

    manifest = Manifest.load(cfg.data.shards)
    data = table_rows(section(card, "Data"))
    assert data == [
        [
            Path(cfg.data.shards).name,
            f"`{spec}`",
            "1",
            f"{stats.documents:,}",
            f"{stats.tokens:,}",
            ", ".join(f"{reason} {n:,}" for reason, n in sorted(stats.filtered.items())) or "none",
        ]
        for spec, stats in manifest.sources.items()
    ]

    state = sealed_state(run.tag(5))
    _, rows = read_rows(run.metrics_csv)
    last_train = [r for r in rows if r.get("train/loss")][-1]
    last_val = [r for r in rows if r.get("val/loss")][-1]
    training = section(card, "Training")
    assert table(training, "") == {
        "checkpoint": "step 5",
        "steps": str(state.step),
        "samples": f"{state.samples:,}",
        "tokens seen": f"{state.samples * state.shards['seq_len']:,}",
        "wall time": f"{state.train_seconds / 60:.1f} min",  # 4321.5 s
        "hardware": state.hardware,
        "ranks": str(state.world_size),
        "final train loss": f"{float(last_train['train/loss']):.4f} (step {last_train['step']})",
        "final val loss": f"{float(last_val['val/loss']):.4f} (step {last_val['step']})",
    }
    assert f"![loss curve]({LOSS_CURVE_NAME})" in training
    settings = table(training, "The recipe's settings:")
    assert settings == flat(dataclasses.asdict(cfg.train), "train.") | {
        "data.direction": f"`{json.dumps(cfg.data.direction)}`",
        "ds_config": f"`{json.dumps(cfg.ds_config)}`",
    }

    evaluation = section(card, "Evaluation")
    result = json.loads(run.eval_result(5).read_text())
    assert table_rows(evaluation.split("### Export parity")[0]) == [
        ["the run's shards", metric, f"{value:.4f}"] for metric, value in result["scalars"].items()
    ]
    assert "--check" in evaluation.split("### Export parity")[1]
    assert "Trained from random weights" in section(card, "Fine-tune chain")
    assert "llama-cli -m" in section(card, "How to use") and "model-f16.gguf" in section(card, "How to use")


def test_write_model_card_writes_the_card_and_a_real_png_and_renders_parity(card_run, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    source = resolve_source(card_run)
    write_model_card(folder, source, "hf")
    assert (folder / CARD_NAME).read_text() == render_model_card(source, "hf")
    png = (folder / LOSS_CURVE_NAME).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert matplotlib.image.imread(folder / LOSS_CURVE_NAME).ndim == 3
    assert sorted(p.name for p in folder.iterdir()) == [CARD_NAME, LOSS_CURVE_NAME], "nothing half-written left"

    parity = {
        "checkpoint": str(card_run),
        "step": 5,
        "shards": "x",
        "tokens": 1000,
        "reference": {"bits_per_byte": 1.5},
        "rows": [
            {
                "format": "hf",
                "size_bytes": 3 * 2**20,
                "bits_per_byte": 1.5012,
                "delta_pct": 0.08,
                "top1_agreement": 0.995,
                "bounds": {},
                "passed": True,
            }
        ],
        "passed": True,
    }
    (folder / "parity.json").write_text(json.dumps(parity))
    write_model_card(folder, source, "hf")  # again, on the finished folder
    rows = table_rows(section((folder / CARD_NAME).read_text(), "Evaluation").split("### Export parity")[1])
    assert rows == [
        ["checkpoint", "", "1.5000", "", "", ""],
        ["hf", "3.00 MiB", "1.5012", "+0.08%", "99.50%", "yes"],
    ]

    (folder / "parity.json").write_text('{"rows": [')  # cut off
    with pytest.raises(DslmError, match="parity.json is not dslm-export --check's parity table"):
        write_model_card(folder, source, "hf")


def test_a_fine_tuned_runs_card_names_its_base_model_and_chain(base_run, tiny_shards, tmp_path, write_checkpoint):
    cfg = load_config(
        None,
        ["name=tuned", f"runs_dir={tmp_path}", f"train.init_from={base_run}", f"data.shards={tiny_shards[0]}"],
        model_config_of,
    )
    _, _, cfg.origin = read_weights(base_run)
    save_config(cfg)
    write_checkpoint(cfg.run_dir.path, 2, {"module": GPT(cfg.model).state_dict(), "global_steps": 2})

    card = render_model_card(resolve_source(cfg.run_dir.path), "onnx")
    assert front_matter(card)["base_model"] == cfg.origin.path == str(RunDir(base_run).tag(5))
    chain = section(card, "Fine-tune chain")
    assert f"`{cfg.origin.path}` (step 5, weights sha256 `{cfg.origin.sha256}`)" in chain
    assert "`base`" in chain and "Trained from random weights" in chain
    training = table(section(card, "Training"), "")
    assert training["wall time"] == training["hardware"] == "not recorded"  # a tag written before they were
    assert "No dslm-eval result" in section(card, "Evaluation")


def test_an_export_of_an_export_outside_a_run_says_what_is_not_recorded(card_run, tmp_path):
    export_main([str(card_run), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / CARD_NAME).is_file() and (tmp_path / "hf" / LOSS_CURVE_NAME).is_file()
    export_main([str(tmp_path / "hf"), str(tmp_path / "again")])
    card = (tmp_path / "again" / CARD_NAME).read_text()
    assert "not recorded" in section(card, "Data") and "not recorded" in section(card, "Fine-tune chain")
    model = read_run_config(RunDir(card_run)).model
    folded = model.num_params() - model.padded_vocab_size  # the export folds the head bias
    assert table(section(card, "Architecture"), "")["parameters"] == f"{folded:,}"
    assert not (tmp_path / "again" / LOSS_CURVE_NAME).exists()
