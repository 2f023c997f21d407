"""Evaluation in the field's harness: efficient_dlm models inside lm-evaluation-harness (lm-eval).

    loading.py     a checkpoint (orbax run / HF directory) with its tokenizer and training metadata
    likelihood.py  exact AR log-likelihood and the block-diffusion ELBO estimator (jitted, batched)
    lm.py          the lm-eval model `edlm` (generate_until, loglikelihood, loglikelihood_rolling)
    cli_eval.py    `edlm eval --ckpt DIR --tasks ...`
    tasks/         the demo's exact-match tasks as lm-eval YAMLs over shipped JSONL files

Only lm.py and cli_eval.py import lm_eval (the `eval` extra); the likelihood code does not need it.
"""
