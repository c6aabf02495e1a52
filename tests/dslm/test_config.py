import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dslm.config import check_against_manifest, config_keys, load_config
from dslm.engine import load_ds_config
from dslm.errors import DslmError
from dslm.model import ModelConfig


def write(path, text):
    path.write_text(text)
    return path


def test_preset_then_recipe_then_overrides(tmp_path):
    recipe = write(tmp_path / "r.yaml", "name: exp\nmodel:\n  preset: code-33m\n  dropout: 0.1\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(recipe, ["train.lr=2e-3", "model.n_layer=4"])
    assert cfg.name == "exp" and cfg.train.lr == 2e-3
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size, cfg.model.dropout) == (4, 512, 8000, 0.1)
    assert cfg.run_dir.path.as_posix() == "runs/exp"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "train.lrr"),
        (["train.max_steps=many"], "train.max_steps"),
        (["model.preset=huge"], "model.preset='huge'"),
        (["model.n_head=3"], "model.n_embd=128 is not divisible by model.n_head=3"),
        (["train.warmup_steps=5000"], "train.warmup_steps=5000"),
        (["train.lr=inf"], "train.lr=inf must be positive and finite"),
        (["name=../elsewhere"], "name='../elsewhere' must be one folder name"),
    ],
)
def test_mistakes_name_the_field(overrides, message):
    with pytest.raises(DslmError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.freeze=[wte.*"], "override 'train.freeze=[wte.*': the value is not valid YAML"),
        (
            ["data.mix=[{shards: data/a, weight: 1}"],
            "override 'data.mix=[{shards: data/a, weight: 1}': the value is not",
        ),
        (
            ["train.lr=!!python/name:os.system"],
            "override 'train.lr=!!python/name:os.system': the value is not valid YAML",
        ),
        (["train.lr"], "override 'train.lr' is not key=value"),
        (["=3"], "override '=3' is not key=value"),
        (["train.freeze={a: 1}"], "the overrides: a mapping {...} given for a list field"),
        (["data.mix={shards: data/a}"], "the overrides: a mapping {...} given for a list field"),
    ],
)
def test_an_override_that_does_not_parse_is_one_line_naming_it(overrides, message):
    with pytest.raises(DslmError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shards_must_fit_the_model(tiny_shards):
    _, manifest = tiny_shards
    with pytest.raises(DslmError, match="model.vocab_size=100"):
        check_against_manifest(load_config(None, ["model.vocab_size=100"]), manifest)
    with pytest.raises(DslmError, match="model.block_size=32"):
        check_against_manifest(load_config(None, ["model.block_size=32"]), manifest)
    check_against_manifest(load_config(None, ["model.preset=tiny"]), manifest)


def test_ds_config_batch_sizes_filled_in_or_checked(tmp_path):
    train = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3"]).train
    ds = load_ds_config(
        write(tmp_path / "ds.json", json.dumps({"zero_optimization": {"stage": 2}})), train, world_size=2
    )
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4,
        3,
        24,
    )
    clash = write(tmp_path / "clash.json", json.dumps({"train_batch_size": 16}))
    with pytest.raises(DslmError, match="train_batch_size=16 disagrees with train.micro_batch_size"):
        load_ds_config(clash, train, world_size=2)
    with pytest.raises(DslmError, match="not valid JSON"):
        load_ds_config(write(tmp_path / "bad.json", "{"), train, world_size=1)


