"""The embedded demo: a small Qwen3-architecture AR teacher becomes a block-diffusion LM on a CPU.

corpus   the standard library's own source and docs (offline, redistributable text)
tasks    exact-match tasks generated from a seed, with a disjoint held-out split and the scorer
tokenizer  the teacher's byte-level BPE (tokenizers library, saved in HF format)
data     writes the JSONL files the training pipeline reads, and the held-out sets
"""
