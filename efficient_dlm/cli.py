"""`edlm <verb>`: the command line. Each verb lives in the package that owns its work.

A verb module defines its absl flags at import time and a `run(config, flags)` function; only the
chosen verb's module is imported, so verbs never collide on flag names. Every verb takes
`--config=configs/x.py` plus `--config.section.key=value` overrides (ml_collections config flags).
Failures the user can fix (bad config, missing file, wrong shape) print one line and exit 2; set
EDLM_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

VERBS: dict[str, tuple[str, str]] = {
    # verb: (module, one-line help)
    "import-hf": ("efficient_dlm.port.cli_import", "convert a local Hugging Face model directory to an orbax checkpoint"),
    "export-hf": ("efficient_dlm.port.cli_export", "write a checkpoint as a Hugging Face directory (dLM: trust_remote_code)"),
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
    out = []
    for arg in args:
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg[len("--config="):])
        out.append(arg)
    return out


def _usage() -> str:
    lines = ["usage: edlm <verb> [--config=configs/x.py] [--config.key=value ...] [flags]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`edlm <verb> --helpfull` lists a verb's flags."]
    return "\n".join(lines)


class UserError(Exception):
    """An error whose message is the whole story (no traceback)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb = argv[1]
    if verb not in VERBS:
        print(f"edlm: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from absl import flags
    from ml_collections import config_flags

    module = importlib.import_module(VERBS[verb][0])
    default = resolve_config_path(getattr(module, "DEFAULT_CONFIG", DEFAULT_CONFIG))
    config_flags.DEFINE_config_file("config", default, "recipe file (configs/*.py)", lock_config=True)
    try:
        flags.FLAGS(["edlm " + verb] + _rewrite_config_args(argv[2:]))
    except flags.Error as err:
        print(f"edlm {verb}: error: {err}", file=sys.stderr)
        return 2
    try:
        from efficient_dlm.config import validate

        config = validate(flags.FLAGS.config)
        result = module.run(config, flags.FLAGS)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        if os.environ.get("EDLM_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"edlm {verb}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
