"""The ml_collections config schema: one section per concern, defaults in one place, clear validation.

A recipe in configs/ is a short Python file whose `get_config()` starts from `base_config()` and sets
what differs (big_vision style). Every verb of `edlm` takes `--config=configs/x.py` and
`--config.section.key=value` overrides; `validate(config)` then rejects inconsistent values with one
line naming the key.

Sections: model (architecture, `ModelConfig` fields), init (where weights and tokenizer come from),
diffusion (objective and corruption), data, train, mesh, sample, bench, opd, lora. Each package owns the
meaning of its section; the defaults live here so a reader sees the whole schema at once.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from typing import Any, Callable

from ml_collections import ConfigDict, config_dict

from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.parallel.mesh import validate_mesh_section
from efficient_dlm.parallel.rules import DEFAULT_RULES, rules_to_strings
from efficient_dlm.sample.config import validate_bench, validate_sample
from efficient_dlm.train.opd_loop import check_opd
from efficient_dlm.train.validation import check_data_and_train, check_diffusion, check_lora

def model_section(cfg: ModelConfig | None = None) -> ConfigDict:
    """ModelConfig fields as a ConfigDict; None fields become typed placeholders so CLI overrides work."""
    cfg = cfg or ModelConfig()
    hints = typing.get_type_hints(ModelConfig)
    section = ConfigDict()
    for field in dataclasses.fields(ModelConfig):
        value = getattr(cfg, field.name)
        if value is None:  # `int | None` -> a None placeholder that accepts --config.model.x=<int>
            (kind,) = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
            value = config_dict.placeholder(kind)
        section[field.name] = value
    return section


def model_config(config: ConfigDict) -> ModelConfig:
    """The frozen ModelConfig from a config's `model` section."""
    return ModelConfig.from_dict(config.model.to_dict())


def diffusion_section() -> ConfigDict:
    """Objective and corruption (docs/METHOD.md sections 2-4). Owned by efficient_dlm/diffusion."""
    return ConfigDict(
        dict(
            objective="block_diffusion",  # block_diffusion (clean context) | block | bidirectional | ar
            block_size=32,
            block_size_schedule="",  # "step:size,..." e.g. "0:4,500:32,2000:64" (LLaDA2.0 WSD)
            masking="position",  # position (Efficient-DLM, per block) | uniform (MDLM)
            half_life=0.25,  # h: lambda = ln 2 / (h * block_size)
            rate_min=1e-3,  # per-block rate m ~ U(rate_min, rate_max) (eps; clipped rates)
            rate_max=1.0,
            complementary=False,  # each row also trained with the complementary mask
            token_shift=False,  # predict token i from the hidden state at i - 1
            loss_weighting="elbo",  # elbo (CE * n / k per block) | mean; both / masked-token count
            mask_token="model",  # model: model.mask_token_id | append: a new embedding row
            vocab_multiple=128,  # with append: vocabulary padded to this multiple
            valid_vocab_size=config_dict.placeholder(int),  # ids >= this never predicted (set by append)
            mask_noise_std=0.0,  # Gaussian noise on [MASK] embeddings (LLaDA2.0) ...
            mask_noise_steps=0,  # ... for the first this many steps
            ar_weight=0.0,  # > 0: + ar_weight * causal next-token loss (Nemotron-Labs Diffusion), for verifier="self"
            confidence_weight=0.0,  # > 0: CAP (LLaDA2.0): + weight * entropy at masked, already-correct positions (METHOD 9)
            confidence_temperature=1.0,  # CAP's entropy is of softmax(logits / this) (dParallel uses 0.5)
        )
    )


def data_section() -> ConfigDict:
    """Sources, tokenization, packing (grain). Owned by efficient_dlm/data."""
    return ConfigDict(
        dict(
            train_files="",  # comma-separated paths / globs: .jsonl .parquet .arrayrecord .npy
            train_weights="",  # comma-separated mixture weights, one per train_files item
            eval_files="",
            text_key="text",  # JSON field / Parquet column holding the document
            seq_len=256,
            packing=True,  # pack documents (segment ids) or pad one document per row
            add_bos=False,  # prepend model.bos_token_id to every document (text; a chat template writes its own)
            format="text",  # text: documents | chat: JSONL conversations, only assistant tokens supervised (README, Chat SFT)
            chat_template="",  # chat: "" the tokenizer's own | "builtin" (data/chat.py) | a .jinja file
            num_threads=2,
            prefetch=8,
        )
    )


