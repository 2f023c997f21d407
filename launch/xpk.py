#!/usr/bin/env python3
"""Run an `edlm` verb on a GKE TPU cluster with xpk: build and push an image, create the workload,
stream worker 0's log, delete the workload.

    python launch/xpk.py all --name=q8b --tpu=v5p-512 --zone=us-east5-a --cluster=my-cluster \
        --image=gcr.io/my-project/edlm:latest -- --config=configs/qwen3_8b.py

xpk creates one pod per TPU host (JobSet); every pod runs the same command with EDLM_DISTRIBUTED=1,
so `jax.distributed` auto-detects the cluster. `--dry-run` prints every command and runs none.
"""
from __future__ import annotations

import argparse
import sys

from common import REPO_ROOT, Runner, edlm_command, prologue

STEPS = ("build", "create", "logs", "delete")


def _cluster(args) -> list[str]:
    return [f"--cluster={args.cluster}", f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def build(run: Runner, args, target) -> None:
    run(["docker", "build", "-f", f"{REPO_ROOT}/launch/Dockerfile", "-t", args.image, REPO_ROOT])
    run(["docker", "push", args.image])


def create(run: Runner, args, target) -> None:
    run(
        ["xpk", "workload", "create", f"--workload={args.name}", f"--tpu-type={target.accelerator_type}",
         f"--num-slices={target.num_slices}", f"--docker-image={args.image}", *_cluster(args),
         f"--command={edlm_command(args, target)}"]
    )


def logs(run: Runner, args, target) -> None:
    worker0 = f"jobset.sigs.k8s.io/jobset-name={args.name},jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    run(["kubectl", "wait", "--for=condition=Ready", "pod", "-l", worker0, "--timeout=1h"])
    run(["kubectl", "logs", "-f", "-l", worker0])


def delete(run: Runner, args, target) -> None:
    run(["xpk", "workload", "delete", f"--workload={args.name}", *_cluster(args)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS + ("all",), help="one step, or all of them in order")
    parser.add_argument("--cluster", required=True, help="GKE cluster made with `xpk cluster create`")
    parser.add_argument("--image", required=True, help="container image to build and run, e.g. gcr.io/p/edlm:tag")
    args, target, run = prologue(parser, argv)
    steps = {"build": build, "create": create, "logs": logs, "delete": delete}
    for name in STEPS if args.step == "all" else (args.step,):
        print(f"# {name}")
        steps[name](run, args, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
