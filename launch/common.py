"""Shared pieces of the launch scripts: argument plumbing, the `edlm` command line, and a runner that
either executes commands or, with --dry-run, prints every one of them (and runs nothing).

Standard library only: these scripts run on the user's laptop next to `gcloud` / `xpk`, without JAX.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from efficient_dlm.parallel.topology import TpuSlice, parse  # noqa: E402  (pure Python, no JAX)

LOG_FILE = "edlm_run.log"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="TPU / workload name")
    parser.add_argument("--tpu", required=True, help="slice type, e.g. v5p-256, v5e-64, v6e-256, v4-128")
    parser.add_argument("--num_slices", type=int, default=1, help="multi-slice count (DCN)")
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--zone", required=True, help="zone, e.g. us-east5-a")
    parser.add_argument("--verb", default="train", help="edlm verb to run on every worker (default: train)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="print every command, run nothing")
    parser.epilog = "Arguments after `--` go to the edlm verb, e.g. -- --config=configs/qwen3_8b.py"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Our flags before `--`, the edlm verb's arguments after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.edlm_args = argv[cut + 1 :]
    return args


def prologue(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, TpuSlice, "Runner"]:
    """Both launchers' prologue: the shared flags added and parsed, the slice resolved (a bad --tpu is
    one argparse error line), the runner made and the plan's header printed."""
    add_common_args(parser)
    args = parse_args(parser, argv)
    try:
        target = parse(args.tpu, args.num_slices)
    except ValueError as err:
        parser.error(str(err))
    print(plan_header(target))
    return args, target, Runner(args.dry_run)


def edlm_command(args, target: TpuSlice) -> str:
    """The command every worker runs: multi-host on, with the process count it must see."""
    extra = args.edlm_args
    env = f"EDLM_DISTRIBUTED=1 EDLM_EXPECTED_PROCESSES={target.hosts * target.num_slices}"
    return f"{env} python3 -m efficient_dlm.cli {args.verb} {' '.join(shlex.quote(a) for a in extra)}".strip()


def plan_header(target: TpuSlice) -> str:
    per_host = target.chips // target.hosts
    return (
        f"# {target.describe()}\n"
        f"# {target.hosts * target.num_slices} workers x {per_host} chips; every worker runs the same program"
    )


class Runner:
    """Runs (or, when dry, prints) shell commands in order; stops at the first failure."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str], *, check: bool = True) -> int:
        line = " ".join(shlex.quote(a) for a in argv)
        print(line if self.dry_run else f"+ {line}", flush=True)
        if self.dry_run:
            return 0
        code = subprocess.call(argv)
        if check and code:
            raise SystemExit(f"command failed with exit code {code}: {line}")
        return code
