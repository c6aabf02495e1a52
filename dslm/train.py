"""Train a GPT with DeepSpeed: `deepspeed dslm/train.py --deepspeed ds_configs/zero2.json
[--config RECIPE] [key=value ...]`, or `dslm-train` with the same arguments under any launcher."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the dslm package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__" or Path(sys.argv[0]).name == "dslm-train":  # the program, not an import of it
    from dslm.signals import stop_during_imports, test_pause

    stop_during_imports()  # before torch's import, seconds long
    test_pause("imports")

import argparse
import json
import os
import signal

import torch
import torch.distributed as dist

from dslm.checkpoint.format import TrainState
from dslm.checkpoint.resume import Resume, fresh_state, mix_base, plan_resume
from dslm.checkpoint.save import Checkpointer
from dslm.checkpoint.weights import load_into, model_config_of, read_weights
from dslm.cli import ArgumentParser, run_command
from dslm.config import (
    Origin,
    RunConfig,
    absolute_paths,
    check_against_manifest,
    describe_config,
    load_config,
    save_config,
    to_yaml,
)
from dslm.data.loader import (
    DeviceBatches,
    ShardDamage,
    ShardSamples,
    TrainSamples,
    ensure_file_limit,
    train_loader,
    train_order,
)
from dslm.data.manifest import Manifest
from dslm.engine import (
    DistEnv,
    build_engine,
    describe,
    init_distributed,
    launched_ranks,
    load_ds_config,
    timed_out_collective,
    zero_stage,
)
from dslm.errors import BadShard, DslmError
from dslm.evals import BackgroundEvals, check_evals
from dslm.files import atomic_copy, atomic_write_text
from dslm.launcher import launch_ranks
from dslm.logs import LibraryOutput, info
from dslm.lora import add_adapters
from dslm.memory import estimate, free_memory, memory_problem
from dslm.metrics import Metrics
from dslm.mfu import device_peak_flops, flops_per_token
from dslm.model import GPT
from dslm.model_source import ModelSource, resolve_source
from dslm.objective import next_token
from dslm.optim import freeze
from dslm.signals import test_pause
from dslm.stop import StartupStop, Stop, StoppedAtStartup, StopSignal
from dslm.trainer import IntervalLog, TrainConfig, Trainer, Validation, freeze_patterns, validation_batches
from dslm_local.cli import counted
from dslm_local.errors import EXIT_BAD_DATA, EXIT_BAD_INPUT, EXIT_STOPPED, exit_statuses

OBJECTIVE = next_token
"""Every run's objective; the previous-token model is this one on reversed samples (data.direction)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--deepspeed",
        metavar="JSON",
        help="DeepSpeed config (sets ds_config; default: ds_configs/zero2.json as installed with dslm)",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe, e.g. launch/recipes/demo.yaml")
    p.add_argument(
        "--resume",
        metavar="auto|if-any|CHECKPOINT",
        default=None,
        help="auto: continue from the run's newest intact checkpoint (falling back to an older one "
        "with a warning), an error when there is none; if-any (what slurm/pretrain.sh and "
        "dslm-submit pass on a requeue): the same, or, with none, start fresh, removing tags "
        "never sealed and moving damaged ones into checkpoints/abandoned/; or a checkpoint "
        "folder. Without it, a run directory that already holds checkpoints is an error. "
        f"Exit statuses: {exit_statuses()}",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="start N ranks on this machine (CPU ranks, or one per GPU) and pass them the stop signals: "
        "SIGTERM to the process group or Ctrl-C stops them at the next step boundary after a "
        "checkpoint (exit 75), a second Ctrl-C at once. Leave it out under a launcher that starts "
        "the ranks (deepspeed, torchrun, srun)",
    )
    p.add_argument(
        "--print-run-dir",
        action="store_true",
        help="print the run directory these arguments resolve to and exit (slurm/pretrain.sh logs there)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print what DeepSpeed, torch and the tools they run print, "
        "as they print it (without it, each rank's goes to "
        "RUN_DIR/logs/rankR.log)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument(
        "--help-config",
        nargs="?",
        const="",
        metavar="SECTION",
        help="print every config key (or those of SECTION: model, data, train, train.lora, ...) with "
        "its type, default and meaning, and exit",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides on top of the recipe, e.g. train.max_steps=200 model.preset=tiny "
        "(the keys: dslm-train --help-config)",
    )
    return p.parse_intermixed_args(argv)  # options may follow the overrides


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run's config from --config, the overrides and --deepspeed, its outside paths absolute
    (dslm.config.absolute_paths); a fine-tune's model is its train.init_from source's
    (dslm.config.fine_tuned_model), read before anything is built."""
    overrides = list(args.overrides) + ([f"ds_config={args.deepspeed}"] if args.deepspeed else [])
    return absolute_paths(load_config(args.config, overrides, source_model=model_config_of))


def launch(args: argparse.Namespace, argv: list[str]) -> None:
    """--nproc-per-node: the ranks, once the arguments are known to be good (dslm.launcher)."""
    cfg = resolve_config(args)
    if args.print_run_dir:
        print(cfg.run_dir.path.resolve())
        return
    check_nproc(args.nproc_per_node)
    launch_ranks(argv, args.nproc_per_node)


def run(args: argparse.Namespace, output: LibraryOutput) -> None:
    cfg = resolve_config(args)
    if args.print_run_dir:
        print(cfg.run_dir.path.resolve())
        return
    stop = StopSignal()  # from here on, a stop signal ends the start-up at once, and training at a step boundary
    output.keep_in(cfg.run_dir.rank_log(int(os.environ.get("RANK", 0))))
    manifests = load_sources(cfg)
    check_evals(cfg.train.evals)
    check_sizes(cfg, manifests)  # before the process group, DeepSpeed's op build and the model exist
    ensure_file_limit(cfg.data, held_batches=cfg.train.grad_accum + 1)  # so too: gloo's store retries on EMFILE
    states: list[TrainState] = []  # the run's state once it exists: a timed-out collective names its step
    try:
        try:
            env = init_distributed(cfg.train.collective_timeout_s)
            stopped = train(args, cfg, env, manifests, stop, states)
        except RuntimeError as e:
            if failure := timed_out_collective(e, states[0].step if states else None, cfg.train.collective_timeout_s):
                raise failure from e
            raise
    except StartupStop as e:  # every rank got it (the peer a rank waited for may have ended first): one line, rank 0's
        raise (StoppedAtStartup(e.signum) if os.environ.get("RANK", "0") == "0" else SystemExit(EXIT_STOPPED)) from None
    report(cfg, output.path)
    dist.destroy_process_group()
    if stopped:
        raise stop_exit(stopped, env, cfg)


def stop_exit(stopped: Stop, env: DistEnv, cfg: RunConfig) -> Exception:
    """What ends a run that stopped early: on rank 0, DslmError naming the loader's failure (exit
    status 2), BadShard naming the damaged shards (65), or SystemExit(75) after a line on the
    signal; on the other ranks a quiet exit with the same status."""
    if stopped.failed:
        if env.rank != 0:
            return SystemExit(EXIT_BAD_INPUT)
        where = (
            f"at step {stopped.step} after a checkpoint ({cfg.run_dir.tag(stopped.step)}): continue with --resume auto"
            if stopped.step
            else "before its first step (no new checkpoint)"
        )
        return DslmError(f"{'; '.join(stopped.failed)}. The run stopped {where}")
    if stopped.damaged:
        if env.rank != 0:
            return SystemExit(EXIT_BAD_DATA)
        if stopped.step:
            where = f"at step {stopped.step} after a checkpoint ({cfg.run_dir.tag(stopped.step)})"
            then = "continue with --resume auto"
        else:
            where, then = "before its first step (no checkpoint)", "run the same command again"
        return BadShard(
            f"{'; '.join(stopped.damaged)}. The run stopped {where}: rebuild the shard, then {then} (or "
            f"set data.on_bad_shard=skip)"
        )
    info(
        f"stopped at step {stopped.step} on {signal.Signals(stopped.signal).name} after a checkpoint; continue "
        f"with --resume auto"
    )
    return SystemExit(EXIT_STOPPED)


def check_nproc(nproc: int) -> None:
    """--nproc-per-node: at least 1, at most one rank per GPU (per core without one)."""
    if nproc < 1:
        raise DslmError(f"--nproc-per-node={nproc} must be at least 1")
    gpus = torch.cuda.device_count()
    most, of = (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores")
    if nproc > most:
        raise DslmError(f"--nproc-per-node={nproc} is more ranks than this machine's {most} {of}")
    if "RANK" in os.environ:
        raise DslmError(
            "--nproc-per-node starts the ranks itself: leave it out under a launcher that sets RANK "
            "(deepspeed, torchrun, srun)"
        )


def train(
    args: argparse.Namespace,
    cfg: RunConfig,
    env: DistEnv,
    manifests: list[Manifest],
    stop: StopSignal,
    states: list[TrainState],
) -> Stop | None:
    """Build the run on the shards of `manifests` (load_sources) and train it; returns None, or
    why it stopped early (Trainer.fit). The run's state is appended to `states` as soon as it exists."""
    manifest = manifests[cfg.data.shards_source()]
    samples = TrainSamples(cfg.data, manifests)
    ensure_file_limit(cfg.data, held_batches=cfg.train.grad_accum + 1)  # for validation's reads; again for the loader
    validation = build_validation(cfg, manifest)
    ds_config = load_ds_config(cfg.ds_config, cfg.train, env.world_size)
    resume = plan_resume(args.resume, cfg, manifests, env, zero_stage(ds_config))
    model = build_model(cfg)
    cfg.origin = initial_weights(cfg, resume, model, manifest)
    add_adapters(model, cfg.train.lora)  # train.lora: around the initial weights; a resume loads its own adapters
    frozen = freeze_parameters(model, cfg)
    mfu_per_token = mfu_scale(model, manifest.seq_len, env.world_size)  # before ZeRO-3 partitions the weights
    test_pause("start-up")
    engine = build_engine(model, cfg.train, ds_config, load_universal=resume is not None and resume.load_universal)
    info(describe(engine, env.world_size))
    state = (
        resume.load(engine, env, cfg.train.seed) if resume else fresh_state(env.world_size, cfg.data, manifests, frozen)
    )
    states.append(state)
    save_run_config(
        cfg, env, manifest, ds_config
    )  # only now: a refused or failed start leaves the run's config.yaml as it was
    trainer = build_trainer(cfg, env, samples, manifests, engine, state, stop, validation, mfu_per_token)
    stop.start()  # from here on, a stop signal ends the run at the next step boundary with a checkpoint
    stopped = trainer.fit(state)
    trainer.metrics.close()
    return stopped


