"""Continuing a run from a checkpoint: which tag (`--resume auto` or a path), whether the run
may continue from it (sealed, checksums intact, every file safe to load, the same shards), the
branch it starts (later tags moved aside), the form DeepSpeed loads it in (the tag itself, or
DeepSpeed's universal form on another world size when ZeRO split its optimizer state over the
ranks), and loading it into the engine with each rank's RNG, and with the tensors DeepSpeed's
universal load leaves out (those its optimizer does not hold). Saving and the tag format are
dslm.checkpoint.

Rank 0 alone reads and checks the files; the other ranks take its answer (`on_rank0`), so a
refusal reaches every rank instead of leaving them waiting at a barrier.

The order in dslm.train: `plan_resume` before the engine exists (its `load_universal` is an
argument of dslm.engine.build_engine), `Resume.load` once the engine is built.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from dslm.checkpoint.format import (
    ABANDONED_NAME,
    BEST_NAME,
    LATEST_NAME,
    TrainState,
    check_loads_safely,
    list_checkpoints,
    load_rng_state,
    load_weights_only,
    newest_resumable,
    resume_problem,
    rng_file,
    sealed_state,
    set_rng_state,
    set_seeds,
    universal_dir,
    written_ds_config,
)
from dslm.checkpoint.save import fresh_folder, set_aside, start_branch
from dslm.config import Origin, RunConfig, read_run_config
from dslm.data.loader import DataConfig
from dslm.data.manifest import Manifest
from dslm.data.mix import Interleave, MixBase
from dslm.engine import DistEnv, zero_stage
from dslm.errors import DslmError
from dslm.files import atomic_path
from dslm.logs import info, libraries, library_stream, warning
from dslm.model import SIZES
from dslm.optim import apply_schedule
from dslm.run_dir import run_of_tag
from dslm_local.cli import counted

T = TypeVar("T")


@dataclass
class Resume:
    """A sealed, intact checkpoint of this run's shards, and how DeepSpeed loads it."""

    tag_dir: Path
    """The tag the run continues from."""
    state: TrainState
    """Where the run stood at that tag, as sealed."""
    load_from: Path
    """What DeepSpeed loads: the tag itself, or its universal form when the world size changed and
    the tag's optimizer state is partitioned over its ranks (ZeRO-1/2/3)."""
    origin: Origin
    """Where the run's initial weights came from (its config.yaml), kept by the resumed run."""

    @property
    def load_universal(self) -> bool:
        """Whether DeepSpeed loads the universal form (its engine must be built for that)."""
        return self.load_from != self.tag_dir

    def load(self, engine, env: DistEnv, seed: int) -> TrainState:
        """Load DeepSpeed's state and this rank's RNG into `engine`; the state to continue from.
        From the universal form, DeepSpeed restores only the parameters its optimizer holds: the
        module's other tensors (frozen parameters, LoRA's base weights) are loaded here
        (load_untrained). On another world size the RNG streams are new, seeded from `seed`, the
        step and the rank. The files were checked by plan_resume (resume_problem, and
        check_loads_safely for the universal form); the RNG file is read with the same
        weights-only rule. The learning rate of the next step is this run's schedule's (apply_schedule),
        whose max_steps may differ from the checkpointed run's. Raises DslmError when DeepSpeed loads
        nothing."""
        with libraries():
            path, _ = engine.load_checkpoint(str(self.load_from.parent), tag=self.load_from.name)
        if path is None:
            raise DslmError(f"DeepSpeed could not load {self.load_from}")
        if self.load_universal:
            load_untrained(engine.module, self.load_from)
        apply_schedule(engine.lr_scheduler)  # this run's schedule (max_steps, decay) from the next step on
        if self.state.world_size == env.world_size:
            set_rng_state(load_rng_state(self.tag_dir / rng_file(env.rank)))
        else:
            set_seeds(seed * 1_000_003 + self.state.step * 1_009 + env.rank)
        global_batch = engine.train_batch_size()
        info(self.describe(global_batch, engine.train_micro_batch_size_per_gpu() * env.world_size, env.world_size))
        return dataclasses.replace(self.state, world_size=env.world_size, global_batch=global_batch)

    def describe(self, global_batch: int, per_accumulation: int, world_size: int) -> str:
        """What the resume says: where from, and what changed since the tag was written."""
        lines = [f"resumed from {self.tag_dir} at step {self.state.step} ({self.state.samples:,} samples read)"]
        note = batch_note(recorded_batch(self.state), global_batch, per_accumulation)
        if self.state.world_size != world_size:
            through = (
                f"through {self.load_from.name}" if self.load_universal else "each rank reads the whole ZeRO-0 state"
            )
            lines.append(f"  on {counted(world_size, 'rank')} instead of {self.state.world_size} ({through}): {note}")
        elif self.load_universal:
            lines.append(f"  at another ZeRO stage than the checkpoint's (through {self.load_from.name}): {note}")
        elif recorded_batch(self.state) not in (0, global_batch):
            lines.append(f"  {note}")
        return "\n".join(lines)


