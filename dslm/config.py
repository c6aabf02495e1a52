"""The run config: a YAML recipe plus dotted key=value overrides, resolved into typed dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dslm.data.loader import DataConfig
from dslm.data.manifest import Manifest
from dslm.errors import DslmError
from dslm.files import atomic_write_text
from dslm.logs import warning
from dslm.model import SIZES, ModelConfig
from dslm.run_dir import RunDir
from dslm.trainer import TrainConfig

DEFAULT_DS_CONFIG = "zero2.json"
"""The DeepSpeed config a run gets without `--deepspeed`: ds_configs/zero2.json as installed with dslm."""
RENAMED_MODEL_KEYS = {
    "d_model": "n_embd",
    "d_ff": "intermediate_size",
    "context": "block_size",
    "head_bias": "lm_head_bias",
}
"""model.* keys renamed to the field's standard names (GPT-2, nanoGPT, litgpt): a recipe, an
override or a run's config.yaml that still uses an old one is read with a warning."""


@dataclass
class Origin:
    """Where a fine-tuned run's initial weights came from (`train.init_from`), recorded by the run."""

    path: str = ""
    """The checkpoint tag or export folder read; "" for a run that started from random weights."""
    step: int | None = None
    """That checkpoint's optimizer step, where known."""
    sha256: str = ""
    """sha256 of the weights read (dslm.checkpoint.weights.weights_sha256)."""


@dataclass
class RunConfig:
    """Everything a training run is made from; saved as runs/NAME/config.yaml. Each part goes
    only to what it configures: `model` to the GPT, `data` to the loader, `train` to the loop,
    the optimizer and the checkpoints."""

    name: str = "run"
    """The run directory is runs_dir/name: one folder name (no "/", not "." or "..")."""
    runs_dir: str = "runs"
    """Folder that holds the run directories."""
    ds_config: str = ""
    """DeepSpeed JSON (ZeRO stage, bf16, clipping); batch sizes in it are filled in from `train`.
    "" is ds_configs/zero2.json as installed with dslm (packaged_ds_config)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The GPT's architecture (`model.*`; dslm.model.ModelConfig)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training samples (`data.*`; dslm.data.loader.DataConfig)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop, optimizer, schedule and checkpoints (`train.*`; dslm.trainer.TrainConfig)."""
    origin: Origin = field(default_factory=Origin)
    """Written by the run, not read: where `train.init_from` took the weights from."""
    template: str = ""
    """Written by the run, not read: the chat template its shards were built with ("" for plain
    text); dslm-eval, dslm-generate and dslm-export frame prompts with it."""
    fim: bool = False
    """Written by the run, not read: its shards were built with fill-in-the-middle (their
    manifest's `fim`), so completion at a cursor may give it the code after the cursor too."""
    given: dict[str, str] = field(default_factory=dict)
    """Written by the run, not read: each outside path (data.shards, data.mix.I.shards,
    train.init_from, train.eval_shards.I, ds_config) as it was typed, where that was not the absolute path the
    config records."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name={self.name!r} must be one folder name inside runs_dir={self.runs_dir}")
        if self.train.freeze_blocks > self.model.n_layer:
            raise ValueError(
                f"train.freeze_blocks={self.train.freeze_blocks} is more than the model's "
                f"{self.model.n_layer} blocks (model.n_layer)"
            )
        if self.train.lora.rank > self.model.n_embd:
            raise ValueError(
                f"train.lora.rank={self.train.lora.rank} is above model.n_embd={self.model.n_embd}: an "
                f"adapter's update has rank at most min(in, out) of its layer, n_embd or less"
            )

    @property
    def run_dir(self) -> RunDir:
        return RunDir(Path(self.runs_dir) / self.name)


@dataclass(frozen=True)
class ConfigKey:
    """One key of the run config as recipes and overrides spell it, with what `dslm-train
    --help-config` prints of it."""

    name: str
    """Dotted, e.g. "train.lora.rank"; an entry of a list of mappings is "data.mix[].weight"."""
    type: str
    """The field's annotation as written, e.g. "int | None"."""
    default: object
    """The value a run has when neither the recipe nor an override sets it."""
    doc: str
    """The field's docstring (the string literal right below it); "" when it has none."""


