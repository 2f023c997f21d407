"""AOT compilation of the tiny config for a TPU topology through libtpu, run as ONE subprocess by
tests/test_parallel.py (libtpu must load in a fresh process).

Usage: python tests/aot_checks.py OUT_DIR. Prints "ok <name>" per check.
"""
from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

from efficient_dlm import cli  # noqa: E402


def check_cli_report(out_dir: str) -> None:
    """`edlm aot` on v5p-8 (4 chips) for the train step: memory parts add up, the state is donated,
    shardings follow the rules."""
    path = os.path.join(out_dir, "aot.json")
    argv = ["edlm", "aot", "--config=configs/tiny.py", "--topology=v5p-8", "--config.model.num_layers=3",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--programs=train", f"--json_out={path}"]
    sys.argv = argv  # ml_collections reads --config.* overrides from sys.argv
    code = cli.main(argv)
    assert code == 0, code
    with open(path) as f:
        results = json.load(f)
    assert set(results) == {"train"}, results.keys()  # the sampler compiles in check_does_not_fit
    for name, r in results.items():
        mem = r["memory"]
        assert mem["total"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
        assert 0 < r["hbm_fraction"] < 0.9 and r["chips"] == 4 and r["hbm_bytes"] == 95 * 2**30, r
        assert r["mesh"] == "data=1 fsdp=2 tensor=2 expert=1", r["mesh"]
    train = results["train"]
    assert train["memory"]["aliased"] > 0, "the train state must be donated (updated in place)"
    specs = {row["path"]: row["spec"] for row in train["largest"]}
    embed = next(spec for path, spec in specs.items() if path.endswith("embed_tokens/value"))
    assert embed == "P('tensor', 'fsdp')", embed  # (vocab, embed) by the rules table
    print("ok cli_report")
    return results


def check_flops_extrapolation(results) -> None:
    """The depth-1/depth-2 extrapolation matches XLA's count for the whole program unrolled."""
    from efficient_dlm.config import validate
    from efficient_dlm.parallel import aot
    from efficient_dlm.parallel import mesh as mesh_lib
    from efficient_dlm.parallel.topology import parse

    sys.path.insert(0, os.path.join(cli.REPO_ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    config.model.num_layers, config.model.scan_layers = 3, False
    config.mesh.fsdp, config.mesh.tensor = 2, 2
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh, aot.tpu_devices(parse("v5p-8")))
    compiled = aot.train_program(config, mesh).compile(mesh, mesh_lib.config_rules(config.mesh))
    direct = aot._flops(compiled)
    got = results["train"]["flops_per_chip"]
    assert abs(got - direct) <= 1e-4 * direct, (got, direct)
    print("ok flops_extrapolation")


def check_does_not_fit(out_dir: str) -> None:
    """A KV cache far beyond v5e HBM: exit code 2 and one line naming what to change."""
    from efficient_dlm.cli import UserError
    from efficient_dlm.parallel import aot
    from efficient_dlm.parallel import mesh as mesh_lib
    from efficient_dlm.parallel.topology import parse

    sys.path.insert(0, os.path.join(cli.REPO_ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    target = parse("v5e-4")
    mesh = mesh_lib.make_mesh(config.mesh, aot.tpu_devices(target))
    program = aot.sample_program(config, mesh, batch=64, context=1 << 22)
    try:
        aot.compile_or_explain(program, mesh, None, config, target)
    except UserError as err:
        message = str(err)
        assert message.startswith("sample_step does not fit on v5litepod-4 (v5e:2x2: 4 chips"), message
        assert "Ran out of memory" in message and "Try: shard over more chips" in message and "--sample_batch" in message
        print("ok does_not_fit")
        return
    raise AssertionError("a 64 x 4M-slot KV cache compiled for 4 v5e chips")


def main(out_dir: str) -> None:
    os.chdir(cli.REPO_ROOT)
    results = check_cli_report(out_dir)
    check_flops_extrapolation(results)
    check_does_not_fit(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
