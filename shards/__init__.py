"""dslm-shard: turn raw corpora into tokenized webdataset tar shards with a manifest."""
