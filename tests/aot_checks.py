"""AOT compilation of the tiny config for a TPU topology through libtpu, run as ONE subprocess by
tests/test_parallel.py (libtpu must load in a fresh process).

Usage: python tests/aot_checks.py OUT_DIR. Prints "ok <name>" per check.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

from efficient_dlm import cli  # noqa: E402
from efficient_dlm.config import override, typed  # noqa: E402


def check_cli_report(out_dir: str) -> None:
    """`edlm aot` on v5p-8 (4 chips) for the train step, the sampler and the serving step: memory parts add
    up, the train state and the serving cache are donated, shardings follow the rules (the serving slots over
    the data axes), and --hbm_limit fails the program above it (exit 1)."""
    path = os.path.join(out_dir, "aot.json")
    argv = ["edlm", "aot", "--config=configs/tiny.py", "--topology=v5p-8", "--config.model.num_layers=3",
            "--config.model.scan_layers=False", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--hbm_limit=0.0003",
            "--programs=train,sample,serve", "--serve_slots=4", "--serve_max_prompt_tokens=16",
            f"--json_out={path}"]
    sys.argv = argv  # ml_collections reads --config.* overrides from sys.argv
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    text = out.getvalue()
    print(text)
    with open(path) as f:
        results = json.load(f)
    assert set(results) == {"train", "sample", "serve"}, results.keys()
    for name, r in results.items():
        mem = r["memory"]
        assert mem["total"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
        assert 0 < r["hbm_fraction"] < 0.9 and r["chips"] == 4 and r["hbm_bytes"] == 95 * 2**30, r
        assert r["mesh"] == "data=1 fsdp=2 tensor=2 expert=1", r["mesh"]
        specs = {row["path"]: row["spec"] for row in r["largest"]}
        embed = next(spec for path, spec in specs.items() if path.endswith("embed_tokens/value"))
        assert embed == "P('tensor', 'fsdp')", (name, embed)  # (vocab, embed) by the rules table
    train, sample, serve = results["train"], results["sample"], results["serve"]
    assert serve["memory"]["aliased"] > 0, "the serving KV cache must be donated (updated in place)"
    assert serve["notes"]["slots"] == 4 and serve["notes"]["max_prompt_tokens"] == 16, serve["notes"]
    block = serve["notes"]["block_size"]  # widest chunk: the prompt capacity in whole blocks (at least one) + a block
    assert serve["notes"]["chunk_width"] == max(16 // block, 1) * block + block, serve["notes"]
    cache = next(row for row in serve["largest"] if row["path"].startswith("cache/k"))
    assert cache["shape"][1] == 4 and cache["spec"].startswith("P(None, 'fsdp'"), cache  # slots over the data axes
    assert train["memory"]["aliased"] > 0, "the train state must be donated (updated in place)"
    assert sample["flops_per_chip"] is None and sample["notes"]["cache_size"] == 128 + 64, sample["notes"]
    # --hbm_limit=0.0003 (29 MiB): the train step is over it, the sampler under it.
    over = [name for name, r in results.items() if r["hbm_fraction"] > 0.0003]
    assert code == (1 if over else 0) and text.count("DOES NOT FIT") == len(over), (code, over)
    assert over == ["train"], {n: r["memory"]["total"] for n, r in results.items()}
    assert "of HBM > --hbm_limit=0.0003. Try: --config.model.remat_policy=full" in text, text
    print("ok cli_report")
    return results


def check_flops_extrapolation(results) -> None:
    """The depth-1/depth-2 extrapolation matches XLA's count for the whole program unrolled (the CLI
    run compiled the 3 layers unrolled: scan_layers=False)."""
    train = results["train"]
    got, direct = train["flops_per_chip"], train["xla_flops_per_chip"]
    assert abs(got - direct) <= 1e-4 * direct, (got, direct)
    assert train["flops_method"] == "whole batch, layers extrapolated", train["flops_method"]
    print("ok flops_extrapolation")


def check_flops_per_shard_estimate(results) -> None:
    """The fallback for batches whose plain-loss program does not fit: scaled from 1 row per batch shard,
    within 2% of XLA's count for the same (3-layer, batch-8) program."""
    from efficient_dlm.aot import compiler as aot
    from efficient_dlm.parallel import mesh as mesh_lib
    from efficient_dlm.parallel.topology import parse

    sys.path.insert(0, os.path.join(cli.REPO_ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    config.model.num_layers, config.mesh.fsdp, config.mesh.tensor = 3, 2, 2
    config = typed(config)  # what `edlm aot` hands the compiler
    mesh = mesh_lib.make_mesh(config.mesh, aot.tpu_devices(parse("v5p-8")))
    got, method = aot.train_flops(config, mesh, mesh_lib.config_rules(config.mesh), per_shard=True)
    direct = results["train"]["xla_flops_per_chip"]
    assert method.endswith("1 row per shard") and abs(got - direct) <= 2e-2 * direct, (got, direct)
    print("ok flops_per_shard_estimate")


def check_speculative_sampler(results) -> None:
    """The speculative program (dLM drafter + AR verifier of the same architecture, both caches) compiles for
    v5p-8 like the plain sampler, and holds both models' weights: its arguments exceed the plain sampler's
    by at least one more copy of the parameters."""
    from efficient_dlm.aot import compiler as aot
    from efficient_dlm.parallel import mesh as mesh_lib
    from efficient_dlm.parallel.topology import parse

    sys.path.insert(0, os.path.join(cli.REPO_ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    config.model.num_layers, config.model.scan_layers, config.mesh.fsdp, config.mesh.tensor = 3, False, 2, 2
    config.sample.strategy = "speculative"
    config = typed(config)  # what `edlm aot` hands the compiler
    target = parse("v5p-8")
    mesh = mesh_lib.make_mesh(config.mesh, aot.tpu_devices(target))
    program = aot.sample_program(config, mesh)
    compiled = aot.compile_or_explain(program, mesh, mesh_lib.config_rules(config.mesh), config, target)
    result = aot.report(compiled, target, program, None)
    plain = results["sample"]["memory"]  # its arguments: one model's weights plus small inputs
    assert result["memory"]["arguments"] > 1.8 * plain["arguments"], (result["memory"], plain)
    assert program.notes["strategy"] == "speculative" and 0 < result["hbm_fraction"] < 0.9, program.notes
    # Self-verification (the recipe's default decoding, recorded in its spec): one set of weights.
    config = override(config, {"sample.strategy": "self_speculative"})
    program = aot.sample_program(config, mesh)
    compiled = aot.compile_or_explain(program, mesh, mesh_lib.config_rules(config.mesh), config, target)
    single = aot.report(compiled, target, program, None)["memory"]["arguments"]
    assert program.notes["strategy"] == "speculative" and single < 1.3 * plain["arguments"], (single, plain)
    print("ok speculative_sampler")


def check_does_not_fit(out_dir: str) -> None:
    """A training batch far beyond v5e HBM: the compiler's out-of-memory error becomes one line
    naming what to change."""
    from efficient_dlm.cli import UserError
    from efficient_dlm.aot import compiler as aot
    from efficient_dlm.parallel import mesh as mesh_lib
    from efficient_dlm.parallel.topology import parse

    sys.path.insert(0, os.path.join(cli.REPO_ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    config.model.num_layers = 1
    config.train.batch_size = 1 << 16
    config = typed(config)  # what `edlm aot` hands the compiler
    target = parse("v5e-4")
    mesh = mesh_lib.make_mesh(config.mesh, aot.tpu_devices(target))
    program = aot.train_program(config, mesh)
    try:
        aot.compile_or_explain(program, mesh, None, config, target)
    except UserError as err:
        message = str(err)
        assert message.startswith("train_step does not fit on v5litepod-4 (v5e:2x2: 4 chips"), message
        assert "Ran out of memory" in message and "Try: shard over more chips" in message, message
        assert "--config.model.remat_policy=full" in message and "train.batch_size below 65536" in message, message
        print("ok does_not_fit")
        return
    raise AssertionError("a 65536 x 256-token training batch compiled for 4 v5e chips")


def main(out_dir: str) -> None:
    os.chdir(cli.REPO_ROOT)
    results = check_cli_report(out_dir)
    check_flops_extrapolation(results)
    check_flops_per_shard_estimate(results)
    check_speculative_sampler(results)
    check_does_not_fit(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