def fields_as_written(cls: type) -> dict[str, tuple[str, str]]:
    """field name -> (its annotation, the docstring below it or ""), as written in the source of
    dataclass `cls` and of the dataclasses it extends (a subclass's field wins), read with `ast`."""
    found: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, [*body[1:], None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = (
                    after.value.value
                    if isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                    else ""
                )
                found[node.target.id] = (ast.unparse(node.annotation), inspect.cleandoc(doc))
    return found


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[ConfigKey]:
    """Every key of dataclass `cls` (by default the whole run config) in the order the classes
    declare them, a nested dataclass's keys under its field's name (`train.lora.rank`) and those of
    a list of dataclasses under `NAME[]` (`data.mix[].weight`)."""
    written, hints, keys = fields_as_written(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
            continue
        annotation, doc = written[f.name]
        keys.append(ConfigKey(prefix + f.name, annotation, default, doc))
        if dataclasses.is_dataclass(item):
            keys += config_keys(item, f"{prefix}{f.name}[].")
    return keys


def describe_config(section: str = "", width: int = 100) -> str:
    """`dslm-train --help-config [SECTION]`: each key of the run config (or of SECTION: `model`,
    `train.lora`, ...) with its type, default and docstring. Raises DslmError for an unknown SECTION."""
    keys = [k for k in config_keys() if not section or k.name.startswith(section + ".") or k.name == section]
    if not keys:
        sections = sorted({k.name.rpartition(".")[0] for k in config_keys()} - {""})
        raise DslmError(f"--help-config {section}: no such section; the sections are {', '.join(sections)}")
    lines = textwrap.wrap(
        "The run config's keys, set in a recipe or as key=value overrides (KEY: TYPE = "
        "DEFAULT); a model size left at null comes from model.preset.",
        width,
    )
    for key in keys:
        lines.append(f"{key.name}: {key.type} = {json.dumps(key.default)}")
        lines += textwrap.wrap(
            " ".join(key.doc.split()),
            width,
            initial_indent="    ",
            subsequent_indent="    ",
            break_on_hyphens=False,
            break_long_words=False,
        )
    return "\n".join(lines)


def load_config(
    recipe: str | Path | None, overrides: list[str], source_model: Callable[[str], ModelConfig] | None = None
) -> RunConfig:
    """Defaults < recipe YAML < overrides (`train.lr=1e-3`, `model.preset=tiny`); model sizes not
    set anywhere come from model.preset. A run's config.yaml as the recipe names that run: its name
    and runs_dir are its folder's, unless an override sets them. Given `source_model` (what reads
    the model of a `train.init_from` source) and a train.init_from, the model is the source's
    instead (fine_tuned_model). Raises DslmError (one line) for an unknown key, a value of the wrong
    type or out of its range, or a model.* set that the source's weights cannot take."""
    try:
        conf = schema()
        layers = [(load_recipe(recipe), str(recipe))] if recipe else []
        if recipe and Path(recipe).name == RunDir(Path(recipe).parent).config.name and RunDir.at(Path(recipe).parent):
            folder = Path(recipe).parent  # a run is found by its folder, whatever name it was trained as
            layers.append((OmegaConf.create({"name": folder.name, "runs_dir": str(folder.parent)}), str(folder)))
        chosen: set[str] = set()
        for layer, source in [*layers, (parse_overrides(overrides), "the overrides")]:
            rename_old_keys(layer, source)
            conf = merge(conf, layer, source)
            chosen |= set(layer.model) if isinstance(layer.get("model"), DictConfig) else set()
        if source_model is not None and conf.train.init_from:
            conf.model = fine_tuned_model(conf.model, chosen, conf.train.init_from, source_model)
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise DslmError(str(e).splitlines()[0] + (f" ({e.full_key})" if getattr(e, "full_key", None) else "")) from e
    except ValueError as e:  # a __post_init__ check
        raise DslmError(str(e)) from e


def load_recipe(path: str | Path) -> DictConfig:
    """A YAML recipe or config.yaml; DslmError for a missing file, or one that is not UTF-8 YAML or
    not a mapping."""
    if not Path(path).is_file():
        raise DslmError(f"recipe {path}: no such file (the recipes are in the repository's launch/recipes/)")
    try:
        conf = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise DslmError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise DslmError(f"{path} is not a YAML recipe: it is not UTF-8 text") from None
    if not isinstance(conf, DictConfig):
        raise DslmError(f"{path} must be a mapping of sections (model:, data:, train:, ...), not a list")
    return conf


def parse_overrides(overrides: list[str]) -> DictConfig:
    """The dotted `key=value` overrides as one config, each value read as YAML (`1e-3`, `[a, b]`,
    `{shards: d, weight: 1}`), a later one winning. Raises DslmError naming the first override that
    is not key=value or whose value is not YAML (an unclosed `[` or `{`, an unknown `!!` tag)."""
    conf = OmegaConf.create()
    for override in overrides:
        key, equals, _ = override.partition("=")
        if not key or not equals:
            raise DslmError(f"override {override!r} is not key=value")
        try:
            conf.merge_with_dotlist([override])
        except yaml.YAMLError as e:
            problem = ", ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
            raise DslmError(
                f"override {override!r}: the value is not valid YAML ({problem}); a list is "
                f"[a, b] and a mapping {{key: value}}, each closed"
            ) from None
    return conf


def merge(conf: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """`layer` (a recipe's or the overrides' values) over `conf`; DslmError naming `source` where
    OmegaConf cannot merge a mapping into a list field, or a list into a mapping."""
    try:
        return OmegaConf.merge(conf, layer)
    except TypeError as e:  # OmegaConf's "Cannot merge incompatible container types"
        raise DslmError(f"{source}: a mapping {{...}} given for a list field [...], or the reverse ({e})") from None


def fine_tuned_model(
    model: DictConfig, chosen: set[str], init_from: str, source_model: Callable[[str], ModelConfig]
) -> DictConfig:
    """The model of a run that starts from the weights at `init_from`: the source's
    (`source_model(init_from)`), every model.* field the recipe and overrides leave unset taken from
    it. Of the fields they set (`chosen`, with their values in `model`), model.dropout and a head
    bias the source lacks (an export folds it; it starts at zero) are kept; model.preset must be
    the source's where the source names one (an export names none); any other field must equal the
    source's. Raises DslmError naming the first that does not, with both values, or the source
    that cannot be read."""
    try:
        source = source_model(init_from)
    except DslmError as e:
        raise DslmError(f"train.init_from: {e}") from None
    for name in (f.name for f in fields(ModelConfig) if f.name in chosen):
        ours, theirs = model[name], getattr(source, name)
        if (
            ours == theirs
            or name == "dropout"
            or (name == "lm_head_bias" and ours)
            or (name == "preset" and not (ours and theirs))
        ):
            continue
        raise DslmError(
            f"model.{name}={ours} but train.init_from={init_from} has model.{name}={theirs}; leave "
            f"model.{name} out to fine-tune the source's model as it is"
        )
    kept = {name: model[name] for name in chosen & {"dropout", "lm_head_bias"}}
    return OmegaConf.merge(OmegaConf.structured(source), kept)


def schema() -> DictConfig:
    """RunConfig's defaults with the model sizes unset, so that ModelConfig takes from the preset
    the recipe or an override names every size neither of them sets."""
    conf = OmegaConf.structured(RunConfig)
    for name in SIZES:
        conf.model[name] = None
    return conf


def rename_old_keys(conf: DictConfig, source: str) -> None:
    """Move model.* keys that RENAMED_MODEL_KEYS lists to their new names, with a warning each."""
    model = conf.get("model")
    if not isinstance(model, DictConfig):
        return
    for old, new in RENAMED_MODEL_KEYS.items():
        if old not in model:
            continue
        if new in model:
            raise DslmError(f"{source} set both model.{old} and model.{new} (its new name); keep model.{new}")
        warning(f"{source}: model.{old} is now model.{new}; read as such")
        model[new] = model.pop(old)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig) -> Path:
    """Write the run's config.yaml (its DeepSpeed config as recorded_ds_config spells it)."""
    path = cfg.run_dir.config
    atomic_write_text(path, to_yaml(replace(cfg, ds_config=recorded_ds_config(cfg.ds_config))))
    return path


def check_against_manifest(cfg: RunConfig, manifest: Manifest) -> None:
    """Fail before training when the shards cannot feed this model."""
    if manifest.vocab_size > cfg.model.vocab_size:
        raise DslmError(
            f"the shards' tokenizer has {manifest.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size >= {manifest.vocab_size}"
        )
    if manifest.seq_len > cfg.model.block_size:
        raise DslmError(
            f"the shards hold sequences of {manifest.seq_len} tokens (seq_len) but model.block_size="
            f"{cfg.model.block_size}; rebuild the shards with --seq-len {cfg.model.block_size} or "
            f"raise model.block_size"
        )
    if manifest.masks and manifest.direction != cfg.data.direction:
        raise DslmError(
            f"the shards' loss masks were made for data.direction={manifest.direction} (template "
            f"{manifest.template}) but the run has data.direction={cfg.data.direction}; set it, or "
            f"rebuild them with `dslm-shard sft --direction {cfg.data.direction}`"
        )
    if "fim_exact_match" in cfg.train.evals and not manifest.fim:
        raise DslmError(
            "train.evals=fim_exact_match needs shards built with fill-in-the-middle (`dslm-shard build "
            "--fim-rate`); these were built without it: leave the metric out"
        )
    if manifest.fim and cfg.data.direction == "backward":
        raise DslmError(
            "the shards are built with fill-in-the-middle (--fim-rate), which lays documents out for a "
            "forward reader; a backward run (data.direction=backward) needs shards built without it"
        )


def packaged_ds_config(name: str = DEFAULT_DS_CONFIG) -> Path:
    """ds_configs/NAME as installed with dslm (the package dslm.ds_configs), whatever the working
    directory."""
    return Path(str(resources.files("dslm.ds_configs") / name))


def ds_config_path(given: str) -> str:
    """The absolute path of the DeepSpeed config `given` (ds_config, --deepspeed): the packaged
    zero2.json for ""; ds_configs/NAME, when the working directory has no such file (a command run
    outside the repository, a run written before the default was packaged), the packaged NAME."""
    if not given:
        return str(packaged_ds_config())
    path = Path(given)
    if path.parent == Path("ds_configs") and not path.exists() and packaged_ds_config(path.name).is_file():
        return str(packaged_ds_config(path.name))
    return os.path.abspath(given)


def recorded_ds_config(path: str) -> str:
    """How a run's config.yaml records the DeepSpeed config at `path`: ds_configs/NAME for the
    packaged config NAME (or spelled so), which ds_config_path finds in the package wherever dslm
    is installed, so the run resumes on another machine; else `path`."""
    packaged = packaged_ds_config(Path(path).name)
    if packaged.is_file() and (path == f"ds_configs/{packaged.name}" or packaged.samefile(path)):
        return f"ds_configs/{packaged.name}"
    return path


def outside_paths(cfg: RunConfig) -> dict[str, str]:
    """The paths a run's config names outside the run, by key (data.mix.I.shards for a mix's
    sources, train.eval_shards.I); unset ones ("") left out."""
    paths = {"data.shards": cfg.data.shards, "train.init_from": cfg.train.init_from, "ds_config": cfg.ds_config}
    paths |= {f"data.mix.{i}.shards": source.shards for i, source in enumerate(cfg.data.mix)}
    paths |= {f"train.eval_shards.{i}": shards for i, shards in enumerate(cfg.train.eval_shards)}
    return {key: path for key, path in paths.items() if path}


def with_outside_paths(cfg: RunConfig, paths: dict[str, str]) -> RunConfig:
    """`cfg` with the outside paths of `paths` (keys as outside_paths gives them) replaced."""
    mix = [
        replace(source, shards=paths.get(f"data.mix.{i}.shards", source.shards))
        for i, source in enumerate(cfg.data.mix)
    ]
    eval_shards = [paths.get(f"train.eval_shards.{i}", shards) for i, shards in enumerate(cfg.train.eval_shards)]
    return replace(
        cfg,
        ds_config=paths.get("ds_config", cfg.ds_config),
        data=replace(cfg.data, shards=paths.get("data.shards", cfg.data.shards), mix=mix),
        train=replace(cfg.train, init_from=paths.get("train.init_from", cfg.train.init_from), eval_shards=eval_shards),
    )


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with every outside path absolute (the default DeepSpeed config the packaged one),
    each spelling that differs kept in `given`, so that the run's config resolves from any working
    directory (a run records it so, save for recorded_ds_config)."""
    typed = outside_paths(cfg)
    absolute = {key: os.path.abspath(path) for key, path in typed.items()}  # ".." collapsed, links kept
    absolute["ds_config"] = ds_config_path(cfg.ds_config)
    given = {key: path for key, path in typed.items() if path != absolute[key]}
    return replace(with_outside_paths(cfg, absolute), given=given)


WARNED_RELATIVE: set[Path] = set()
"""The config files read_run_config has warned about in this process (once each)."""


def read_run_config(run: RunDir) -> RunConfig:
    """The config of the run directory `run`, found by its folder: its name and runs_dir are where
    it is now, whatever it was trained as. A run written before outside paths were recorded
    absolute has them read from the working directory, with one warning. Raises DslmError as
    load_config does."""
    cfg = load_config(run.config, [])
    relative = {
        key: path
        for key, path in outside_paths(cfg).items()
        if not Path(path).is_absolute() and not (key == "ds_config" and recorded_ds_config(path) == path)
    }
    if relative and run.config.absolute() not in WARNED_RELATIVE:
        WARNED_RELATIVE.add(run.config.absolute())
        warning(
            f"{run.config} records {', '.join(f'{k}={v}' for k, v in relative.items())} relative to the "
            f"directory it was trained in (a run written before dslm recorded them absolute); read from "
            f"{Path.cwd()}"
        )
    return cfg
