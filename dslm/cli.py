"""What every dslm command does with a failure that is not a bug: one clear line on stderr, and an
exit status that tells a wrapper (slurm/pretrain.sh, dslm-submit) what to do next; the statuses
are dslm_local.errors.EXIT_STATUSES. ArgumentParser and run_command live in dslm_local.cli, so
that dslm-complete, which has no torch, reports as every command does.
"""

from __future__ import annotations

from dslm_local.cli import ArgumentParser, run_command

__all__ = ["ArgumentParser", "run_command"]
