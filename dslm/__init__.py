"""dslm: pretrain GPT-style language models with DeepSpeed, from one CPU to many GPU nodes."""