def train_section() -> ConfigDict:
    """Optimizer, schedule, checkpoints, eval, metrics. Owned by efficient_dlm/train."""
    return ConfigDict(
        dict(
            steps=100,
            batch_size=8,  # global sequences per optimizer step
            grad_accum=1,  # micro-batches per step (batch_size must divide)
            learning_rate=3e-4,
            schedule="cosine",  # cosine | wsd | constant, after linear warm-up
            warmup_steps=10,
            min_lr_ratio=0.1,
            wsd_decay_fraction=0.1,
            b1=0.9,
            b2=0.95,
            adam_eps=1e-8,
            weight_decay=0.1,
            decay_norms=False,
            decay_biases=False,
            decay_embeddings=False,
            grad_clip=1.0,  # global-norm clipping; 0 disables
            z_loss=0.0,
            loss_chunk=0,  # >0: cross-entropy over this many positions at a time (large vocabularies)
            max_nonfinite_steps=10,  # stop after this many consecutive non-finite steps
            max_param_norm_ratio=10.0,  # stop when the parameter norm exceeds this times its start value; 0 = off
            save_every=100,
            keep_last=3,
            keep_best=True,  # also keep the checkpoint with the best eval loss
            async_checkpoint=True,
            resume=True,  # continue from the latest checkpoint in run_dir
            eval_every=0,  # 0: evaluate only at the end (when data.eval_files is set)
            eval_batches=4,
            log_every=10,
            tensorboard=True,
            progress=True,
        )
    )


def mesh_section() -> ConfigDict:
    """Device mesh and logical-axis rules. Owned by efficient_dlm/parallel (mesh.py, rules.py).

    data/fsdp/tensor/expert: axis sizes inside one slice (ICI); dcn_*: sizes across slices
    (multi-slice); -1 = the rest (one per group). rules: {logical axis name: "mesh_axis,mesh_axis"}
    ("" = replicated), e.g. --config.mesh.rules.embed=fsdp,tensor.
    """
    return ConfigDict(
        dict(
            data=1, fsdp=-1, tensor=1, expert=1,
            dcn_data=-1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1,
            rules=rules_to_strings(DEFAULT_RULES),
        )
    )


def sample_section() -> ConfigDict:
    """Decoding defaults for `edlm sample` / `generate`. Owned by efficient_dlm/sample."""
    return ConfigDict(
        dict(
            # The dLM decoding keys are unset by default: the model's DiffusionSpec (diffusion/spec.py) decides.
            strategy="",  # threshold | topk | factor | entropy (block diffusion) | ar (causal baseline) | speculative
            threshold=config_dict.placeholder(float),  # threshold: commit every masked position with confidence >= this
            tokens_per_step=config_dict.placeholder(int),  # topk: positions committed per step
            factor=config_dict.placeholder(float),  # factor (Fast-dLLM): commit n while the n-th confidence >= 1 - f / (n + 1)
            entropy_bound=config_dict.placeholder(float),  # entropy: commit while the summed entropy (nats) stays <= this
            block_size=0,  # 0 = the model's (its spec's training block size)
            max_new_tokens=64,
            temperature=0.0,  # 0 = greedy
            top_p=1.0,
            top_k=0,  # 0 = off
            seed=0,
            stop_tokens=(),  # token ids that end a row; () = model.eos_token_id
            prompt_bucket=0,  # prompt capacity of the cache in tokens; 0 = next power of two
            draft_steps=1,  # speculative (--verifier): dLM denoising steps per draft, the last commits the rest
            chat=False,  # edlm sample: text prompts as a user turn in the checkpoint's chat template (chat SFT)
        )
    )


def bench_section() -> ConfigDict:
    """`edlm bench` settings: the AR baseline and the dLM strategies over one prompt set. Owned by efficient_dlm/sample."""
    return ConfigDict(
        dict(
            # each non-threshold strategy runs once with the sample section's value; "speculative" verifies with
            # --verifier (default the --ar_ckpt teacher), "self_speculative" with the dLM's own causal mode
            strategies=("ar", "threshold"),
            thresholds=(0.7, 0.8, 0.9, 0.95),
            batch_sizes=(1, 8),
            repeats=3,  # timed repeats; the median is reported
            warmup=1,  # untimed runs first (compilation)
            num_prompts=8,  # random prompts when no --prompts_jsonl is given
            prompt_len=32,
            overhead_forwards=64,  # forward passes timed for the bare-forward reference
        )
    )


def demo_section() -> ConfigDict:
    """The embedded demo (`edlm demo`, `edlm demo-data`, `edlm ablate`). Owned by efficient_dlm/demo."""
    return ConfigDict(
        dict(
            teacher="",  # HF directory of the AR teacher; "" = the shipped efficient_dlm/assets/demo_teacher
            tasks="add,sub,reverse,upper,shift,sort",  # generated exact-match tasks (demo/tasks.py)
            seed=0,  # task generation seed (train and held-out instances)
            train_tasks=200000,  # task instances written for training
            eval_per_task=100,  # held-out instances per task for accuracy
            tokenizer_vocab=3072,  # BPE size when demo-data trains a tokenizer (the teacher recipe)
            thresholds="0.7,0.8,0.9,0.95",  # dLM decoding thresholds evaluated
            eval_batch=64,  # prompts per generate() call (AR and dLM alike)
            max_new_tokens=32,
            text_eval_batches=8,  # held-out text batches for NLL / ELBO
            hf_samples=3,  # prompts generated by the exported model reloaded in transformers
            variants="",  # ablation only: comma-separated variant names of the recipe (all when empty)
        )
    )


