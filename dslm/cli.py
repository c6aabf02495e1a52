"""What every dslm command does with a failure that is not a bug: one clear line on stderr, and an
exit status that tells a wrapper (slurm/pretrain.sh, dslm-submit) what to do next:

  0    done
  2    bad input (a config typo, a missing file, nothing to resume with --resume auto): fix it first
  65   dslm-train found a training shard that no longer matches its manifest (data.on_bad_shard=stop):
       it stopped after a checkpoint; run `dslm-shard verify`, rebuild the shard, then resume: not requeued
  69   another rank stopped answering (train.collective_timeout_s) or the rendezvous failed
       (MASTER_PORT taken): run again, from the last checkpoint; the wrappers requeue
  74   a checkpoint could not be written (disk full, quota): the partial tag is removed and the
       previous checkpoint is intact; running again helps only once space is freed: not requeued
  75   dslm-train stopped on a signal after a checkpoint, or during start-up before writing anything
       (dslm.stop): the wrappers requeue
  130  interrupted (Ctrl-C; dslm-train: a second Ctrl-C)

Any other status (1, or a signal) is a crash with a traceback. ArgumentParser and run_command
live in dslm_local.cli, so that dslm-complete, which has no torch, reports as every command does.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from dslm_local.cli import ArgumentParser, run_command

__all__ = ["ArgumentParser", "run_command", "warn"]


def warn(prog: str, line: str) -> None:
    """One warning line on stderr that does not break a progress bar."""
    tqdm.write(f"{prog}: warning: {line}", file=sys.stderr)