def load_sources(cfg: RunConfig) -> list[Manifest]:
    """The manifest of each folder the training samples come from (DataConfig.sources), checked
    against the model and against the folder's tokenizer.json (Manifest.tokenizer_file); with
    data.mix, also against the first: one tokenizer, one seq_len; and train.eval_shards against them
    (check_eval_shards)."""
    manifests = []
    for _, source in cfg.data.sources():
        if not Path(source.shards).is_dir():
            raise DslmError(
                f"the shards folder {source.shards} does not exist: build it with `dslm-shard build`, or, if the "
                f"shards moved (a moved or copied run), name where they are now (data.shards=PATH)"
            )
        manifests.append(Manifest.load(source.shards))
        manifests[-1].tokenizer_file(source.shards)  # what eval and export will read the run's ids with
        check_against_manifest(cfg, manifests[-1])
    first = cfg.data.sources()[0][1].shards
    for (_, source), manifest in zip(cfg.data.sources()[1:], manifests[1:]):
        if manifest.tokenizer_sha256 != manifests[0].tokenizer_sha256:
            raise DslmError(
                f"data.mix: {source.shards} was built with another tokenizer than {first} (sha256 "
                f"{manifest.tokenizer_sha256[:12]} vs {manifests[0].tokenizer_sha256[:12]}); build every "
                f"source with the same `dslm-shard build --tokenizer`"
            )
        if manifest.seq_len != manifests[0].seq_len:
            raise DslmError(
                f"data.mix: {source.shards} holds samples of seq_len {manifest.seq_len}, {first} of "
                f"{manifests[0].seq_len}; build every source with the same --seq-len"
            )
    check_eval_shards(cfg.train.eval_shards, manifests[0])
    return manifests


