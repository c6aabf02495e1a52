"""TensorBoard scalars and console lines, written by rank 0 only."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Metrics:
    def __init__(self, logdir: Path, enabled: bool, purge_step: int | None = None, console: bool = True):
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step) if enabled else None
        self.console = console
        """Print a line per log() call as well."""

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.console:
            tqdm.write(f"step {step:>6} | " + " | ".join(f"{tag.removeprefix('train/')} {value:.4g}"
                                                         for tag, value in values.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_scalars(logdir: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag from the event files in `logdir`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]
