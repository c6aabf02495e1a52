"""Checkpoints in runs/NAME/checkpoints/global_stepN: DeepSpeed's files plus dslm's own, sealed
so that a crash at any moment never leaves `latest` naming an incomplete tag.

A tag is written by every rank (DeepSpeed's model and optimizer files, and `rng_rankR.pt` with
each rank's python/numpy/torch RNG as tensors and plain values), then, after a barrier, each rank
hashes the files it wrote (xxh3_128) and rank 0 seals the tag: `dslm_complete.json` lists every
file of the tag with its size and checksum, and only then is `latest` replaced (atomically).
A tag without the seal, or whose files no longer match it, is never resumed from.

Lineage: `latest` names the newest tag of the live branch. A run resumed from an earlier tag
starts a new branch there (`start_branch`): the tags beyond it are moved aside into
checkpoints/abandoned/, so that neither `--resume auto` nor pruning ever sees them again.

This module is the format: a tag's files, the seal and its checks, the RNG files, finding tags
(latest, best, the newest resumable) and loading a tag's torch files without arbitrary
unpickling. Writing tags is dslm.checkpoint.save, reading a model's weights
dslm.checkpoint.weights, continuing a run from a tag dslm.checkpoint.resume.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from dslm.compat import import_attr
from dslm.errors import DslmError
from dslm.files import atomic_write_text
from dslm.logs import libraries
from dslm.run_dir import TAG_PATTERN, tag_for
from dslm_local.cli import counted

SEAL_NAME = "dslm_complete.json"
LATEST_NAME = "latest"
BEST_NAME = "best"
"""Names the sealed tag with the lowest val/loss; pruning never removes it."""
ABANDONED_NAME = "abandoned"
"""Where `start_branch` moves the tags of an abandoned branch: checkpoints/abandoned/after_global_stepN/."""
CHECKSUM = "xxh3_128"
"""The hash the seal records of every file (xxhash's XXH3, 128 bits: not cryptographic, it
detects damage, not tampering; bench/checksum_cost.py measures its cost per GB)."""
WRITER = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")
"""The rank a tag's file names as its writer (DeepSpeed's zero_pp_rank_R, dslm's rng_rankR);
every other file (mp_rank_00_model_states.pt) is written by rank 0."""


@dataclass
class TrainState:
    """Where training stands after an optimizer step, beside DeepSpeed's own state."""

    step: int = 0
    """Optimizer steps done."""
    samples: int = 0
    """Training samples consumed by all ranks: the loader's global cursor, independent of the
    world size, so a resumed run reads the next unseen sample whatever its rank count."""
    world_size: int = 1
    """Ranks that wrote the checkpoint."""
    shards: dict = dataclasses.field(default_factory=dict)
    """What the cursor counts in: the shards' tokenizer_sha256, seq_len and train_samples."""
    val_loss: float | None = None
    """val/loss measured at this step, if it was."""
    frozen: list[str] = dataclasses.field(default_factory=list)
    """Parameters that did not train (train.freeze): they have no optimizer state."""
    global_batch: int = 0
    """Samples per optimizer step of the run that wrote the tag (micro-batch x grad_accum x
    ranks); 0 in tags written before dslm recorded it."""
    shuffle_window: int = 0
    """data.shuffle_window of the order the cursor walks (dslm.data.order); 0 in tags written
    before it existed, whose epochs were each one full permutation."""
    mix: dict = dataclasses.field(default_factory=dict)
    """With data.mix: {"sources": [{"name", "weight", "shards": identity}], "base": {"samples",
    "cursors"}} (dslm.data.mix.MixBase); {} for a run that reads data.shards alone."""
    train_seconds: float = 0.0
    """Wall-clock seconds of the training loop up to this step, summed over the run's resumes (not
    the start-up before the first step); 0 in tags written before dslm recorded it."""
    hardware: str = ""
    """What the ranks that ran the latest steps trained on (dslm.mfu.hardware), e.g. "8 x NVIDIA
    H100 80GB HBM3"; "" in tags written before dslm recorded it."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def rng_state() -> dict:
    """This process's python, numpy and torch (and CUDA) RNG states as tensors, tuples of ints and
    strings only, so that torch.load(weights_only=True) reads them back without unpickling code."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {
        "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "pos": int(numpy_state["state"]["pos"]),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned, or the form dslm saved before it (numpy's state as its
    legacy tuple with an array)."""
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"].numpy().astype(np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    random.setstate(state["python"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: Path) -> dict:
    """A rank's rng_rankR.pt, read with the rule of load_weights_only; numpy's array type is
    allowed besides, for the files dslm wrote before it stored the state as tensors. Raises
    DslmError for a file that needs anything else."""
    return load_weights_only(path, numpy_array_records())


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tag_files(tag_dir: Path) -> list[str]:
    """The files of a tag (but the seal), as paths relative to it."""
    return [str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != SEAL_NAME]


def file_checksum(path: Path) -> str:
    """The CHECKSUM hex digest of a file's bytes, read in 16 MiB blocks."""
    digest, block = xxhash.xxh3_128(), bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(memoryview(block)[:n])
    return digest.hexdigest()


