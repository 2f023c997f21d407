"""Configuration of a block-diffusion language model exported by efficient_dlm.

Shipped next to the weights and loaded with `trust_remote_code=True`. The architecture fields are
those of the base model (Llama / Mistral / Qwen2 / Qwen3 names); the dLM fields say how the model was
trained and how it decodes by default (see the model card). The exporter writes the base family into
`model_type` ("edlm_qwen3"); this file is the same for every family.
"""
from transformers import PretrainedConfig


class EdlmConfig(PretrainedConfig):
    model_type = "edlm"  # rewritten to "edlm_<base model_type>" in each export
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters=None,
        attention_bias=False,
        attention_out_bias=False,
        qk_norm=False,
        sliding_window=None,
        full_attention_layers=(),
        use_sliding_window=False,
        mask_token_id=None,
        valid_vocab_size=None,
        block_size=32,
        attention_pattern="block",
        token_shift=False,
        decoding_strategy="threshold",
        decoding_threshold=0.9,
        decoding_tokens_per_step=1,
        decoding_factor=1.0,
        decoding_entropy_bound=0.3,
        training_attention="block_diffusion",
        num_experts=0,
        num_experts_per_tok=0,
        moe_intermediate_size=0,
        first_k_dense=0,
        mlp_only_layers=(),
        shared_expert_intermediate_size=0,
        shared_expert_gate=False,
        router_score="softmax",
        router_norm_topk=False,
        router_groups=1,
        router_topk_groups=1,
        routed_scaling_factor=1.0,
        router_bias=False,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"EdlmConfig supports hidden_act='silu' only, got {hidden_act!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.attention_bias = attention_bias  # q/k/v projections
        self.attention_out_bias = attention_out_bias  # o_proj
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window  # keys this many positions back are hidden, in every pattern, as in training
        self.full_attention_layers = list(full_attention_layers)  # layers without the window
        self.use_sliding_window = use_sliding_window
        self.mask_token_id = mask_token_id
        self.valid_vocab_size = valid_vocab_size  # ids at or above it are vocabulary padding, never generated
        self.block_size = block_size
        self.attention_pattern = attention_pattern
        self.token_shift = token_shift
        # The model's diffusion spec (efficient_dlm/diffusion/spec.py): default decoding of `generate`.
        self.decoding_strategy = decoding_strategy
        self.decoding_threshold = decoding_threshold
        self.decoding_tokens_per_step = decoding_tokens_per_step
        self.decoding_factor = decoding_factor
        self.decoding_entropy_bound = decoding_entropy_bound
        self.training_attention = training_attention  # the training pattern; decoding is always block-causal
        # Mixture of experts (num_experts = 0: dense); efficient_dlm's ModelConfig names, see moe_edlm.py.
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense = first_k_dense  # leading layers with a dense MLP
        self.mlp_only_layers = list(mlp_only_layers)  # further layers with a dense MLP
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.router_score = router_score  # softmax | sigmoid
        self.router_norm_topk = router_norm_topk
        self.router_groups = router_groups
        self.router_topk_groups = router_topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.router_bias = router_bias
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