def opd_section() -> ConfigDict:
    """On-policy distillation from the frozen AR teacher (docs/METHOD.md section 5). Owned by efficient_dlm/train/opd.py.

    diffusion.objective="opd" trains only with OPD; any other diffusion objective mixes OPD steps in
    from opd.start_step on (every opd.every-th step; -1 = never).
    """
    return ConfigDict(
        dict(
            teacher="",  # the AR model: a Hugging Face directory or an orbax checkpoint (never updated)
            teacher_dtype="bfloat16",  # its parameters and compute
            prompt_files="",  # comma-separated JSONL: {"prompt": text} | {"prompt_ids": [...]} | {"messages": [...]}
            eval_files="",  # held-out prompts: KL and teacher agreement at evaluation
            eval_batches=2,
            chat_template=False,  # wrap prompts in the tokenizer's chat template (tokenizer_config.json)
            max_prompt_len=64,  # prompt capacity in tokens; longer prompts keep their last tokens
            max_new_tokens=32,  # rollout length ...
            max_new_tokens_schedule="",  # ... or "step:tokens,..." (e.g. growing: "0:16,200:32,400:64")
            block_size=4,  # rollout block size (the paper: 4)
            strategy="topk",  # topk: opd.steps_per_block steps per block | threshold (Fast-dLLM)
            steps_per_block=4,  # topk: block_size / steps_per_block tokens committed per step
            threshold=0.9,  # threshold strategy
            temperature=0.0,  # 0: greedy rollouts; > 0: sampled (seeded from the step)
            states="sequence",  # sequence: one partially denoised state per row | block: one per block
            top_k=16,  # KL over the teacher's top-k tokens (renormalised); 0 = the full vocabulary
            kl_chunk=0,  # > 0: logits of this many positions at a time (large vocabularies)
            start_step=-1,  # mixed recipes: first OPD step (with another diffusion objective)
            every=1,  # mixed recipes: OPD on every n-th step from start_step
        )
    )


def lora_section() -> ConfigDict:
    """LoRA adapters (models/lora.py, README "LoRA"). Owned by efficient_dlm/train (train/lora.py).

    rank > 0 trains adapters on a frozen base (init.checkpoint); checkpoints hold the adapters only.
    """
    return ConfigDict(
        dict(
            rank=0,  # 0 = off (full fine-tuning)
            alpha=16.0,  # adapter output scaled by alpha / rank
            dropout=0.0,  # on the adapters' input (attention and MLP projections; not the routed experts)
            targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",  # + "experts": MoE routed experts
            base_dtype="",  # "" = model.param_dtype; "bfloat16": hold the frozen base in bfloat16
        )
    )


def sibling_recipe(anchor: str, name: str) -> ConfigDict:
    """get_config() of the recipe `name`.py next to the file `anchor` (a recipe's __file__): recipes
    build on one another (qwen3_8b_opd on qwen3_8b_bd on qwen3_8b) without configs/ being a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"edlm_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = model_section()
    # Where weights come from: an HF directory, an orbax checkpoint from `edlm import-hf` / `save`, or
    # nothing (random init from `model`). The tokenizer defaults to the one stored with the weights.
    c.init = ConfigDict(dict(hf_dir="", checkpoint="", tokenizer="", seed=0))
    c.diffusion = diffusion_section()
    c.data = data_section()
    c.train = train_section()
    c.mesh = mesh_section()
    c.sample = sample_section()
    c.bench = bench_section()
    c.demo = demo_section()
    c.opd = opd_section()
    c.lora = lora_section()
    c.seed = 0
    c.run_dir = "runs/default"
    return c


# Every section's checks, owned by its package and composed here explicitly: every verb validates
# every section the same way (no validator depends on which modules a verb happened to import).
SECTION_CHECKS: tuple[Callable[[ConfigDict], None], ...] = (
    validate_mesh_section, check_diffusion, check_data_and_train, check_opd, check_lora, validate_sample, validate_bench,
)


def validate(config: ConfigDict) -> ConfigDict:
    """Checks cross-field consistency; raises UserError with one line naming the offending key."""
    model_config(config)  # ModelConfig.__post_init__ validates the architecture
    if config.init.hf_dir and config.init.checkpoint:
        raise UserError("set only one of init.hf_dir and init.checkpoint")
    for check in SECTION_CHECKS:
        check(config)
    return config


def to_plain(config: ConfigDict) -> dict[str, Any]:
    """JSON-ready dict (for checkpoints and reports)."""
    return config.to_dict()