def test_old_model_keys_are_read_under_their_new_names(tmp_path, capsys):
    old = write(
        tmp_path / "config.yaml",
        "model:\n  preset: tiny\n  d_model: 64\n  d_ff: 256\n  context: 32\n  head_bias: false\n",
    )
    model = load_config(old, ["model.d_model=32"]).model
    assert (model.n_embd, model.intermediate_size, model.block_size, model.lm_head_bias) == (32, 256, 32, False)
    err = capsys.readouterr().err
    assert "model.d_model is now model.n_embd" in err and "model.head_bias is now model.lm_head_bias" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1, 2\n", "is not valid YAML: while parsing"),
        ("- model\n- train\n", "must be a mapping of sections"),
        ("model:\n  d_model: 64\n  n_embd: 32\n", "set both model.d_model and model.n_embd"),
        ("train:\n  freeze: {wte: 1}\n", "r.yaml: a mapping {...} given for a list field"),
        ("train:\n  lr: !!python/name:os.system\n", "is not valid YAML: could not determine a constructor"),
    ],
)
def test_a_broken_recipe_is_one_line(tmp_path, text, message):
    with pytest.raises(DslmError, match=message) as e:
        load_config(write(tmp_path / "r.yaml", text), [])
    assert "\n" not in str(e.value)


def test_a_recipe_that_is_not_text_is_one_line_naming_it(tmp_path):
    recipe = tmp_path / "picture.png"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DslmError, match="picture.png is not a YAML recipe: it is not UTF-8 text"):
        load_config(recipe, [])


def test_an_empty_preset_from_the_shell_means_no_preset():
    with pytest.raises(DslmError, match="model.n_layer is not set and model.preset is empty"):
        load_config(None, ["model.preset="])  # what bash passes for model.preset=""
    sizes = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=8",
        "model.intermediate_size=16",
        "model.vocab_size=10",
        "model.block_size=4",
    ]
    assert load_config(None, ["model.preset=", *sizes]).model.n_embd == 8


