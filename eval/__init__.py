"""dslm-eval: offline evaluation of saved checkpoints, written back into the run."""
