"""Pallas kernels for the block-diffusion workload (TPU-first; interpret mode on CPU in tests).

- splash_masks: the training patterns as splash-attention computable masks with O(L) tile analysis.
- training_attention: splash attention forward/backward for [B, T, H, D] with GQA and segment ids.
- decode_attention: one block of queries against a ragged static-shape KV cache plus the block itself.
- lm_head: fused LM head -> per-position max probability, argmax token, entropy, online over vocab tiles.

Imported only through efficient_dlm.models.kernel_dispatch, which picks a kernel per backend, shards it
with shard_map and holds the XLA references the tests compare against.
"""