def check_eval_shards(folders: list[str], manifest: Manifest) -> None:
    """DslmError when a folder of train.eval_shards is not shards with a val split, tokenized with
    the tokenizer of the run's (`manifest`)."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise DslmError(f"train.eval_shards: {folder} does not exist; name shard folders built by dslm-shard")
        other = Manifest.load(folder)
        if other.tokenizer_sha256 != manifest.tokenizer_sha256:
            raise DslmError(
                f"train.eval_shards: {folder} was built with another tokenizer than the run's shards; build it "
                f"with theirs (`dslm-shard build --tokenizer`)"
            )
        if not other.split("val"):
            raise DslmError(f"train.eval_shards: {folder} has no val split to measure perplexity on")


def check_sizes(cfg: RunConfig, manifests: list[Manifest]) -> None:
    """DslmError when a step would take more samples than the train split holds (check_step_samples)
    or the run cannot fit in the memory of this machine or its GPU (dslm.memory), from the config and
    the manifests alone. Each rank decides alone, before the process group exists, on the same
    figures but for what its machine and GPU have free; a rank that stops ends the launch."""
    world_size, local_ranks, local_rank = launched_ranks()
    check_step_samples(cfg.train, sum(e.samples for m in manifests for e in m.split("train")), world_size)
    ds_config = load_ds_config(cfg.ds_config, cfg.train, world_size)
    manifest = manifests[cfg.data.shards_source()]
    val = sum(entry.samples for entry in manifest.split("val")) if cfg.train.val_interval else 0
    need = estimate(
        cfg.model,
        cfg.train,
        cfg.data,
        ds_config,
        zero_stage(ds_config),
        world_size,
        manifest.seq_len,
        validation_batches(val, cfg.train.micro_batch_size, world_size, cfg.train.val_batches),
    )
    device_free = free_memory(torch.device("cuda", local_rank)) if torch.cuda.is_available() else None
    if problem := memory_problem(need, local_ranks, device_free):
        raise DslmError(problem)


def check_step_samples(train: TrainConfig, samples: int, world_size: int) -> None:
    """DslmError when one micro-step of every rank, or one optimizer step, would take more samples
    than the train split's `samples`: each would hold some sample twice, which a smaller batch
    trains alike, faster (and a step of train.grad_accum=10**9 micro-batches would never end)."""
    micro_step = train.micro_batch_size * world_size
    if micro_step > samples:
        raise DslmError(
            f"train.micro_batch_size={train.micro_batch_size} on {counted(world_size, 'rank')} takes "
            f"{micro_step:,} samples per micro-step, more than the {samples:,} of the train split; set it "
            f"to at most {max(1, samples // world_size):,}"
        )
    if micro_step * train.grad_accum > samples:
        raise DslmError(
            f"train.grad_accum={train.grad_accum} micro-batches of {micro_step:,} samples "
            f"({counted(world_size, 'rank')}) make a step of {micro_step * train.grad_accum:,} samples, "
            f"more than the {samples:,} of the train split; set it to at most {samples // micro_step:,}"
        )


def build_validation(cfg: RunConfig, manifest: Manifest) -> Validation | None:
    """Validation on the val split, or None when train.val_interval=0; a DslmError when the
    split is missing or too small for a micro-batch on every rank, BadShard when one of its shards
    does not match the manifest."""
    if not cfg.train.val_interval:
        return None
    if not manifest.split("val"):
        raise DslmError(
            f"{cfg.data.shards} has no val split for train.val_interval={cfg.train.val_interval}; "
            f"(built with --val-fraction 0, or too few documents for one val sample); set "
            f"train.val_interval=0, or rebuild the shards with a larger --val-fraction"
        )
    samples = ShardSamples(
        cfg.data.shards, manifest, "val", cfg.data.direction, cfg.data.max_open_shards, cfg.data.verify
    )
    samples.check_all()  # now: a damaged val shard found inside a validation would leave the other ranks waiting
    return Validation(samples, OBJECTIVE, cfg.train.micro_batch_size, cfg.train.val_batches)


def save_run_config(cfg: RunConfig, env: DistEnv, manifest: Manifest, ds_config: dict) -> None:
    """Print the resolved config and save it as the run's config.yaml, with what the run needs to be
    read anywhere (dslm.run_dir): the shards' tokenizer, its sha256 checked against the manifest's,
    the resolved DeepSpeed config and the shards' template (rank 0)."""
    if env.rank != 0:
        return
    cfg.template, cfg.fim = manifest.template, bool(manifest.fim)
    print(to_yaml(cfg), flush=True)
    atomic_copy(manifest.tokenizer_file(cfg.data.shards), cfg.run_dir.tokenizer)
    atomic_write_text(cfg.run_dir.ds_config, json.dumps(ds_config, indent=2) + "\n")
    save_config(cfg)


