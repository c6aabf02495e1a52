"""Reading tokenized shards: the manifest format and the training data loader."""
