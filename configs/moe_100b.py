"""A 100B "flash" MoE shaped like LLaDA2.0-flash's base, Ling-flash-2.0 (102.9B total, ~6.1B active).

The architecture of configs/moe_16b.py (Ling 2.0: half RoPE, QK-norm, sigmoid group-limited router
with selection bias, one shared expert) at d 4096: 32 layers, 32 heads / 4 KV heads of 128, one
leading dense layer (MLP 9216), 31 MoE layers of 256 experts (1024 wide), top-8 within the best 4
of 8 groups, one shared expert (1024 wide). Total: 102,889,697,280 parameters, exactly the BF16
parameter count published for Ling-flash-2.0 (its F32 remainder, 7,936 = 31 x 256, is the selection
bias).
Shard it with an expert axis, e.g. --config.mesh.expert=16. At that scale training routes with
capacity 1.25 (GShard-style per-row expert capacity) instead of dropless, on both halves of a
[x_t ; x_0] row, each half with a capacity of its own (model.clean_routing="capacity", docs/METHOD.md
section 7): dropless expert parallelism sends static worst-case buffers (ep x the tokens), which at
ep=16 made the v5p-256 step need 98.6 GiB per chip, and 65.2 GiB with only the x_0 half dropless
(docs/BENCHMARKS.md). The trade-off: a clean token dropped in training is computed dropless at decode. Sequences of 4096 tokens, global batch 256; the
157k-vocabulary loss is computed 512 positions at a time.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "moe_16b")
    m = c.model
    m.hidden_size = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.intermediate_size = 9216  # the leading dense layer's MLP
    m.moe_intermediate_size = 1024
    m.shared_expert_intermediate_size = 1024  # one shared expert
    m.capacity_factor = 1.25
    m.clean_routing = "capacity"  # x_0 half with its own capacity: bounded expert-parallel buffers
    c.data.seq_len = 4096  # 8192 with block diffusion's clean copy
    c.train.batch_size = 256
    c.train.loss_chunk = 512
    return c
