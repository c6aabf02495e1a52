"""Training objectives: how a batch of packed samples becomes the model's inputs and targets.

A sample is seq_len + 1 tokens (dslm.data.loader); an objective turns a (B, T+1) batch into
inputs (B, T) and targets (B, T). The model takes the mean cross-entropy over the targets and
skips those set to -100 (PyTorch's ignore_index), which is how a masked objective leaves
positions out of the loss. The trainer and validation call the run's objective and nothing else,
so a new objective is a new function here, not a branch in the loop.
"""

from __future__ import annotations

from typing import Callable

import torch

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(B, T+1) token batch -> (inputs (B, T), targets (B, T))."""


def next_token(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT's objective: predict token t + 1 from tokens 0..t. Views, no copy."""
    return batch[:, :-1], batch[:, 1:]
