"""Training objectives: how a batch of packed samples becomes the model's inputs and targets.

A batch (dslm.data.loader) holds `input_ids` and `labels`, each (B, T+1): the labels are the
tokens, with dslm.model.IGNORE_INDEX (-100, PyTorch's ignore_index) where a token is not a training target.
An objective turns it into inputs (B, T) and targets (B, T); the model's loss is the mean
cross-entropy over the targets that are not ignored (dslm.model.GPT.forward). The previous-token
objective is this same one on samples the loader reversed (data.direction=backward). The trainer
and validation call the run's objective and nothing else, so a new objective is a new function
here, not a branch in the loop.
"""

from __future__ import annotations

from typing import Callable

import torch

Objective = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""Batch {"input_ids", "labels"} of (B, T+1) -> (inputs (B, T), targets (B, T))."""


def next_token(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT's objective: predict token t + 1 from tokens 0..t, where token t + 1 is a target. Views,
    no copy."""
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:]
