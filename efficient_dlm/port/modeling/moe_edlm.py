"""Feed-forward blocks of a dLM exported by efficient_dlm: SwiGLU and mixture of experts (PyTorch).

Module and tensor names follow the base family's checkpoints (Qwen2-MoE, Qwen3-MoE, Mixtral,
GLM-4.5), so the weights keep their usual names. Routing, as efficient_dlm (models/routers.py):
router logits in float32; softmax scores (Qwen, Mixtral) or sigmoid scores with a per-expert
selection bias and group-limited top-k (GLM-4.5 / DeepSeek-V3); weights are the unbiased scores of
the chosen experts, optionally renormalised, times routed_scaling_factor; an optional shared expert
runs on every token, optionally scaled by sigmoid(x . w). Dropless: every token visits its k experts,
the inference policy of efficient_dlm's decoder (capacity, if any, applied only in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
# family -> (attribute of the MoE block in a layer, names of an expert's gate / up / down, shared expert)
MOE_LAYOUTS = {
    "qwen3_moe": ("mlp", SWIGLU_NAMES, "shared_expert"),
    "qwen2_moe": ("mlp", SWIGLU_NAMES, "shared_expert"),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), "shared_expert"),
    "glm4_moe": ("mlp", SWIGLU_NAMES, "shared_experts"),
}


class EdlmSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), its three projections named as the checkpoint names them."""

    def __init__(self, hidden_size: int, intermediate_size: int, names=SWIGLU_NAMES):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class EdlmRouter(nn.Module):
    """Linear router (HF `gate`) with the optional selection bias `e_score_correction_bias`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [N, hidden] -> (weights [N, k] float32, experts [N, k])."""
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.softmax(logits, dim=-1) if cfg.router_score == "softmax" else torch.sigmoid(logits)
        choice = scores + self.e_score_correction_bias if cfg.router_bias else scores
        if cfg.router_groups > 1:
            grouped = choice.view(len(choice), cfg.router_groups, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            best = group_scores.topk(cfg.router_topk_groups, dim=-1).indices
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~eligible[..., None], float("-inf")).view(len(choice), -1)
        experts = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if cfg.router_norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, experts


class EdlmSparseMoe(nn.Module):
    """Router + routed experts + optional (gated) shared expert."""

    def __init__(self, config, family: str):
        super().__init__()
        _, names, self.shared_name = MOE_LAYOUTS[family]
        self.gate = EdlmRouter(config)
        self.experts = nn.ModuleList(
            [EdlmSwiGLU(config.hidden_size, config.moe_intermediate_size, names) for _ in range(config.num_experts)]
        )
        if config.shared_expert_intermediate_size:
            setattr(self, self.shared_name, EdlmSwiGLU(config.hidden_size, config.shared_expert_intermediate_size))
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.gate(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # only the tokens routed to expert e
            token, slot = torch.nonzero(experts == e, as_tuple=True)
            if len(token):
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(x.dtype))
        shared = getattr(self, self.shared_name, None)
        if shared is not None:
            extra = shared(flat)
            if self.shared_expert_gate is not None:
                extra = torch.sigmoid(self.shared_expert_gate(flat)) * extra
            out = out + extra
        return out.view(shape)


def feed_forward(config, family: str, layer_index: int) -> tuple[str, nn.Module]:
    """(attribute name, module) of layer `layer_index`'s feed-forward block."""
    dense = layer_index < config.first_k_dense or layer_index in getattr(config, "mlp_only_layers", ())
    if not getattr(config, "num_experts", 0) or dense:
        return "mlp", EdlmSwiGLU(config.hidden_size, config.intermediate_size)
    if family not in MOE_LAYOUTS:
        raise ValueError(f"no mixture-of-experts layout for base model type {family!r}")
    return MOE_LAYOUTS[family][0], EdlmSparseMoe(config, family)