def own_checksums(tag_dir: Path, rank: int, world_size: int) -> dict[str, str]:
    """Checksums of the files of a tag that `rank` wrote (WRITER), by name."""
    return {
        name: file_checksum(tag_dir / name)
        for name in tag_files(tag_dir)
        if int(m.group(1) if (m := WRITER.search(name)) else 0) % world_size == rank
    }


def seal(tag_dir: Path, state: TrainState, checksums: dict[str, str] | None = None) -> None:
    """Write the tag's seal: `state` and every file's size and checksum (from `checksums` where it
    has the file, hashed here otherwise)."""
    checksums = checksums or {}
    files = {
        name: {"bytes": (tag_dir / name).stat().st_size, CHECKSUM: checksums.get(name) or file_checksum(tag_dir / name)}
        for name in tag_files(tag_dir)
    }
    atomic_write_text(tag_dir / SEAL_NAME, json.dumps({"state": dataclasses.asdict(state), "files": files}, indent=1))


def seal_problem(tag_dir: Path, checksums: bool = False) -> str | None:
    """Why a tag cannot be resumed from (unsealed, files missing, of another size or, with
    `checksums`, other bytes than sealed), or None. Tags sealed before dslm recorded checksums
    are checked by size only."""
    seal_path = tag_dir / SEAL_NAME
    if not seal_path.is_file():
        return "incomplete (never sealed)"
    sealed = json.loads(seal_path.read_text())
    files = sealed["files"]
    for name, record in files.items():
        path, record = tag_dir / name, record if isinstance(record, dict) else {"bytes": record}
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, sealed with {record['bytes']}"
        if checksums and CHECKSUM in record and file_checksum(path) != record[CHECKSUM]:
            return f"{name} does not match its {CHECKSUM} checksum in {SEAL_NAME} (its bytes changed after sealing)"
    world_size = sealed["state"]["world_size"]
    ranks = sum(1 for name in files if name.startswith("rng_rank"))
    if ranks != world_size:
        return f"holds the state of {counted(ranks, 'rank')}, sealed by {world_size}"
    return None


def resume_problem(tag_dir: Path) -> str | None:
    """Why a run cannot continue from a tag, or None: seal_problem with checksums, then any torch
    file of it that needs arbitrary unpickling (the rule of load_weights_only)."""
    if (problem := seal_problem(tag_dir, checksums=True)) is not None:
        return problem
    try:
        check_loads_safely(tag_dir)
    except DslmError as e:
        return str(e)
    return None


def check_loads_safely(folder: Path) -> None:
    """Every torch file under `folder` (*.pt, any depth) loads with load_weights_only (numpy
    arrays allowed in rng files); DslmError naming the first that does not."""
    for path in sorted(folder.rglob("*.pt")):
        if path.name.startswith("rng_rank"):
            load_rng_state(path)
        else:
            load_weights_only(path)


