"""`edlm <verb>`: the command line. Each verb lives in the package that owns its work.

A verb module defines its absl flags at import time and a `run(config, flags)` function; only the
chosen verb's flags are registered while it runs, so verbs may reuse flag names (--out, --dtype). Every verb takes
`--config=configs/x.py` plus `--config.section.key=value` overrides (ml_collections config flags).
Failures the user can fix (efficient_dlm.errors.UserError: bad config, missing file, wrong shape)
print one line and exit 2 (EDLM_DEBUG=1: with the traceback); any other exception is a bug and
shows its traceback. `main` can be called repeatedly in one process (tests): each call
sees only its verb's flags, at their defaults.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import sys
import warnings

from efficient_dlm.errors import UserError  # noqa: F401  (re-exported: verbs import it from here today)
from efficient_dlm.config import validate
from efficient_dlm.parallel.distributed import initialize

VERBS: dict[str, tuple[str, str]] = {
    # verb: (module, one-line help)
    "import-hf": ("efficient_dlm.port.cli_import", "convert a local Hugging Face model directory to an orbax checkpoint"),
    "export-hf": ("efficient_dlm.port.cli_export", "write a checkpoint as a Hugging Face directory (dLM: trust_remote_code)"),
    "demo": ("efficient_dlm.demo.cli_demo", "the embedded demo: convert the shipped AR teacher to a dLM, evaluate, export, report"),
    "ablate": ("efficient_dlm.demo.cli_ablate", "the Efficient-DLM ablations at demo scale (equal token budgets)"),
    "demo-data": ("efficient_dlm.demo.cli_data", "write the demo's data (stdlib text, generated tasks) and tokenizer"),
    "train": ("efficient_dlm.train.cli_train", "block-diffusion (or AR) continued pretraining; resumes from run_dir"),
    "sample": ("efficient_dlm.sample.cli_sample", "generate completions (block diffusion or AR) for prompts"),
    "quantize": ("efficient_dlm.sample.cli_quantize", "write an int8 / fp8 quantized checkpoint (qwix) for inference"),
    "bench": ("efficient_dlm.sample.cli_bench", "AR vs dLM decoding: tokens/s, tokens per forward, latency, memory"),
    "eval": ("efficient_dlm.eval.cli_eval", "lm-evaluation-harness tasks on a checkpoint (the lm-eval model `edlm`)"),
    "serve": ("efficient_dlm.serve.cli_serve", "OpenAI-compatible HTTP server with continuous batching (dLM or AR)"),
    "aot": ("efficient_dlm.aot.cli_aot", "compile train step and sampler for a TPU topology: memory per chip, FLOPs"),
}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/tiny.py"


def resolve_config_path(path: str) -> str:
    """configs/x.py relative to the working directory, else relative to the repository root."""
    spec, colon, rest = path.partition(":")
    if os.path.exists(spec):
        return path
    candidate = os.path.join(REPO_ROOT, spec)
    return candidate + colon + rest if os.path.exists(candidate) else path


def _rewrite_config_args(args: list[str]) -> list[str]:
    """Resolves --config=PATH[:ARG] (see resolve_config_path); a missing recipe file is a UserError."""
    out = []
    for arg in args:
        if arg.startswith("--config="):
            path = resolve_config_path(arg[len("--config="):])
            if not os.path.isfile(path.partition(":")[0]):
                raise UserError(f"--config: recipe file {path.partition(':')[0]!r} not found")
            arg = "--config=" + path
        out.append(arg)
    return out


def _usage() -> str:
    lines = ["usage: edlm <verb> [--config=configs/x.py] [--config.key=value ...] [flags]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`edlm <verb> --help` lists a verb's flags."]
    return "\n".join(lines)


# Flags each verb module defined on its first import (absl Flag objects), re-registered per call.
_VERB_FLAGS: dict[str, list] = {}


def _deactivate_verb_flags() -> None:
    """Unregisters every verb module's flags and the --config flag with its --config.key overrides."""
    from absl import flags

    registry = flags.FLAGS
    by_module = registry.flags_by_module_dict()
    for module_name, _ in VERBS.values():  # verb modules imported outside main (tests) defined flags too
        if module_name in sys.modules and module_name not in _VERB_FLAGS:
            _VERB_FLAGS[module_name] = list(by_module.get(module_name, []))
    owned = [flag for verb_flags in _VERB_FLAGS.values() for flag in verb_flags]
    owned += [registry[name] for name in registry if name == "config" or name.startswith("config.")]
    for flag in owned:
        if flag.name in registry and registry[flag.name] is flag:
            delattr(registry, flag.name)