def recorded_batch(state: TrainState) -> int:
    """The global batch (samples per step) of the run that wrote a tag: as recorded, or for a tag
    from before dslm recorded it, samples / step when that divides evenly; else 0 (unknown)."""
    if state.global_batch or not state.step or state.samples % state.step:
        return state.global_batch
    return state.samples // state.step


def batch_note(old: int, new: int, per_accumulation: int) -> str:
    """How a resumed run's global batch `new` compares with its checkpoint's `old` (samples per
    step; 0: unknown), and the train.grad_accum that keeps it, given the samples of one
    accumulation step on all ranks (`per_accumulation`: micro-batch x ranks)."""
    if not old:
        return f"the global batch is {new} samples (the checkpoint does not record what it was)"
    if old == new:
        return f"the global batch stays {new} samples"
    keep = f"; train.grad_accum={old // per_accumulation} keeps it" if old % per_accumulation == 0 else ""
    return f"the global batch is now {new} samples, was {old} (x{Fraction(new, old)}){keep}"


def plan_resume(
    resume: str | None, cfg: RunConfig, manifests: list[Manifest], env: DistEnv, stage: int
) -> Resume | None:
    """Collective. What `--resume` (None, "auto", "if-any" or a tag folder) continues from in the run's
    checkpoint folder, in the form this world size and ZeRO `stage` load (load_form);
    None for a fresh run. Raises DslmError when nothing loadable exists, when a fresh run would mix
    with existing checkpoints, or when the shards (`manifests`, one per DataConfig.sources), the
    model, the optimizer settings or the ZeRO layout (ZERO_LAYOUTS) are not those the checkpoint
    holds. Once they are, the tag starts the run's live branch (checkpoint.start_branch, rank 0)."""
    tag_dir = on_rank0(lambda: find_resume(resume, cfg.run_dir.checkpoints))
    if tag_dir is None:
        return None
    state = continue_data(sealed_state(tag_dir), cfg.data, manifests, env)
    saved = saved_config(tag_dir)
    if saved is not None:
        check_same_settings(cfg, *saved)
    load_from = load_form(tag_dir, state.world_size, env.world_size, stage)
    if env.rank == 0:
        for line in start_branch(cfg.run_dir.checkpoints, tag_dir):
            print(line, flush=True)
    return Resume(tag_dir, state, load_from, saved[1].origin if saved else Origin())