def written_ds_config(tag_dir: Path) -> dict:
    """The DeepSpeed config a tag was written with, which DeepSpeed keeps in the tag's model states
    file (mp_rank_00_model_states.pt; under ZeRO-3 each rank's zero_pp_rank_R_..._model_states.pt),
    read here memory-mapped (load_weights_only)."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        path = next(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
    return load_weights_only(path).get("ds_config") or {}


def sealed_state(tag_dir: Path) -> TrainState:
    return TrainState(**json.loads((tag_dir / SEAL_NAME).read_text())["state"])


def best_tag(folder: Path) -> Path | None:
    """The live branch's sealed tag with the lowest val/loss (the newest of equals), or None when
    none has one."""
    scored = [
        (state.val_loss, -step, tag_dir)
        for step, tag_dir in live_checkpoints(folder)
        if (tag_dir / SEAL_NAME).is_file() and (state := sealed_state(tag_dir)).val_loss is not None
    ]
    return min(scored)[2] if scored else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, tag folder) for every global_stepN under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def latest_step(folder: Path) -> int | None:
    """The step of the tag `latest` names (whether or not that tag still exists), or None without
    a `latest` naming a tag."""
    latest = folder / LATEST_NAME
    match = TAG_PATTERN.match(latest.read_text().strip()) if latest.is_file() else None
    return int(match.group(1)) if match else None


def live_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """list_checkpoints up to the step `latest` names (all of them without `latest`): the live
    branch. A tag beyond it is not part of the run: one being written, the debris of a crash, or
    a branch abandoned by a resume from an earlier tag (start_branch moves those aside)."""
    upto = latest_step(folder)
    return [(step, tag_dir) for step, tag_dir in list_checkpoints(folder) if upto is None or step <= upto]


def newest_resumable(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest tag of the live branch that a run can continue from (resume_problem: sealed,
    checksums match, safe to load): the one `latest` names when it is, else the newest older one.
    Also a warning line for each tag passed over, newer ones included."""
    live = {tag_dir for _, tag_dir in live_checkpoints(folder)}
    skipped = []
    for _, tag_dir in reversed(list_checkpoints(folder)):
        if tag_dir not in live:
            skipped.append(
                f"skipping checkpoint {tag_dir}: beyond {tag_for(latest_step(folder))}, which "
                f"{folder / LATEST_NAME} names (not on the run's live branch)"
            )
        elif (problem := resume_problem(tag_dir)) is None:
            return tag_dir, skipped
        else:
            skipped.append(f"skipping checkpoint {tag_dir}: {problem}")
    return None, skipped


def universal_dir(tag_dir: Path) -> Path:
    """Where DeepSpeed's universal form of a tag is kept (dslm.checkpoint.resume writes it), beside the tag."""
    return tag_dir.with_name(f"{tag_dir.name}_universal")


def deepspeed_records() -> list[type]:
    """The record types DeepSpeed pickles into its checkpoint files, besides tensors and containers."""
    scalers = "deepspeed.runtime.fp16.loss_scaler"
    with libraries():  # importing deepspeed prints the accelerator it picked
        return [
            import_attr("deepspeed", module, name)
            for module, name in (
                (scalers, "LossScaler"),
                (scalers, "DynamicLossScaler"),
                ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                ("deepspeed.utils.tensor_fragment", "fragment_address"),
            )
        ]


def numpy_array_records() -> list:
    """What numpy's RNG state array (uint32) pickles as: numpy's private array reconstructor among
    them; nothing of them runs code."""
    return [import_attr("numpy", "numpy._core.multiarray", "_reconstruct"), np.ndarray, np.dtype, np.dtypes.UInt32DType]


def load_weights_only(path: Path, allowed: list | None = None) -> dict:
    """torch.load(weights_only=True) of a DeepSpeed file: tensors, plain containers and the few
    record types DeepSpeed pickles into them (and the types in `allowed`); anything else
    (arbitrary code) is refused with a DslmError naming the file. A zip file (torch.save's format)
    is memory-mapped: its tensors are read only when used."""
    try:
        with torch.serialization.safe_globals(deepspeed_records() + (allowed or [])):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)|but got <class '([^']+)'>", str(e), re.IGNORECASE)
        raise DslmError(
            f"{path}: refusing to load it: it needs arbitrary unpickling "
            f"({found.group(1) or found.group(2) if found else 'not only tensors and plain data'}), "
            "and checkpoints are read with torch.load(weights_only=True)"
        ) from None
    except (RuntimeError, EOFError) as e:  # torch's zip reader on a damaged file; an empty one
        reason = str(e).split(". ")[0] or "it ends before its data"
        raise DslmError(f"{path}: cannot read it: damaged or not a torch file ({reason})") from None
