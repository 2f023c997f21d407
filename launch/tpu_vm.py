#!/usr/bin/env python3
"""Run an `edlm` verb on a Cloud TPU VM or pod slice with gcloud: create, install, run, stream, delete.

    python launch/tpu_vm.py all --name=q8b --tpu=v5p-64 --zone=us-east5-a -- \
        --config=configs/qwen3_8b.py --config.init.hf_dir=/data/Qwen3-8B

Steps (each is also a sub-command): `create` (a TPU VM, or a queued resource with --queued, needed for
multi-slice and spot capacity), `install` (copy this checkout as a `git archive` to every worker and
`pip install` it with the TPU extra), `run` (start the verb on every worker with --worker=all,
detached, with EDLM_DISTRIBUTED=1 so `jax.distributed` connects them; stream worker 0's log until it
finishes; report every worker's exit code), `delete`. `--dry-run` prints every command and runs none.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from common import LOG_FILE, REPO_ROOT, Runner, edlm_command, prologue

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "efficient_dlm"
EXIT_FILE = "edlm_run.exit"
STEPS = ("create", "install", "run", "delete")


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def nodes(args, target) -> list[str]:
    """TPU VM names: one per slice (queued multi-slice resources name nodes <name>-<i>)."""
    return [args.name] if target.num_slices == 1 else [f"{args.name}-{i}" for i in range(target.num_slices)]


def create(run: Runner, args, target) -> None:
    runtime = args.runtime or RUNTIME[target.generation.name]
    if args.queued or target.num_slices > 1:
        count = ["--node-count", str(target.num_slices), "--node-prefix", args.name] if target.num_slices > 1 else ["--node-id", args.name]
        run(
            ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *count,
             f"--accelerator-type={target.accelerator_type}", f"--runtime-version={runtime}", *_where(args)]
            + (["--spot"] if args.spot else [])
        )
        # Blocks until the slice is ACTIVE (gcloud has no wait verb for queued resources).
        run(["bash", "-c", f"until gcloud compute tpus queued-resources describe {args.name} {' '.join(_where(args))} "
             "--format='value(state.state)' | grep -q ACTIVE; do sleep 30; done"])
    else:
        run(
            ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name,
             f"--accelerator-type={target.accelerator_type}", f"--version={runtime}", *_where(args)]
            + (["--spot"] if args.spot else [])
        )


def _ssh(node: str, args, worker: str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}", *_where(args), f"--command={command}"]


def install(run: Runner, args, target) -> None:
    archive = f"/tmp/{args.name}-edlm.tar.gz"
    run(["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
    setup = f"mkdir -p ~/{REMOTE_DIR} && tar xzf ~/edlm.tar.gz -C ~/{REMOTE_DIR} && python3 -m pip install -q -e \"$HOME/{REMOTE_DIR}[tpu]\""
    for node in nodes(args, target):
        run(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:~/edlm.tar.gz", "--worker=all", *_where(args)])
        run(_ssh(node, args, "all", setup))


def start(run: Runner, args, target) -> None:
    inner = f"cd ~/{REMOTE_DIR} && {edlm_command(args, target)}; echo $? > ~/{EXIT_FILE}"
    detached = f"rm -f ~/{EXIT_FILE}; nohup bash -c {shlex.quote(inner)} > ~/{LOG_FILE} 2>&1 < /dev/null &"
    for node in nodes(args, target):
        run(_ssh(node, args, "all", detached))
    follow = f"tail -n +1 -F ~/{LOG_FILE} & until [ -f ~/{EXIT_FILE} ]; do sleep 10; done; sleep 2; kill %1"
    run(_ssh(nodes(args, target)[0], args, "0", follow))
    for node in nodes(args, target):  # fails (non-zero) when any worker's run failed
        run(_ssh(node, args, "all", f"echo $(hostname): exit $(cat ~/{EXIT_FILE}); test $(cat ~/{EXIT_FILE}) = 0"))


def delete(run: Runner, args, target) -> None:
    if args.queued or target.num_slices > 1:
        run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, "--force", "--quiet", *_where(args)])
    else:
        run(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, "--quiet", *_where(args)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS + ("all",), help="one step, or all of them in order")
    parser.add_argument("--runtime", default=None, help="TPU VM runtime version (default per generation)")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--spot", action="store_true", help="spot capacity")
    parser.add_argument("--keep", action="store_true", help="with `all`: do not delete the TPU at the end")
    args, target, run = prologue(parser, argv)
    steps = {"create": create, "install": install, "run": start, "delete": delete}
    if args.step != "all":
        print(f"# {args.step}")
        steps[args.step](run, args, target)
        return 0
    try:
        for name in ("create", "install", "run"):
            print(f"# {name}")
            steps[name](run, args, target)
    finally:  # a failed run still gives the slice back
        if not args.keep:
            print("# delete")
            delete(run, args, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