def _activate_verb_flags(module_name: str):
    """Imports the verb's module and leaves exactly its flags (at their defaults) registered.

    absl keeps one global flag registry. Verb modules define their flags at import time, so two verbs
    may both define e.g. --out, and a second in-process `main` (tests, notebooks) would see the
    previous call's values. We therefore unregister every verb's flags, register only the chosen
    verb's and reset them to their defaults; `main` unregisters them again when it returns.
    """
    from absl import flags

    _deactivate_verb_flags()
    module = importlib.import_module(module_name)  # defines its flags on the first import only
    if module_name in _VERB_FLAGS:
        for flag in _VERB_FLAGS[module_name]:
            flags.DEFINE_flag(flag, flags.FLAGS, module_name=module_name)
    else:
        _VERB_FLAGS[module_name] = list(flags.FLAGS.flags_by_module_dict().get(module_name, []))
    for flag in _VERB_FLAGS[module_name]:
        flag.unparse()
    return module


def _verb_help(verb: str, module) -> str:
    from absl import flags

    doc = (module.__doc__ or "").strip().splitlines()
    lines = [doc[0] if doc else VERBS[verb][1], "", f"usage: edlm {verb} [--config=configs/x.py] [--config.key=value ...] [flags]"]
    lines += ["", flags.FLAGS.module_help(module.__name__) or "(no flags of its own)"]
    return "\n".join(lines)


def _plain_text(err: Exception) -> str:
    """The error's message as one would read it: a KeyError's repr-quoted text unquoted."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return text


def _flag_error_message(err: Exception, args: list[str]) -> str:
    """One line for a failed flag parse; names the offending --config.key (or section) when that is
    the cause, with ml_collections' "did you mean" suggestion."""
    text = _plain_text(err)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    if "string indices must be" in text or "does not support indexing" in text:
        nested = [a.lstrip("-").split("=")[0] for a in args if a.lstrip("-").startswith("config.") and a.count(".") >= 3]
        if nested:  # --config.model.dtype.x=1: dtype is a value, not a section
            parts = nested[0].removeprefix("config.").split(".")
            return f"--{nested[0]}: config key {'.'.join(parts[:-1])!r} is a value, not a section"
    for arg in args:
        body = arg.lstrip("-")
        if not body.startswith("config."):
            continue
        key = body.split("=")[0].removeprefix("config.")
        parts = key.split(".")
        if f"'config.{key}'" in text:
            index = len(parts) - 1
        elif isinstance(err, (KeyError, AttributeError)):
            index = next((i for i, part in enumerate(parts) if f"'{part}'" in text or text.split("\n")[0] == part), None)
        else:
            index = None
        if index is None:
            continue
        hint = ""
        if suggestion:
            hint = f"did you mean {'.'.join(parts[:index] + [suggestion.group(1)])!r}? "
        if index == 0 and len(parts) > 1:
            return f"unknown config section {parts[0]!r} in --config.{key} ({hint}see efficient_dlm/config.py)"
        where = ".".join(parts[: index + 1])
        return f"unknown config key {where!r} ({hint or 'not in the recipe' + chr(39) + 's schema; '}see efficient_dlm/config.py)"
    return " ".join(text.split())


def _parse_config(args: list[str], default_config: str):
    """Parses flags and the --config recipe with its overrides; returns the validated ConfigDict."""
    from absl import flags
    from ml_collections import config_flags


    try:
        with warnings.catch_warnings():  # ml_collections loads recipes with the deprecated load_module()
            warnings.filterwarnings("ignore", r"the load_module\(\) method is deprecated", DeprecationWarning)
            # sys_argv: the config flag reads its --config.key overrides from there (default: sys.argv).
            config_flags.DEFINE_config_file("config", default_config, "recipe file (configs/*.py)", sys_argv=args)
            flags.FLAGS(args)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as err:
        raise UserError(_flag_error_message(err, args)) from err
    return validate(flags.FLAGS.config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb = argv[1]
    if verb not in VERBS:
        print(f"edlm: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = _activate_verb_flags(VERBS[verb][0])
    try:
        return _run_verb(verb, module, argv[2:])
    finally:
        _deactivate_verb_flags()


_INVOCATION = ""


def invocation() -> str:
    """The running verb's command line as typed (`edlm demo --out X --config.k=v`), for reports."""
    return _INVOCATION


def _run_verb(verb: str, module, argv: list[str]) -> int:
    from absl import flags

    global _INVOCATION
    _INVOCATION = shlex.join(["edlm", verb, *argv])

    if any(arg in ("-h", "--help", "--helpfull") for arg in argv):
        print(_verb_help(verb, module))
        return 0
    try:
        args = ["edlm " + verb] + _rewrite_config_args(argv)
        config = _parse_config(args, resolve_config_path(getattr(module, "DEFAULT_CONFIG", DEFAULT_CONFIG)))
        if getattr(module, "MULTI_HOST", True):  # jax.distributed when the environment asks for it

            initialize()
        result = module.run(config, flags.FLAGS)
    except UserError as err:  # only mistakes the user can fix: every other exception keeps its traceback
        if os.environ.get("EDLM_DEBUG"):
            raise
        print(f"edlm {verb}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