def build_model(cfg: RunConfig) -> GPT:
    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model)


def initial_weights(cfg: RunConfig, resume: Resume | None, model: GPT, manifest: Manifest) -> Origin:
    """The run's origin. A resumed run keeps its own (its checkpoint's weights load later);
    otherwise `train.init_from` names the weights to copy into `model` now."""
    if resume is not None:
        if cfg.train.init_from:
            info(f"train.init_from={cfg.train.init_from} is ignored: --resume continues the run from {resume.tag_dir}")
        return resume.origin
    if not cfg.train.init_from:
        return Origin()
    check_init_source(resolve_source(cfg.train.init_from), cfg, manifest)
    _, weights, origin = read_weights(cfg.train.init_from)
    load_into(model, weights, origin.path)
    info(f"initialized from {origin.path} (step {origin.step}, weights sha256 {origin.sha256})")
    return origin


def check_init_source(source: ModelSource, cfg: RunConfig, manifest: Manifest) -> None:
    """The weights of `source` suit the run's shards: DslmError when they were trained with
    another tokenizer (their token ids would mean other text); a note when that cannot be known,
    or when they were trained in the other direction (rank 0)."""
    source.need_weights()
    tokenizers = source.tokenizer_sha256s()
    if tokenizers and manifest.tokenizer_sha256 not in tokenizers:
        raise DslmError(
            f"train.init_from={source.path} was trained with another tokenizer than the one of "
            f"{cfg.data.shards}; build the shards with the base model's (--tokenizer)"
        )
    if not tokenizers:
        info(
            f"note: the shards {source.path} was trained on are gone, so its tokenizer cannot be checked against "
            f"{cfg.data.shards}'s"
        )
    if (direction := source.framing().direction) != cfg.data.direction:
        info(f"note: {source.path} was trained {direction}; this run reads {cfg.data.direction} (data.direction)")