def on_rank0(work: Callable[[], T]) -> T:
    """Collective: `work` runs on rank 0 alone; every rank returns its (picklable) result, or
    raises the DslmError it raised."""
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box = [work(), None]
        except DslmError as e:
            box = [None, str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise DslmError(box[1])
    return box[0]


def find_resume(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint to resume from (checkpoint.resume_problem says it can be): None for a fresh
    run; for "auto", newest_resumable in `folder` (a warning for each tag passed over); for
    "if-any" (what the wrappers pass on a requeue) the same, or a fresh start when there is none
    (clear_for_fresh_start); else the tag folder `resume` names, which must be one of this run's
    (in `folder`). Raises DslmError when resuming is asked for and nothing loadable exists, for a
    path that is not a tag of this run, or when a fresh run would mix with existing checkpoints."""
    if resume is None:
        if list_checkpoints(folder):
            raise DslmError(
                f"{folder} already holds checkpoints: pass --resume auto to continue the run, or choose another name="
            )
        return None
    if resume not in ("auto", "if-any"):
        tag_dir = Path(resume)
        if not tag_dir.is_dir():
            raise DslmError(f"--resume {resume}: no such checkpoint (auto, if-any, or a tag folder of this run)")
        if tag_dir.resolve().parent != folder.resolve():
            raise DslmError(
                f"--resume {resume} is not a checkpoint of this run (its tags are in {folder}); to start a "
                f"new run from its weights, pass train.init_from={resume}"
            )
        if (problem := resume_problem(tag_dir)) is not None:
            raise DslmError(f"cannot resume from {tag_dir}: {problem}")
        return tag_dir
    tag_dir, skipped = newest_resumable(folder)
    for line in skipped:
        warning(line)
    if tag_dir is None and resume == "if-any":
        for line in clear_for_fresh_start(folder):
            warning(line)
        print(f"--resume if-any: no intact checkpoint in {folder}: starting fresh at step 0", flush=True)
    elif tag_dir is None:
        raise DslmError(f"--resume auto: no intact checkpoint in {folder}")
    return tag_dir


def clear_for_fresh_start(folder: Path) -> list[str]:
    """Make way for a fresh run in `folder`, which holds no tag to continue from: tags never sealed
    are removed (partial saves), sealed ones that failed their check are moved into
    folder/abandoned/unresumable/ for a person to look at; `latest` and `best` are removed.
    Returns a line for each thing done."""
    aside = fresh_folder(folder / ABANDONED_NAME / "unresumable")
    moved, lines = set_aside([tag_dir for _, tag_dir in list_checkpoints(folder)], aside)
    lines += [
        f"moved {folder / name} to {aside}: it cannot be resumed from; delete it to free the space" for name in moved
    ]
    for name in (LATEST_NAME, BEST_NAME):
        (folder / name).unlink(missing_ok=True)
    return lines


def convert_to_universal(tag_dir: Path) -> Path:
    """Collective: DeepSpeed's universal form of a tag, which loads on any world size. Rank 0
    converts it once with DeepSpeed's converter command (into a temporary folder renamed when
    done; later resumes reuse it) and checks that every file of it loads with the weights-only
    rule. Raises DslmError with the converter's last line if it fails, or naming an unsafe file."""
    return on_rank0(lambda: universal_form(tag_dir))


ZERO_LAYOUTS = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
"""How each ZeRO stage lays out a tag's files: whole in each rank's (0), the optimizer state split
over the ranks (1, 2), the module split too (3). DeepSpeed loads a tag, or its universal form,
only into an engine of the layout that wrote it."""


def load_form(tag_dir: Path, world_size_then: int, world_size: int, stage: int) -> Path:
    """Collective: what DeepSpeed loads to continue from `tag_dir` (written by `world_size_then`
    ranks) on `world_size` ranks at ZeRO `stage`: the tag itself when both are as it was
    written, or when it is a ZeRO-0 tag (each rank loads the whole state); else its universal form
    (convert_to_universal), which ZeRO-1 and 2 split afresh. DslmError, naming both, for a stage of
    another layout (ZERO_LAYOUTS): DeepSpeed moves no state between them."""
    stage_then = zero_stage(written_ds_config(tag_dir))
    if (layout := ZERO_LAYOUTS[stage_then]) != ZERO_LAYOUTS[stage]:
        raise DslmError(
            f"{tag_dir} was written at ZeRO stage {stage_then} and this run asks for stage {stage}: "
            f"DeepSpeed loads a {layout} checkpoint only into {layout}; "
            f"resume with stage {stage_then} (--deepspeed), or start a new run from its weights "
            f"(train.init_from)"
        )
    if stage_then == stage and (world_size_then == world_size or stage == 0):
        return tag_dir
    return convert_to_universal(tag_dir)


def universal_form(tag_dir: Path) -> Path:
    """convert_to_universal's work on rank 0."""
    target = universal_dir(tag_dir)
    if not target.is_dir():
        print(
            f"converting {tag_dir} to DeepSpeed's universal form, which loads on any number of ranks (once per "
            f"checkpoint)...",
            flush=True,
        )
        with atomic_path(target) as tmp:
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(tag_dir),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            status, last = run_converter(command)
            (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # names the temporary folder; unused
            if status != 0:
                raise DslmError(f"converting {tag_dir} to DeepSpeed's universal form failed: {last}")
            add_zero3_frozen(tmp, tag_dir)
    check_loads_safely(target)
    return target


CONVERTER_STAGE = re.compile(r"\*\*\* (\d+)\. (\w+)")
"""How DeepSpeed's converter announces each of its 3 stages: `*** 1. Extracting ZeRO fragments`,
`*** 2. Merging slices`, `*** 3. Saving common optimizer states`."""


def run_converter(command: list[str]) -> tuple[int, str]:
    """Run DeepSpeed's converter with its output into the libraries' log and a progress bar over its
    stages; its exit status and the last line it printed."""
    last = "no output"
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as converter,
        tqdm(total=3, desc="universal form", unit="stage") as bar,
    ):
        for line in converter.stdout:  # text mode: the converter's progress bars' carriage returns end lines too
            library_stream().write(line)
            last = line.strip() or last
            if stage := CONVERTER_STAGE.match(line):
                bar.update(int(stage.group(1)) - 1 - bar.n)
                bar.set_postfix_str(stage.group(2).lower())
        if converter.wait() == 0:
            bar.update(bar.total - bar.n)
    return converter.returncode, last


def universal_tensor(universal: Path, name: str) -> Path:
    """Where DeepSpeed's universal form keeps the fp32 value of module tensor `name`."""
    return universal / "zero" / name / "fp32.pt"


def add_zero3_frozen(universal: Path, tag_dir: Path) -> None:
    """Complete the universal form of a ZeRO-3 tag. DeepSpeed's converter writes each module
    tensor's fp32 value (universal_tensor) for the parameters the optimizer holds and, from a
    ZeRO-0/1/2 tag, for every other tensor of the module (its mp_rank_00_model_states.pt holds
    them); from a ZeRO-3 tag, whose module is partitioned, it leaves the frozen parameters out.
    They are written here from the tag's consolidated weights (DeepSpeed's zero_to_fp32, which
    reassembles the frozen fragments)."""
    if not any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):  # ZeRO-3's per-rank module files
        return
    from deepspeed.checkpoint.constants import PARAM  # deepspeed is imported: dslm.engine.init_distributed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with libraries():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    for name, tensor in weights.items():
        if not (path := universal_tensor(universal, name)).is_file():
            path.parent.mkdir(parents=True)
            torch.save({PARAM: tensor.clone()}, path)  # a copy: a view would save its whole flat buffer


