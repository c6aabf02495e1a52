"""Checkpoints: the format of a tag and its seal (format), writing tags (save), reading a model's
weights from a tag, a run or an export (weights), and continuing a run from a tag (resume)."""