def freeze_parameters(model: GPT, cfg: RunConfig) -> list[str]:
    """Freeze what train.freeze and train.freeze_blocks name, on top of what train.lora froze;
    print what trains (rank 0). Returns the names of all frozen parameters."""
    freeze(model, freeze_patterns(cfg.train))
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters = f"; LoRA adapters of rank {cfg.train.lora.rank}" if cfg.train.lora.rank else ""
        info(f"trainable parameters: {trainable:,} of {model.num_params():,} ({len(frozen)} tensors frozen{adapters})")
    return frozen


def build_trainer(
    cfg: RunConfig,
    env: DistEnv,
    samples: TrainSamples,
    manifests: list[Manifest],
    engine,
    state: TrainState,
    stop: StopSignal,
    validation: Validation | None,
    mfu_per_token: float | None,
) -> Trainer:
    """The loop and its collaborators, reading `samples` on from `state`: batches, checkpoints, metrics."""
    train = cfg.train
    order = train_order(cfg.data, manifests, train.seed, mix_base(state))
    ensure_file_limit(cfg.data, held_batches=train.grad_accum + 1)  # counting what the run holds open by now
    loader = train_loader(
        cfg.data, samples, order, env.rank, env.world_size, train.micro_batch_size, start=state.samples
    )
    global_batch = train.micro_batch_size * train.grad_accum * env.world_size
    # purge_step: events a killed run (or a fresh start's failed attempt) wrote after the checkpoint
    # are dropped, so each step appears once
    metrics = Metrics(
        cfg.run_dir.tb, enabled=env.rank == 0, purge_step=state.step + 1, csv_path=cfg.run_dir.metrics_csv
    )
    return Trainer(
        cfg=train,
        engine=engine,
        batches=DeviceBatches(iter(loader), engine.device),
        objective=OBJECTIVE,
        checkpointer=Checkpointer(cfg.run_dir.checkpoints, train.keep_last),
        metrics=metrics,
        stop=stop,
        validation=validation,
        damage=ShardDamage(samples, cfg.data.on_bad_shard),
        interval=IntervalLog(
            engine,
            global_batch,
            samples.seq_len,
            mfu_per_token,
            samples.names,
            order.interleave,
            count_skipped=cfg.data.on_bad_shard == "skip",
        ),
        evals=background_evals(cfg, metrics) if env.rank == 0 else None,
    )


