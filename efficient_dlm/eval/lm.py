"""The lm-eval model `edlm`: any efficient_dlm checkpoint (AR or block-diffusion) inside lm-evaluation-harness.

    lm_eval --model edlm --model_args ckpt=DIR,strategy=threshold,threshold=0.9,batch_size=16 --tasks ...

(with lm-eval releases that discover the `lm_eval.models` entry point; with lm-eval 0.4.13 run the same
arguments as `python -m efficient_dlm.eval ...` or use `edlm eval`, which register the model first.)

- generate_until: `efficient_dlm.generate` with any decoding strategy (ar, threshold, topk, factor,
  entropy, and speculative with verifier=DIR|self and draft_steps= where the sampler has it),
  `batch_size` prompts per call in request order (the last batch padded by repetition, one prompt
  bucket per request group, so every call has one shape), greedy unless the task asks for
  sampling; the text is cut at the first stop sequence (`until`) and at EOS.
- loglikelihood: exact for AR models; for a dLM the block-diffusion ELBO (likelihood.py; mc_samples
  masks per request, in complementary pairs unless mc_complementary=false: at equal masks they cut the
  standard error 1.7-2x on the demo models, docs/BENCHMARKS.md). is_greedy for a dLM: the
  model's own greedy decoding of the context reproduces the continuation (greedy_check=false skips it
  and reports False).
- loglikelihood_rolling: lm-eval's disjoint rolling windows of the model's context length, each scored
  as a loglikelihood request (the AR sum is the exact log-likelihood of the text).
- The results' config carries an "edlm" entry: the decoding and scoring settings, generated tokens,
  forward passes, tokens per forward and generated tokens per second of the compiled programs.
Why our own adapter: lm-eval's models wrap torch/vLLM backends; ours decodes with the JAX sampler.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import jax
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from efficient_dlm.diffusion.objectives import Objective
from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.errors import UserError
from efficient_dlm.eval import likelihood
from efficient_dlm.eval.loading import load
from efficient_dlm.sample.api import check_settings, generate, prepare

DECODING_TYPES = {"strategy": str, "threshold": float, "block_size": int, "tokens_per_step": int, "factor": float,
                  "entropy_bound": float, "temperature": float, "top_p": float, "top_k": int, "seed": int}
DECODING_KEYS = tuple(DECODING_TYPES)


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"model_args: {name} must be true or false, got {value!r}")


def _decoding(settings: dict, diffusion, ckpt: str, spec: DiffusionSpec | None = None) -> dict:
    """The decoding settings: `prepare`'s defaults, the model's DiffusionSpec (block size, default
    decoding; strategy "ar" for an AR model), then model_args; validated."""
    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items() if k in DECODING_KEYS}
    defaults.update((spec or DiffusionSpec(mask_token_id=0)).decoding())
    if diffusion is None:
        defaults.update(strategy="ar", block_size=None)
    else:
        defaults.update(block_size=diffusion.block_size)
    given = {k: v for k, v in settings.items() if k in DECODING_TYPES and v is not None}
    out = {k: None if v is None else DECODING_TYPES[k](v) for k, v in {**defaults, **given}.items()}
    if out["strategy"] != "ar" and diffusion is None:
        raise UserError(f"model_args: strategy={out['strategy']} needs a dLM checkpoint; {ckpt} is scored as an AR model")
    try:
        check_settings(out["strategy"], 1, out["block_size"], out["threshold"], out["tokens_per_step"],
                       out["temperature"], out["top_p"], out["top_k"])
    except ValueError as err:
        raise UserError(f"model_args: {err}") from None
    return out


def _speculative(strategy: str, verifier: str | None, draft_steps: int, dtype: str | None) -> dict:
    """generate()'s verifier / draft_steps for strategy="speculative" (the dLM drafts, an AR model at
    verifier=DIR, or the dLM itself with verifier=self, keeps exactly its own greedy decoding); {} otherwise."""
    if strategy != "speculative":
        if verifier is not None:
            raise UserError(f"model_args: verifier= is used by strategy=speculative only, got strategy={strategy}")
        return {}
    if not verifier:
        raise UserError("model_args: strategy=speculative needs verifier=DIR (an AR model) or verifier=self")
    model = "self" if verifier == "self" else load(verifier, dtype=dtype, kind="ar").model
    return {"verifier": model, "draft_steps": draft_steps}


BOUND_RATES = (1e-6, 1.0)  # uniform masking over these rates: the any-order bound (docs/METHOD.md section 3)


def elbo_objective(diffusion, masking: str, complementary: bool, mask_token_id: int) -> Objective:
    """The corruption the ELBO draws: masking "uniform" (the bound, default) or "train" (the checkpoint's own
    law and rates, i.e. its training loss), at the checkpoint's block size and token shift."""
    if masking not in ("uniform", "train"):
        raise UserError(f"model_args: masking must be uniform (the ELBO bound) or train (the training law), got {masking!r}")
    train = masking == "train"
    rate_min, rate_max = (diffusion.rate_min, diffusion.rate_max) if train else BOUND_RATES
    return Objective(
        kind=diffusion.objective, block_size=diffusion.block_size, masking=diffusion.masking if train else "uniform",
        half_life=diffusion.half_life, rate_min=rate_min, rate_max=rate_max, complementary=complementary,
        token_shift=diffusion.token_shift, mask_token_id=mask_token_id,
    )