RECIPES = sorted((Path(__file__).resolve().parents[2] / "launch" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_its_tiny_form_fits_the_cpu(recipe):
    cfg = load_config(recipe, [])
    assert cfg.name == recipe.stem
    tiny = cfg if recipe.stem.endswith("-tiny") or recipe.stem == "demo" else load_config(recipe, ["model.preset=tiny"])
    assert tiny.model.n_layer == 2 and tiny.train.micro_batch_size * tiny.train.grad_accum <= 256


def test_the_backchat_recipe_has_the_cards_settings():
    cfg = load_config(Path(__file__).resolve().parents[2] / "launch/recipes/backchat-pretrain.yaml", [])
    assert (cfg.model.vocab_size, cfg.model.block_size, cfg.data.direction) == (8888, 1024, "backward")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.train.schedule) == (
        64,
        4,
        3e-4,
        "cosine",
    )


@dataclass
class Inner:
    c: str = "x"
    """C's docstring."""


@dataclass
class Base:
    a: int = 1
    """A's docstring,
    on two lines."""


@dataclass
class Example(Base):
    b: list[str] = field(default_factory=lambda: ["p"])
    inner: Inner = field(default_factory=Inner)
    """Not a key: its fields are."""
    items: list[Inner] = field(default_factory=list)
    """Entries, each with c."""


def test_config_keys_read_each_fields_docstring_from_the_source_inherited_and_nested_too():
    keys = {k.name: (k.type, k.default, k.doc) for k in config_keys(Example)}
    assert keys == {
        "a": ("int", 1, "A's docstring,\non two lines."),
        "b": ("list[str]", ["p"], ""),
        "inner.c": ("str", "x", "C's docstring."),
        "items": ("list[Inner]", [], "Entries, each with c."),
        "items[].c": ("str", "x", "C's docstring."),
    }


def test_every_key_of_the_run_config_has_a_docstring():
    keys = config_keys()
    assert {"name", "model.n_layer", "data.mix[].weight", "train.lr", "train.lora.rank", "origin.sha256"} <= {
        k.name for k in keys
    }  # nested, listed and inherited (OptimConfig) fields all appear
    assert [k.name for k in keys if not k.doc] == []


def test_help_config_prints_a_sections_keys_with_type_default_and_docstring(capsys):
    from dslm.train import main

    main(["--help-config", "train.lora"])
    out = capsys.readouterr().out
    assert (
        "train.lora.alpha: float = 16.0\n    LoRA's alpha, > 0: an adapter's output is scaled by alpha / rank." in out
    )
    assert 'train.lora.target_modules: list[str] = ["qkv", "proj", "fc"]' in out
    assert re.findall(r"^([a-z_.\[\]]+): ", out, re.M) == [
        "train.lora.rank",
        "train.lora.alpha",
        "train.lora.dropout",
        "train.lora.target_modules",
    ]
    main(["--help-config"])
    assert "model.n_layer: int | None = null\n    Transformer blocks" in capsys.readouterr().out


def test_help_config_of_an_unknown_section_is_one_line_naming_the_sections(capsys):
    from dslm.train import main

    with pytest.raises(SystemExit) as stopped:
        main(["--help-config", "trian"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "dslm-train: error: --help-config trian: no such section; the sections are "
        "data, data.mix[], model, origin, train, train.lora\n"
    )


def test_dslm_train_help_names_help_config(capsys):
    from dslm.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--help-config [SECTION]" in capsys.readouterr().out


def test_the_deepspeed_config_resolves_from_any_directory(tmp_path, monkeypatch):
    """Issue 28: the default and the ds_configs/NAME spellings the docs show work outside the
    repository (the packaged configs); a folder's own ds_configs/NAME wins, any other path is
    taken as given, made absolute."""
    from dslm.config import ds_config_path, packaged_ds_config

    monkeypatch.chdir(tmp_path)
    assert ds_config_path("") == str(packaged_ds_config("zero2.json"))
    assert ds_config_path("ds_configs/zero3.json") == str(packaged_ds_config("zero3.json"))
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")
    assert ds_config_path("ds_configs/zero3.json") == str(tmp_path / "ds_configs" / "zero3.json")
    assert ds_config_path("ds_configs/mine.json") == str(tmp_path / "ds_configs" / "mine.json")
    assert ds_config_path("../x.json") == str(tmp_path.parent / "x.json")


SOURCE = ModelConfig(preset="tiny", n_layer=1, n_head=2, n_embd=64)
EXPORT = ModelConfig(
    preset="", n_layer=1, n_head=2, n_embd=64, intermediate_size=256, vocab_size=512, block_size=64, lm_head_bias=False
)


def test_a_fine_tune_takes_its_model_from_its_source():
    """train.init_from's model fills every model.* not set; model.dropout may differ, and a head
    bias the source lacks may be added (it starts at zero)."""
    sources = {"run": SOURCE, "export": EXPORT}.__getitem__
    tuned = load_config(
        None, ["train.init_from=run", "model.preset=tiny", "model.n_head=2", "model.dropout=0.1"], source_model=sources
    )
    assert tuned.model == dataclasses.replace(SOURCE, dropout=0.1)
    tuned = load_config(
        None, ["train.init_from=export", "model.preset=tiny", "model.lm_head_bias=true"], source_model=sources
    )
    assert tuned.model == dataclasses.replace(EXPORT, lm_head_bias=True)  # an export names no preset
    assert load_config(None, ["train.init_from=run"]).model == ModelConfig(preset="tiny")  # a run's own config.yaml


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_embd=128"], "model.n_embd=128 but train.init_from=run has model.n_embd=64; leave model.n_embd out"),
        (["model.preset=code-33m"], "model.preset=code-33m but train.init_from=run has model.preset=tiny"),
        (
            ["model.tie_embeddings=true"],
            "model.tie_embeddings=True but train.init_from=run has model.tie_embeddings=False",
        ),
        (["model.vocab_multiple=128"], "model.vocab_multiple=128 but train.init_from=run has model.vocab_multiple=1"),
        (["model.lm_head_bias=false"], "model.lm_head_bias=False but train.init_from=run has model.lm_head_bias=True"),
        (["model.d_model=128"], "model.n_embd=128 but"),  # an old key, under its new name
    ],
)
def test_a_fine_tune_refuses_a_model_its_source_cannot_fill(overrides, message):
    with pytest.raises(DslmError, match=re.escape(message)):
        load_config(None, ["train.init_from=run", *overrides], source_model={"run": SOURCE}.__getitem__)