def load_untrained(module: torch.nn.Module, universal: Path) -> None:
    """Collective. Copy into `module` the tensors that DeepSpeed's universal load leaves as they
    were built: every parameter its optimizer does not hold (frozen ones, LoRA's base weights)
    and every buffer the state dict holds, from their universal_tensor files, in the module's
    dtype (under ZeRO-3 through GatheredParameters). Raises DslmError naming a tensor the
    universal form lacks."""
    import deepspeed  # imported: dslm.engine.init_distributed
    from deepspeed.checkpoint.constants import PARAM

    saved = module.state_dict().keys()
    untrained = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
    for name, tensor in [*untrained, *((name, b) for name, b in module.named_buffers() if name in saved)]:
        if not (path := universal_tensor(universal, name)).is_file():
            raise DslmError(
                f"{universal} has no value for {name} ({path} is missing): convert the checkpoint again "
                f"(delete {universal.name})"
            )
        value = load_weights_only(path)[PARAM]
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=0):
            with torch.no_grad():
                tensor.copy_(value.view(tensor.shape))


def fresh_state(world_size: int, data: DataConfig, manifests: list[Manifest], frozen: list[str]) -> TrainState:
    """The state of a run that starts at step 0 on the shards of `manifests` (one per
    DataConfig.sources) with `frozen` parameters."""
    return TrainState(
        world_size=world_size,
        shards=shards_identity(manifests[0]),
        frozen=frozen,
        shuffle_window=data.shuffle_window,
        mix=mix_state(data, manifests, MixBase(0, [0] * len(manifests))),
    )


def shards_identity(manifest: Manifest) -> dict:
    """What a run's sample cursor counts in (TrainState.shards)."""
    return {
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "seq_len": manifest.seq_len,
        "train_samples": sum(e.samples for e in manifest.split("train")),
    }


def mix_state(data: DataConfig, manifests: list[Manifest], base: MixBase) -> dict:
    """TrainState.mix for data.mix's sources, their weights taking over at `base`; {} without data.mix."""
    if not data.mix:
        return {}
    sources = [
        {"name": name, "weight": source.weight, "shards": shards_identity(manifest)}
        for (name, source), manifest in zip(data.sources(), manifests)
    ]
    return {"sources": sources, "base": dataclasses.asdict(base)}


def mix_base(state: TrainState) -> MixBase | None:
    """Where the run's current mix weights took over (None: at its start, or no data.mix)."""
    return MixBase(**state.mix["base"]) if state.mix else None