@register_model("edlm")
class EdlmLM(TemplateLM):
    """lm-eval model over `efficient_dlm.eval.loading.load(ckpt)`; model_args are the constructor's arguments."""

    def __init__(
        self,
        ckpt: str | None = None,
        *,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        mc_samples: int = 32,
        mc_batch: int = 0,
        mc_complementary: bool | str = True,
        masking: str = "uniform",
        greedy_check: bool | str = True,
        warmup: bool | str = True,
        kind: str = "auto",
        dtype: str | None = None,
        tokenizer: str | None = None,
        verifier: str | None = None,
        draft_steps: int = 1,
        **settings: Any,
    ) -> None:
        """settings: `generate`'s decoding arguments (DECODING_KEYS; defaults: the checkpoint's block size,
        strategy "threshold" for a dLM and "ar" for an AR model, `prepare`'s defaults for the rest)."""
        super().__init__()
        unknown = sorted(k for k, v in settings.items()
                         if v is not None and k not in DECODING_KEYS and k not in ("device", "max_batch_size"))
        if unknown:
            raise UserError(f"model_args: unknown key(s) {', '.join(unknown)} for --model edlm")
        if not ckpt:
            raise UserError("model_args: ckpt=DIR is required (an efficient_dlm checkpoint or a Hugging Face directory)")
        self.loaded = load(str(ckpt), tokenizer=tokenizer, dtype=dtype, kind=kind)
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        diffusion = self.loaded.diffusion
        if str(batch_size).startswith("auto"):
            raise UserError("model_args: batch_size=auto is not supported; give a number (prompts per generate call)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"model_args: batch_size must be >= 1, got {batch_size}")
        self.decoding = _decoding(settings, diffusion, str(ckpt), getattr(self.loaded.model, "spec", None))
        self.speculative = _speculative(self.decoding["strategy"], verifier, int(draft_steps), dtype)
        self._verifier_name = verifier
        self.max_gen_toks = int(max_gen_toks)
        self.greedy_check, self.warmup = _bool(greedy_check, "greedy_check"), _bool(warmup, "warmup")
        self.elbo = None
        if diffusion is not None:
            objective = elbo_objective(diffusion, masking, _bool(mc_complementary, "mc_complementary"),
                                       self.model.config.mask_token_id)
            self.elbo = likelihood.ElboPlan(objective, copies=1, valid_vocab=self.loaded.valid_vocab_size)
        self.mc_samples, self.mc_batch = int(mc_samples), int(mc_batch) or None
        pairs = 2 if self.elbo is not None and self.elbo.objective.complementary else 1
        for name, value in (("mc_samples", self.mc_samples), ("mc_batch", self.mc_batch or pairs)):
            if value < pairs or value % pairs:
                raise UserError(f"model_args: {name} must be a positive" + (" even number (complementary pairs; "
                                "mc_complementary=false for any count)" if pairs == 2 else " integer") + f", got {value}")
        self.stats = {"generate": {"requests": 0, "generated_tokens": 0, "row_forwards": 0, "program_seconds": 0.0,
                                   "batches": 0},
                      "loglikelihood": {"requests": 0, "tokens": 0, "program_calls": 0}}
        self._stderr_sum = 0.0  # dLM: sum of the requests' Monte Carlo standard errors

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "EdlmLM":
        """lm-eval's constructor path; settings in --model_args win over lm-eval's own (--batch_size ...)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "EdlmLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokenizer ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        cfg = self.model.config
        return int(next(t for t in (cfg.eos_token_id, cfg.pad_token_id, 0) if t is not None))

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.tokenizer_dir.replace("/", "__")

    def _hf_tokenizer(self):
        from transformers import AutoTokenizer  # only for chat templates (the test/eval extras)

        return AutoTokenizer.from_pretrained(self.loaded.tokenizer_dir)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = self._hf_tokenizer().chat_template
        if template is None:
            raise UserError(f"--apply_chat_template: the tokenizer in {self.loaded.tokenizer_dir} has no chat template")
        return chat_template if isinstance(chat_template, str) else template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._hf_tokenizer().apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)

    # ---- generation ---------------------------------------------------------------------------

    def _settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """generate() keyword arguments and stop strings for one request group's gen_kwargs."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        settings = dict(self.decoding)
        settings["max_new_tokens"] = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", settings["temperature"] if do_sample else 0.0))
        settings["temperature"] = temperature if do_sample or temperature > 0 else 0.0
        for key in ("top_p", "top_k"):
            if key in kwargs:
                settings[key] = type(settings[key])(kwargs.pop(key))
        if kwargs:
            raise UserError(f"generation_kwargs: unsupported key(s) {', '.join(sorted(kwargs))} for --model edlm")
        if self.loaded.diffusion is not None and settings["strategy"] != "ar":
            settings["token_shift"] = self.loaded.diffusion.token_shift
        else:
            settings.pop("block_size")
        settings["valid_vocab_size"] = self.loaded.valid_vocab_size
        settings.update(self.speculative)
        return settings, until

    def _prompt_ids(self, context: str, max_new: int) -> list[int]:
        ids = self.tok_encode(context)
        keep = self.max_length - max_new
        if keep < 1:
            raise UserError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} positions")
        return ids[-keep:] or [self.eot_token_id]

    def _text(self, ids: list[int], until: list[str]) -> str:
        if ids and ids[-1] == self.eot_token_id:
            ids = ids[:-1]
        text = self.tok_decode(ids)
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text

    def _generate_group(self, prompts: list[list[int]], settings: dict) -> list[list[int]]:
        """Generated ids per prompt, `batch_size` prompts per call (the last batch padded by repetition)."""
        size = min(self.batch_size, len(prompts))
        bucket = 1 << (max(len(p) for p in prompts) - 1).bit_length()
        batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        stats, out = self.stats["generate"], []
        if self.warmup:
            generate(self.model, batches[0] + [batches[0][-1]] * (size - len(batches[0])), prompt_bucket=bucket, **settings)
        for batch in batches:
            real = len(batch)
            result = generate(self.model, batch + [batch[-1]] * (size - real), prompt_bucket=bucket, **settings)
            out += result.sequences[:real]
            stats["generated_tokens"] += int(result.lengths[:real].sum())
            stats["row_forwards"] += int(result.row_forwards[:real].sum())
            stats["program_seconds"] += result.program_seconds
            stats["batches"] += 1
        stats["requests"] += len(prompts)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        texts: list[str | None] = [None] * len(requests)
        for key, indices in groups.items():
            settings, until = self._settings(json.loads(key))
            prompts = [self._prompt_ids(requests[i].args[0], settings["max_new_tokens"]) for i in indices]
            for i, ids in zip(indices, self._generate_group(prompts, settings)):
                texts[i] = self._text(ids, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        return texts

    # ---- scoring ------------------------------------------------------------------------------

    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """dLM is_greedy: greedy decoding of each context (the model's strategy) yields the continuation."""
        settings, _ = self._settings({"max_gen_toks": max(len(c) for _, c in pairs), "do_sample": False})
        prompts = [ctx[-(self.max_length - settings["max_new_tokens"]):] or [self.eot_token_id] for ctx, _ in pairs]
        size = min(self.batch_size, len(prompts))
        bucket = 1 << (max(len(p) for p in prompts) - 1).bit_length()
        hits = []
        for i in range(0, len(prompts), size):
            batch = prompts[i : i + size]
            result = generate(self.model, batch + [batch[-1]] * (size - len(batch)), prompt_bucket=bucket,
                              stop_tokens=(), **settings)
            hits += [list(row[: len(cont)]) == list(cont) for row, (_, cont) in zip(result.tokens, pairs[i : i + size])]
        return hits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        if not pairs:
            return []
        if self.elbo is None:
            scores = likelihood.ar_loglikelihood(self.model, pairs, batch_size=self.batch_size, prefix_id=self.prefix_token_id)
            greedy = scores.greedy.tolist()
        else:
            scores = likelihood.dlm_loglikelihood(
                self.model, self.elbo, pairs, batch_size=self.batch_size, samples=self.mc_samples,
                seed=self.decoding["seed"], prefix_id=self.prefix_token_id, samples_per_call=self.mc_batch)
            greedy = self._greedy(pairs) if self.greedy_check else [False] * len(pairs)
            self._stderr_sum += float(scores.stderr.sum())
        stats = self.stats["loglikelihood"]
        stats["requests"] += len(pairs)
        stats["tokens"] += scores.tokens
        stats["program_calls"] += scores.forwards
        out = [(float(lp), bool(g)) for lp, g in zip(scores.logprob, greedy)]
        for (key, _, _), result in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---- reporting ----------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """Beside lm-eval's metrics: what was evaluated, how it decoded and scored, and how fast."""
        gen, ll = self.stats["generate"], self.stats["loglikelihood"]
        diffusion = self.loaded.diffusion
        info = {
            "ckpt": self.loaded.description,
            "kind": "ar" if diffusion is None else "dlm",
            "decoding": {**{k: v for k, v in self.decoding.items() if k in DECODING_KEYS},
                         **({"verifier": self._verifier_name, "draft_steps": self.speculative["draft_steps"]}
                            if self.speculative else {})},
            "generate": {**gen, "tokens_per_forward": gen["generated_tokens"] / max(gen["row_forwards"], 1),
                         "tokens_per_second": gen["generated_tokens"] / max(gen["program_seconds"], 1e-9)},
            "loglikelihood": {**ll, "method": "exact" if diffusion is None else "elbo"},
            "device": jax.devices()[0].platform,
        }
        if diffusion is not None:
            info["diffusion"] = {**vars(diffusion), "mc_samples": self.mc_samples,
                                 "mc_complementary": self.elbo.objective.complementary,
                                 "elbo_masking": self.elbo.objective.masking,
                                 "elbo_rates": [self.elbo.objective.rate_min, self.elbo.objective.rate_max]}
            if ll["requests"]:
                info["loglikelihood"]["mean_stderr"] = self._stderr_sum / ll["requests"]
        return {"edlm": info}


def task_dir() -> str:
    """The shipped task YAMLs (efficient_dlm/eval/tasks), added to every `edlm eval` run."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
