"""grain input pipelines: document sources, tokenization, packing with segment ids, batches."""
