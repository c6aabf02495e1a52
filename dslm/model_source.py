"""What a path given to dslm-eval, dslm-generate, dslm-export or `train.init_from` is: one resolver
for every command.

A model source is one of
  tag   a checkpoint runs/NAME/checkpoints/global_stepN (any ZeRO stage)
  run   a run directory runs/NAME (which of its checkpoints depends on the command: `newest_tag`
        for eval and generate, `chosen_tag` for export and init_from)
  hf    a `dslm-export` folder (model.safetensors, config.json, tokenizer.json)
  onnx  a `dslm-export --format onnx` folder (model.onnx, config.json, tokenizer.json): what
        dslm-complete runs; it has no torch weights.
  gguf  a `dslm-export --format gguf` folder (model-TYPE.gguf, config.json, tokenizer.json): what
        llama.cpp runs; it has no torch weights.
Each gives its tokenizer, its framing (direction, template) and, for a tag or run, its run's
config, without its shards: a run carries its tokenizer (dslm.run_dir). The shards are needed only
for perplexity on them (`shards`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dslm.checkpoint.format import BEST_NAME, LATEST_NAME, newest_resumable, seal_problem
from dslm.config import RunConfig, read_run_config
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.data.templates import Framing
from dslm.errors import DslmError
from dslm.files import sha256_file
from dslm.hf import export_tokenizer_sha256, framing_from_hf
from dslm.run_dir import RunDir, run_of_export, run_of_tag

HF_FILES = ("model.safetensors", "config.json", "tokenizer.json")
ONNX_FILES = ("model.onnx", "config.json", "tokenizer.json")
GGUF_FILES = ("model-*.gguf", "config.json", "tokenizer.json")
EXPORT_FILES = {"hf": HF_FILES, "onnx": ONNX_FILES, "gguf": GGUF_FILES}
"""The files (glob patterns) that make a folder an export of each kind."""


def holds(folder: Path, patterns: tuple[str, ...]) -> bool:
    """Whether `folder` holds a file matching each of `patterns` (glob patterns)."""
    return all(any(p.is_file() for p in folder.glob(pattern)) for pattern in patterns)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source (resolve_source)."""

    path: Path
    """As given."""
    kind: str
    """"tag", "run", "hf", "onnx" or "gguf"."""
    run: RunDir | None
    """The run the weights come from: the run itself, a tag's run, an export's at its default place
    (runs/NAME/export/stepN); None for an export elsewhere."""
    step: int | None
    """A tag's step, or an export's at its default place; None for a run or an export elsewhere."""

    @cached_property
    def run_config(self) -> RunConfig:
        """The config of the run the weights come from. Raises DslmError for a source without one."""
        if self.run is None:
            raise DslmError(f"{self.path} is not in a run directory")
        return read_run_config(self.run)

    @property
    def is_export(self) -> bool:
        return self.kind in EXPORT_FILES

    def newest_tag(self) -> Path:
        """A tag, or a run's newest sealed, intact tag. Raises DslmError for a run without one."""
        if self.kind == "tag":
            return self.path
        self.need_checkpoints()
        tag_dir, _ = newest_resumable(self.run.checkpoints)
        if tag_dir is None:
            raise DslmError(f"{self.path} holds no sealed, intact checkpoint")
        return tag_dir

    def chosen_tag(self) -> Path:
        """A tag, or what a run is taken as (export, init_from): the tag `best` names (lowest
        val/loss), else the one `latest` names, else the newest intact one; each only when
        sealed and intact."""
        if self.kind == "tag":
            return self.path
        self.need_checkpoints()
        for pointer in (self.run.checkpoints / BEST_NAME, self.run.checkpoints / LATEST_NAME):
            if (
                pointer.is_file()
                and seal_problem(tag_dir := self.run.checkpoints / pointer.read_text().strip()) is None
            ):
                return tag_dir
        return self.newest_tag()

    def need_weights(self) -> None:
        """DslmError for an ONNX or GGUF export: no torch command can read its graph or file."""
        without = {"onnx": ("an ONNX", "dslm-complete"), "gguf": ("a GGUF", "llama.cpp")}.get(self.kind)
        if without is not None:
            what, runner = without
            raise DslmError(
                f"{self.path} is {what} export, which holds no torch weights: {runner} runs it; use its "
                f"checkpoint, run or HF export here"
            )

    def need_checkpoints(self) -> None:
        if self.kind not in ("tag", "run"):
            raise DslmError(f"{self.path} is an export folder, not a checkpoint or a run directory")

    def tokenizer_file(self) -> Path:
        """The tokenizer.json the model reads text with: an export's own, or the copy its run carries
        (a run written before runs carried one: its shards' tokenizer, checked against their
        manifest). Raises DslmError when neither is there."""
        if self.is_export:
            return self.path / "tokenizer.json"
        if self.run.tokenizer.is_file():
            return self.run.tokenizer
        return self.legacy_manifest().tokenizer_file(self.run_config.data.shards)

    def framing(self) -> Framing:
        """How the model reads its input: what an export's config.json records, or its run's
        data.direction and its shards' template."""
        if self.is_export:
            return framing_from_hf(json.loads((self.path / "config.json").read_text()), self.path / "config.json")
        cfg = self.run_config
        if self.run.tokenizer.is_file():
            return Framing(cfg.data.direction, cfg.template, cfg.fim)
        shards = Path(cfg.data.shards)  # a run written before it recorded its template: its shards', if they are there
        return Framing(cfg.data.direction, Manifest.load(shards).template if (shards / MANIFEST_NAME).is_file() else "")

    def tokenizer_sha256s(self) -> set[str]:
        """The sha256s that name the tokenizer the model was trained with: an export's record of it
        (dslm.hf.export_tokenizer_sha256) and its own tokenizer.json, which shards built with
        `--tokenizer EXPORT/tokenizer.json` record; a run's copy (its shards' sha256). Empty for a
        run written before runs carried their tokenizer, whose shards are gone."""
        if self.is_export:
            return {export_tokenizer_sha256(self.path), sha256_file(self.path / "tokenizer.json")}
        if self.run.tokenizer.is_file():
            return {sha256_file(self.run.tokenizer)}
        shards = Path(self.run_config.data.shards)
        return {Manifest.load(shards).tokenizer_sha256} if (shards / MANIFEST_NAME).is_file() else set()

    def shards(self, given: Path | None = None) -> Path:
        """The shard folder to read val samples from: `given` (--shards), else the run's data.shards.
        Raises DslmError when there is neither, or the run's is not there (the run was moved or
        copied without it), naming the path and --shards."""
        if given is not None:
            return given
        if self.run is None:
            raise DslmError(f"{self.path} is not in a run: name the shards to evaluate on with --shards")
        shards = Path(self.run_config.data.shards)
        if not (shards / MANIFEST_NAME).is_file():
            raise DslmError(
                f"the run's shards {shards} (data.shards in {self.run.config}) are not there, and the "
                f"metrics read their val split: point at a copy with --shards DIR"
            )
        return shards

    def legacy_manifest(self) -> Manifest:
        shards = Path(self.run_config.data.shards)
        if not (shards / MANIFEST_NAME).is_file():
            raise DslmError(
                f"{self.run.path} has no tokenizer.json (written before runs carried their tokenizer) and its "
                f"shards {shards} (data.shards in {self.run.config}) are not there: put them back"
            )
        return Manifest.load(shards)


def resolve_source(path: str | Path) -> ModelSource:
    """What `path` is (see the module's docstring). Raises DslmError for a path that does not exist
    or is none of them."""
    path = Path(path)
    if not path.exists():
        raise DslmError(f"{path} does not exist")
    for kind, files in EXPORT_FILES.items():
        if holds(path, files):
            run, step = run_of_export(path) or (None, None)
            return ModelSource(path, kind, run, step)
    if (run := RunDir.at(path)) is not None:
        return ModelSource(path, "run", run, None)
    if (found := run_of_tag(path)) is not None:
        return ModelSource(path, "tag", *found)
    raise DslmError(
        f"{path} is not a checkpoint (runs/NAME/checkpoints/global_stepN), a run directory or an export "
        f"folder ({', '.join(HF_FILES)})"
    )