def continue_data(state: TrainState, data: DataConfig, manifests: list[Manifest], env: DistEnv) -> TrainState:
    """The checkpoint's `state` with the data of this run: DslmError when the shards, their order or
    the set of data.mix sources are not those its cursors count in. New mix weights are allowed:
    each source's cursor continues, and the new weights take over at the checkpoint (said on rank 0)."""
    names = [name for name, _ in data.sources()] if data.mix else []
    then = [source["name"] for source in state.mix.get("sources", [])]
    if names != then:

        def sources(names: list[str]) -> str:
            return f"data.mix {names}" if names else "data.shards alone"

        raise DslmError(
            f"this run reads {sources(names)}, but the checkpoint's was trained on {sources(then)}: a "
            f"resumed run keeps its sources, whose cursors its checkpoint holds; set data.mix back, or "
            f"start a new run with train.init_from"
        )
    if not data.mix:
        check_same_shards(state, manifests[0], data.shards)
    for (name, source), manifest, saved in zip(data.sources(), manifests, state.mix.get("sources", [])):
        check_same_shards(dataclasses.replace(state, shards=saved["shards"]), manifest, f"{source.shards} ({name})")
    if state.shuffle_window and state.shuffle_window != data.shuffle_window:
        raise DslmError(
            f"data.shuffle_window={data.shuffle_window} differs from {state.shuffle_window}, the order "
            f"the run's cursor walks; set it back (it is fixed for a run)"
        )
    if not state.shuffle_window:
        warning(
            "this checkpoint is from before the shard-window order (data.shuffle_window): the rest "
            "of its epoch is read in the new order, so some of its samples may repeat or be missed"
        )
    weights = [source.weight for _, source in data.sources()]
    weights_then = [source["weight"] for source in state.mix.get("sources", [])]
    if not data.mix or normalized(weights) == normalized(weights_then):
        return dataclasses.replace(state, shuffle_window=data.shuffle_window)
    cursors = Interleave(weights_then, mix_base(state)).cursors(state.samples)
    info(
        f"data.mix weights {weights_then} -> {weights} from sample {state.samples:,} on; each source continues "
        f"from its cursor ({', '.join(f'{n} {c:,}' for n, c in zip(names, cursors))})"
    )
    return dataclasses.replace(
        state, shuffle_window=data.shuffle_window, mix=mix_state(data, manifests, MixBase(state.samples, cursors))
    )


def normalized(weights: list[float]) -> list[float]:
    return [round(w / sum(weights), 12) for w in weights]


KEPT_MODEL_FIELDS = (*SIZES, "lm_head_bias", "tie_embeddings", "vocab_multiple")
"""What the weights' shapes depend on."""
KEPT_TRAIN_FIELDS = ("lr", "beta1", "beta2", "weight_decay", "freeze", "freeze_blocks")
"""What the optimizer's saved state holds (its groups, and its hyperparameters, which a resume
would restore over a new value; Megatron-LM likewise refuses a changed scheduler setting by
default). The schedule's shape (warmup, decay, max_steps, min_lr) follows the resumed run's
config."""
KEPT_LORA_FIELDS = ("rank", "alpha", "target_modules")
"""What a LoRA run's adapters are (their shapes, the layers they are on, their scale); their dropout
may change, as model.dropout may."""


def saved_config(tag_dir: Path) -> tuple[Path, RunConfig] | None:
    """(path, config) of the config.yaml of the run that wrote `tag_dir`; None for a tag outside
    a run directory."""
    if (found := run_of_tag(tag_dir)) is None:
        return None
    return found[0].config, read_run_config(found[0])


def check_same_settings(cfg: RunConfig, saved_path: Path, saved: RunConfig) -> None:
    """A resumed run keeps the model, the adapters and the optimizer settings of the run that wrote its
    checkpoint (`saved`, read from `saved_path`); DslmError naming the first field that differs."""
    fields = (
        [("model", name) for name in KEPT_MODEL_FIELDS]
        + [("train", name) for name in KEPT_TRAIN_FIELDS]
        + [("train.lora", name) for name in KEPT_LORA_FIELDS]
    )
    for section, name in fields:
        now, then = (getattr(operator.attrgetter(section)(config), name) for config in (cfg, saved))
        if now != then:
            raise DslmError(
                f"{section}.{name}={now} differs from {then} in {saved_path}: a resumed run keeps the "
                f"model's shapes, its adapters and the optimizer's lr, betas and weight decay, which its "
                f"checkpoint holds; pass {section}.{name}={then} as the run had it (its recipe and "
                f"overrides again), or start a new run"
            )


def check_same_shards(state: TrainState, manifest: Manifest, folder: str) -> None:
    """A resumed run must read the shards it started on: its cursor counts their samples."""
    now = shards_identity(manifest)
    changed = [f"{key} {state.shards[key]} -> {now[key]}" for key in now if state.shards.get(key) != now[key]]
    if changed:
        raise DslmError(
            f"{folder} is not what the run was trained on ({'; '.join(changed)}); point the run at its shards"
        )