def background_evals(cfg: RunConfig, metrics: Metrics) -> BackgroundEvals | None:
    """train.evals and train.eval_shards on each checkpoint, their scalars into metrics.csv (None
    when neither is set)."""
    train = cfg.train
    if not train.evals and not train.eval_shards:
        return None
    return BackgroundEvals(
        cfg.run_dir,
        train.evals,
        train.eval_shards,
        train.eval_args,
        train.eval_device,
        train.eval_timeout_s,
        on_result=metrics.merge_into_csv,
    )


def mfu_scale(model: GPT, seq_len: int, world_size: int) -> float | None:
    """MFU per global token/s: FLOPs per token over the peak of all ranks' GPUs (None off a known GPU)."""
    peak = device_peak_flops()
    return None if peak is None else flops_per_token(model, seq_len) / (peak * world_size)


def report(cfg: RunConfig, log: Path | None) -> None:
    """Where the run's files are (rank 0); `log` is rank 0's log of the libraries' output (None with --verbose)."""
    run = cfg.run_dir
    lines = [f"run directory: {run.path}", f"  config:      {run.config}", f"  checkpoints: {run.checkpoints}"]
    if log is not None:
        lines.append(f"  logs:        {log.parent} (what DeepSpeed and torch printed, a file per rank)")
    lines.append(f"  tensorboard: tensorboard --logdir {run.tb}")
    info("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.help_config is not None:
        run_command("dslm-train", lambda: print(describe_config(args.help_config)))
        return
    if args.nproc_per_node is not None:  # the launcher: each rank sets up its own output
        run_command("dslm-train", lambda: launch(args, argv))
        return
    with LibraryOutput("dslm-train", args.verbose) as output:
        run_command("dslm-train", lambda: run(args, output), report=output.report)


if __name__ == "__main__":
    main()
