"""A tiny random stand-in for the demo teacher (HF Qwen3 + a small BPE with the demo's special tokens).

The pipeline and notebook tests run on it so they stay fast and independent of the shipped weights;
tests/test_demo_teacher.py checks the shipped teacher itself.
"""
from __future__ import annotations

import random


def make_tiny_teacher(directory: str) -> str:
    from efficient_dlm.demo import corpus, tasks
    from efficient_dlm.demo import tokenizer as demo_tokenizer
    from tests.hf_factory import make_hf_model

    texts = random.Random(0).sample(corpus.documents("train"), 100) + [i.text for i in tasks.instances("train", 1000, 0)]
    tok = demo_tokenizer.train_tokenizer(texts, vocab_size=600)
    make_hf_model(
        "qwen3_qknorm_tied", directory, vocab_size=tok.get_vocab_size(), max_position_embeddings=512,
        eos_token_id=demo_tokenizer.EOS_ID, pad_token_id=demo_tokenizer.EOS_ID, mask_token_id=demo_tokenizer.MASK_ID,
    )
    demo_tokenizer.save_hf(tok, directory)
    return directory
