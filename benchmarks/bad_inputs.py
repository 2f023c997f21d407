"""The bad-input matrix (issue #18): 161 distinct bad inputs and faults, through the CLI and the API, on
tiny models, each classified as

    clear      the command exits 2 with one `edlm <verb>: error: ...` line (API: a UserError with a
               one-line message), or a signal stop that exits
               with its code, a checkpoint and a line saying where to resume
    traceback  any other exception, a traceback in the output, a multi-line or escaped message
    silent     the bad input was accepted (exit 0 / no exception) or the command hung

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/bad_inputs.py [--json out.json] [--quick]

--quick skips the three cases that train in a subprocess (SIGINT, SIGTERM, divergence guard).
Prints one line per case and the counts per category and outcome. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import efficient_dlm as edlm  # noqa: E402
from efficient_dlm import checkpoints, cli  # noqa: E402
from efficient_dlm.config import to_plain  # noqa: E402
from efficient_dlm.data.byte_tokenizer import ASSET_DIR as BYTE_TOKENIZER  # noqa: E402
from efficient_dlm.errors import UserError  # noqa: E402

CASE_TIMEOUT_S = 120
TINY = dict(model_type="qwen3", qk_norm=True, vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=16, eos_token_id=1, pad_token_id=0)
TRAIN = ["--config=configs/tiny_train.py", "--config.data.seq_len=32", "--config.diffusion.block_size=4",
         "--config.train.steps=2", "--config.train.batch_size=2", "--config.train.progress=False",
         "--config.train.tensorboard=False", "--config.data.num_threads=1", "--config.model.num_layers=1",
         "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.head_dim=16"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def one_line_error(text: str, verb: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (bool(lines) and lines[-1].startswith(f"edlm {verb}: error: ") and "Traceback" not in text
            and "\\n" not in lines[-1] and "\\'" not in lines[-1])


def run_cli(args: list[str]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["edlm", *args])
    except Hang:
        return "silent", "hung"
    except BaseException as exc:  # noqa: BLE001  (anything escaping main is a traceback for the user)
        return "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
    text = err.getvalue()
    if code == 0:
        return "silent", "exit 0"
    if code == 2 and one_line_error(text, args[0]):
        return "clear", text.strip().splitlines()[-1]
    return "traceback", f"exit {code}: {text.strip()[-300:]}"


def run_api(fn) -> tuple[str, str]:
    try:
        fn()
    except Hang:
        return "silent", "hung"
    except UserError as exc:  # the project's one error type for user mistakes (efficient_dlm/errors.py)
        text = str(exc)
        return ("clear" if "\n" not in text.strip() else "traceback"), f"{type(exc).__name__}: {text[:200]}"
    except BaseException as exc:  # noqa: BLE001
        return "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
    return "silent", "accepted"


# ---- fixtures -------------------------------------------------------------------------------------


class Fixtures:
    """Tiny checkpoints, a two-step training run directory and a HF directory, made once."""

    def __init__(self, root: str):
        from efficient_dlm.train.checkpointing import Checkpointer
        from efficient_dlm.train.optim import make_optimizer
        from efficient_dlm.train.state import TrainState, create_state

        self.root = root
        cfg = edlm.ModelConfig(**TINY, mask_token_id=511)
        self.model = edlm.init_model(cfg, seed=0)
        self.dlm = self.path("dlm")
        edlm.save(self.model, self.dlm, tokenizer_dir=BYTE_TOKENIZER)
        self.ar_model = edlm.init_model(edlm.ModelConfig(**TINY), seed=0)
        self.hf = self.path("hf")
        edlm.to_hf(self.ar_model, self.hf, tokenizer_dir=BYTE_TOKENIZER)
        recipe = cli.resolve_config_path("configs/tiny_train.py")
        from efficient_dlm.config import sibling_recipe

        train_config = sibling_recipe(recipe, "tiny_train")
        train_config.model.update(TINY | dict(mask_token_id=511))
        self.train_config = to_plain(train_config)
        self.tx_config = train_config.train

        def make_run(name: str) -> str:
            path = self.path(name)
            checkpoints.write_model_config(path, cfg, {"train_config": self.train_config})
            checkpoints.copy_tokenizer(BYTE_TOKENIZER, path)
            self.tx_config.keep_best = False
            ckpt = Checkpointer(path, self.tx_config)
            state = create_state(self.model, make_optimizer(self.tx_config), seed=0)
            for step in (1, 2):
                ckpt.save(TrainState(jnp.asarray(step), state.params, state.opt_state, state.rng), {})
            ckpt.close()
            return path

        self.make_run = make_run
        self.counter = 0
        self.good = self.write("good.jsonl", "".join(json.dumps({"text": f"doc {i} abc"}) + "\n" for i in range(50)))

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return self.path(f"{prefix}{self.counter}")

    def write(self, name: str, content) -> str:
        path = self.path(name)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def hf_variant(self, name: str, edit) -> str:
        """A copy of the HF directory with `edit(directory)` applied."""
        path = self.path(name)
        shutil.copytree(self.hf, path)
        edit(path)
        return path


def _edit_json(path: str, **changes):
    data = json.load(open(path))
    data.update(changes)
    json.dump(data, open(path, "w"))


def _biggest(root: str) -> str:
    files = [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n != "checksums.json"]
    return max(files, key=os.path.getsize)


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# ---- the cases ------------------------------------------------------------------------------------


def config_cases(fx: Fixtures):
    t = lambda *a: ("cli", ["train", *TRAIN, f"--config.data.train_files={fx.good}", f"--config.run_dir={fx.fresh('cfg')}", *a])  # noqa: E731
    return [(f"train {a}", *t(*a.split())) for a in [
        "--config.model.dtyp=x", "--config.trian.steps=1", "--config.foo.bar=1", "--config.foo=1",
        "--config.train.learning_rate=abc", "--config.train.learning_rate=-1e-3", "--config.train.learning_rate=0",
        "--config.train.learning_rate=nan", "--config.train.learning_rate=inf", "--config.train.steps=0",
        "--config.train.batch_size=-1", "--config.train.grad_accum=3", "--config.data.seq_len=1",
        "--config.diffusion.block_size=7", "--config.diffusion.objective=foo", "--config.diffusion.rate_min=0",
        "--config.model.num_heads=3 --config.model.num_kv_heads=2", "--config.model.dtype=float8",
        "--config.model.mask_token_id=1", "--config.model.pad_token_id=511", "--config.model.mask_token_id=100000", "--config=configs/nope.py",
        "--config.train.max_param_norm_ratio=0.5", "--config.train.min_lr_ratio=2", "--config.train.save_every=0",
        "--config.train.warmup_steps=-1", "--config.model.dtype.x=1", "--config.train.steps.x=1", "--config.diffusion.block_size_schedule=0:4,x", "--config.train.schedule=cosin",
    ]] + [("train init.hf_dir and init.checkpoint both", *t(f"--config.init.hf_dir={fx.hf}", f"--config.init.checkpoint={fx.dlm}"))]


def sampler_cli_cases(fx: Fixtures):
    s = lambda *a: ("cli", ["sample", f"--ckpt={fx.dlm}", "--prompt=ab", *a])  # noqa: E731
    knobs = ["--config.sample.temperature=nan", "--config.sample.temperature=inf", "--config.sample.temperature=-1",
             "--config.sample.top_p=nan", "--config.sample.top_p=0", "--config.sample.top_p=1.5",
             "--config.sample.threshold=nan", "--config.sample.threshold=1.5", "--config.sample.top_k=-1",
             "--config.sample.tokens_per_step=0", "--config.sample.max_new_tokens=0", "--config.sample.block_size=-1",
             "--config.sample.factor=inf", "--config.sample.entropy_bound=nan", "--config.sample.strategy=foo",
             "--batch_size=0", "--config.sample.top_k=100000"]
    return [(f"sample {a}", *s(a)) for a in knobs] + [("sample no prompt", "cli", ["sample", f"--ckpt={fx.dlm}"])]


def sampler_api_cases(fx: Fixtures):
    m, v = fx.model, fx.model.config.vocab_size
    g = lambda prompts, **kw: (lambda: edlm.generate(m, prompts, **({"max_new_tokens": 4, "block_size": 4} | kw)))  # noqa: E731
    return [(name, "api", fn) for name, fn in [
        ("generate temperature nan", g([[3, 4]], temperature=float("nan"))),
        ("generate temperature inf", g([[3, 4]], temperature=float("inf"))),
        ("generate top_p nan", g([[3, 4]], temperature=1.0, top_p=float("nan"))),
        ("generate threshold nan", g([[3, 4]], threshold=float("nan"))),
        ("generate factor nan", g([[3, 4]], strategy="factor", factor=float("nan"))),
        ("generate no prompts", g([])),
        ("generate empty prompt", g([[]])),
        ("generate float prompt ids", g([[3.7, 4.2]])),
        ("generate negative prompt id", g([[3, -1]])),
        ("generate prompt id = vocab", g([[3, v]])),
        ("generate string prompt", g(["hello"])),
        ("generate max_new_tokens 0", g([[3]], max_new_tokens=0)),
        ("generate max_new_tokens 2.5", g([[3]], max_new_tokens=2.5)),
        ("generate block_size 0", g([[3]], block_size=0)),
        ("generate unknown strategy", g([[3]], strategy="best")),
        ("generate stop token = vocab", g([[3]], stop_tokens=[v])),
        ("Model(tokens) id = vocab", lambda: m(np.array([[1, v]]))),
        ("Model(tokens) id -1", lambda: m(np.array([[1, -1]]))),
        ("Model(tokens) float ids", lambda: m(np.array([[1.0, 2.5]]))),
        ("Model(tokens) bool ids", lambda: m(np.array([[True, False]]))),
    ]]


def data_cases(fx: Fixtures):
    npy = lambda name, array: (np.save(fx.path(name), array), fx.path(name))[1]  # noqa: E731
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), fx.path("ints.parquet"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), fx.path("nulls.parquet"))
    os.mkdir(fx.path("dir.jsonl"))
    os.mkfifo(fx.path("fifo.jsonl"))
    good = fx.good
    files = {
        "text is an int": fx.write("int.jsonl", '{"text": "ok"}\n{"text": 12345}\n' * 20),
        "text is null": fx.write("null.jsonl", '{"text": null}\n' * 20),
        "text is a list": fx.write("list.jsonl", '{"text": ["a", "b"]}\n' * 20),
        "text is an object": fx.write("obj.jsonl", '{"text": {"a": 1}}\n' * 20),
        "text key missing": fx.write("nokey.jsonl", '{"body": "x"}\n' * 20),
        "line not JSON": fx.write("notjson.jsonl", '{"text": "ok"}\nnot json\n' * 20),
        "invalid UTF-8": fx.write("utf8.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n' * 20),
        "directory named x.jsonl": fx.path("dir.jsonl"),
        "FIFO named x.jsonl": fx.path("fifo.jsonl"),
        "empty file": fx.write("empty.jsonl", ""),
        "missing file": fx.path("missing.jsonl"),
        "unknown extension": fx.write("data.txt", "hello\n"),
        "npy negative ids": npy("neg.npy", np.array([3, -2, 1] * 50, np.int32)),
        "npy id >= vocab": npy("big.npy", np.array([3, 600, 1] * 50, np.int32)),
        "npy float dtype": npy("float.npy", np.array([3.0, 4.0, 1.0] * 50)),
        "npy 2-D": npy("twod.npy", np.ones((4, 50), np.int32)),
        "parquet int column": fx.path("ints.parquet"),
        "parquet null text": fx.path("nulls.parquet"),
        "glob matching nothing": fx.path("nothing*.jsonl"),
    }
    cases = [(f"data {name}", "cli", ["train", *TRAIN, f"--config.run_dir={fx.fresh('data')}", f"--config.data.train_files={path}"])
             for name, path in files.items()]
    base = ["train", *TRAIN, f"--config.data.train_files={good}"]
    cases += [
        ("data weights count mismatch", "cli", [*base, f"--config.run_dir={fx.fresh('data')}", "--config.data.train_weights=1,2"]),
        ("data negative weight", "cli", [*base, f"--config.run_dir={fx.fresh('data')}", "--config.data.train_weights=-1"]),
        ("data eval file is a directory", "cli", [*base, f"--config.run_dir={fx.fresh('data')}", f"--config.data.eval_files={fx.path('dir.jsonl')}"]),
        ("data tokenizer missing", "cli", [*base, f"--config.run_dir={fx.fresh('data')}", f"--config.init.tokenizer={fx.path('nope')}"]),
    ]
    return cases


def checkpoint_cases(fx: Fixtures):
    out = lambda: f"--out={fx.fresh('export')}"  # noqa: E731
    cases = []

    def damaged(name: str, damage, verbs=("load", "sample", "export-hf")):
        run = fx.make_run(name)
        damage(run)
        for verb in verbs:
            if verb == "load":
                cases.append((f"ckpt {name}: load", "api", lambda run=run: edlm.load(run)))
            elif verb == "sample":
                cases.append((f"ckpt {name}: sample", "cli", ["sample", f"--ckpt={run}", "--prompt=ab"]))
            else:
                cases.append((f"ckpt {name}: export-hf", "cli", ["export-hf", f"--ckpt={run}", out()]))

    damaged("newest params deleted", lambda r: shutil.rmtree(os.path.join(r, "2", "params")))
    damaged("flipped byte in params", lambda r: _flip(_biggest(os.path.join(r, "2", "params"))))
    damaged("truncated params chunk", lambda r: _truncate(_biggest(os.path.join(r, "2", "params"))), ("load", "export-hf"))
    damaged("deleted params chunk", lambda r: os.remove(_biggest(os.path.join(r, "2", "params"))), ("load", "sample"))
    damaged("checksums deleted", lambda r: os.remove(os.path.join(r, "2", "checksums.json")), ("load",))
    damaged("checksums corrupt", lambda r: open(os.path.join(r, "2", "checksums.json"), "w").write("{x"), ("load",))
    damaged("train_state corrupted", lambda r: _flip(_biggest(os.path.join(r, "2", "train_state"))), ("load",))
    damaged("model_config.json missing", lambda r: os.remove(os.path.join(r, "model_config.json")), ("load", "sample"))
    damaged("model_config.json not JSON", lambda r: open(os.path.join(r, "model_config.json"), "w").write("{"), ("load",))
    damaged("model_config.json num_layers '2'", lambda r: _edit_json(os.path.join(r, "model_config.json"), num_layers="2"), ("load",))
    run = fx.make_run("steps")
    cases += [
        ("ckpt --step 7 absent: sample", "cli", ["sample", f"--ckpt={run}", "--prompt=ab", "--step=7"]),
        ("ckpt --step 7 absent: export-hf", "cli", ["export-hf", f"--ckpt={run}", out(), "--step=7"]),
        ("ckpt step= on a model checkpoint", "api", lambda: edlm.load(fx.dlm, step=1)),
        ("ckpt not a checkpoint", "api", lambda: edlm.load(fx.root)),
        ("ckpt model params flipped", "api", lambda: (_copy_and(fx, "mdl", lambda d: _flip(_biggest(os.path.join(d, "params")))))),
    ]
    return cases


def _copy_and(fx: Fixtures, name: str, damage):
    path = fx.path(name)
    shutil.copytree(fx.dlm, path)
    damage(path)
    return edlm.load(path)


def hf_cases(fx: Fixtures):
    imp = lambda d, *a: ("cli", ["import-hf", f"--hf_dir={d}", f"--out={fx.fresh('imp')}", *a])  # noqa: E731
    cfg = lambda **kw: (lambda d: _edit_json(os.path.join(d, "config.json"), **kw))  # noqa: E731
    variants = {
        "config.json missing": lambda d: os.remove(os.path.join(d, "config.json")),
        "config.json not JSON": lambda d: open(os.path.join(d, "config.json"), "w").write("{"),
        "num_hidden_layers '2'": cfg(num_hidden_layers="2"),
        "vocab_size 1.5": cfg(vocab_size=1.5),
        "eos_token_id 'x'": cfg(eos_token_id="x"),
        "rms_norm_eps 'small'": cfg(rms_norm_eps="small"),
        "model_type unknown": cfg(model_type="gpt9"),
        "corrupt tokenizer.json": lambda d: open(os.path.join(d, "tokenizer.json"), "w").write('{"model": 3}'),
        "weights deleted": lambda d: os.remove(os.path.join(d, "model.safetensors")),
        "weights truncated": lambda d: _truncate(os.path.join(d, "model.safetensors")),
        "pickle .bin instead": lambda d: os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")),
    }
    cases = [(f"import-hf {name}", *imp(fx.hf_variant(f"hf_{i}", edit))) for i, (name, edit) in enumerate(variants.items())]
    regular = fx.write("regular_file", "x")
    cases += [
        ("import-hf --mask_token_id = eos", *imp(fx.hf, "--mask_token_id=1")),
        ("import-hf --mask_token_id = pad", *imp(fx.hf, "--mask_token_id=0")),
        ("import-hf --dtype int8", *imp(fx.hf, "--dtype=int8")),
        ("import-hf --out under a file", "cli", ["import-hf", f"--hf_dir={fx.hf}", f"--out={regular}/ckpt"]),
        ("import-hf --out read-only", "cli", ["import-hf", f"--hf_dir={fx.hf}", "--out=/proc/edlm_ckpt"]),
        ("import-hf missing dir", "cli", ["import-hf", f"--hf_dir={fx.path('nope')}", f"--out={fx.fresh('imp')}"]),
        ("from_hf num_hidden_layers '2'", "api", lambda: edlm.from_hf(fx.path("hf_2"))),
    ]
    return cases


def output_cases(fx: Fixtures):
    regular = fx.path("regular_file")
    return [
        ("sample --out is a directory", "cli", ["sample", f"--ckpt={fx.dlm}", "--prompt=ab", f"--out={fx.root}"]),
        ("sample --out under a file", "cli", ["sample", f"--ckpt={fx.dlm}", "--prompt=ab", f"--out={regular}/o.jsonl"]),
        ("sample --out read-only", "cli", ["sample", f"--ckpt={fx.dlm}", "--prompt=ab", "--out=/proc/o.jsonl"]),
        ("export-hf --out under a file", "cli", ["export-hf", f"--ckpt={fx.dlm}", f"--out={regular}/hf"]),
        ("export-hf --out read-only", "cli", ["export-hf", f"--ckpt={fx.dlm}", "--out=/proc/edlm_hf"]),
        ("export-hf --out is a file", "cli", ["export-hf", f"--ckpt={fx.dlm}", f"--out={regular}"]),
        ("export-hf --out non-empty", "cli", ["export-hf", f"--ckpt={fx.dlm}", f"--out={fx.hf}"]),
        ("to_hf out_dir under a file", "api", lambda: edlm.to_hf(fx.model, f"{regular}/hf", tokenizer_dir=BYTE_TOKENIZER)),
        ("save to a read-only dir", "api", lambda: edlm.save(fx.model, "/proc/edlm_save")),
    ]


def prompt_cases(fx: Fixtures):
    files = {
        "prompt is an int": '{"prompt": 12345}\n',
        "prompt is null": '{"prompt": null}\n',
        "prompt_ids floats": '{"prompt_ids": [3.7, 4.2]}\n',
        "prompt_ids strings": '{"prompt_ids": ["a"]}\n',
        "prompt_ids >= vocab": '{"prompt_ids": [3, 9999]}\n',
        "prompt_ids negative": '{"prompt_ids": [-3]}\n',
        "prompt_ids empty": '{"prompt_ids": []}\n',
        "no prompt field": '{"question": "x"}\n',
        "not JSON": 'prompt\n',
        "invalid UTF-8": b'{"prompt": "\xff"}\n',
        "empty file": '',
    }
    cases = []
    for i, (name, content) in enumerate(files.items()):
        path = fx.write(f"prompts_{i}.jsonl", content)
        cases.append((f"prompts {name}", "cli", ["sample", f"--ckpt={fx.dlm}", f"--prompts_jsonl={path}"]))
    cases.append(("prompts file is a directory", "cli", ["sample", f"--ckpt={fx.dlm}", f"--prompts_jsonl={fx.root}"]))
    return cases


def run_dir_cases(fx: Fixtures):
    run = fx.make_run("resume")
    good = fx.path("good.jsonl")
    base = ["train", *TRAIN, f"--config.data.train_files={good}", f"--config.run_dir={run}"]
    locked = fx.path("locked")
    os.makedirs(locked)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    fx.sleeper = sleeper
    json.dump({"pid": sleeper.pid, "host": os.uname().nodename, "started": "now"}, open(os.path.join(locked, ".edlm.lock"), "w"))
    return [
        ("resume with num_layers changed", "cli", [*base, "--config.model.num_layers=2"]),
        ("resume with hidden_size changed", "cli", [*base, "--config.model.hidden_size=64"]),
        ("resume=False on a run with checkpoints", "cli", [*base, "--config.train.resume=False"]),
        ("second writer on a locked run_dir", "cli", ["train", *TRAIN, f"--config.data.train_files={good}", f"--config.run_dir={locked}"]),
    ]


def subprocess_cases(fx: Fixtures):
    """Signals and the divergence guard in a real `edlm train` process (each compiles a tiny step)."""
    good = fx.path("good.jsonl")

    def train_cmd(run_dir: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "efficient_dlm.cli", "train", *TRAIN, f"--config.data.train_files={good}",
                f"--config.run_dir={run_dir}", "--config.train.steps=100000", "--config.train.save_every=100000", *extra]

    def signalled(sig: int) -> tuple[str, str]:
        run_dir = fx.fresh("sig")
        env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.Popen(train_cmd(run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            time.sleep(1)
        time.sleep(2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        steps = checkpoints.run_steps(run_dir)
        ok = proc.returncode == 128 + sig and steps and "run the same command to resume" in out and "Traceback" not in err + out
        ok = ok and "cannot schedule new futures" not in err
        return ("clear" if ok else "traceback"), f"exit {proc.returncode}, steps {steps}: {out.strip()[-160:]} {err.strip()[-200:]}"

    def diverging() -> tuple[str, str]:
        env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(train_cmd(fx.fresh("lr"), "--config.train.learning_rate=1e6", "--config.train.steps=20",
                                        "--config.train.warmup_steps=0", "--config.train.grad_clip=0"),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0:
            return "silent", "exit 0"
        clear = proc.returncode == 2 and one_line_error(proc.stderr, "train") and "cannot schedule" not in proc.stderr
        return ("clear" if clear else "traceback"), proc.stderr.strip()[-300:]

    def fast_failure() -> tuple[str, str]:
        env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(train_cmd(fx.fresh("ff"), f"--config.data.eval_files={fx.path('dir.jsonl')}"), cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        clear = proc.returncode == 2 and one_line_error(proc.stderr, "train")
        return ("clear" if clear else "traceback"), proc.stderr.strip()[-300:]

    return [("subprocess", "SIGINT during training", lambda: signalled(signal.SIGINT)),
            ("subprocess", "SIGTERM during training", lambda: signalled(signal.SIGTERM)),
            ("subprocess", "learning rate 1e6 (finite divergence)", diverging),
            ("subprocess", "fast setup failure (no orbax shutdown traceback)", fast_failure)]


CATEGORIES = {
    "config keys and values": config_cases,
    "sampler knobs (CLI)": sampler_cli_cases,
    "sampler and model API": sampler_api_cases,
    "data files": data_cases,
    "checkpoints": checkpoint_cases,
    "HF directories": hf_cases,
    "output paths": output_cases,
    "prompt files": prompt_cases,
    "run directories": run_dir_cases,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every case and outcome here")
    parser.add_argument("--quick", action="store_true", help="skip the subprocess training cases")
    args = parser.parse_args()
    os.chdir(REPO)
    signal.signal(signal.SIGALRM, _alarm)
    root = tempfile.mkdtemp(prefix="edlm_bad_inputs_")
    fx = Fixtures(root)
    results = []
    try:
        for category, make in CATEGORIES.items():
            for name, kind, what in make(fx):
                signal.alarm(CASE_TIMEOUT_S)
                try:
                    outcome, detail = run_cli(what) if kind == "cli" else run_api(what)
                finally:
                    signal.alarm(0)
                results.append({"category": category, "case": name, "via": kind, "outcome": outcome, "detail": detail})
                print(f"{outcome:9s} [{category}] {name}: {detail}", flush=True)
        if not args.quick:
            for _, name, fn in subprocess_cases(fx):
                outcome, detail = fn()
                results.append({"category": "signals and divergence", "case": name, "via": "subprocess", "outcome": outcome, "detail": detail})
                print(f"{outcome:9s} [signals and divergence] {name}: {detail}", flush=True)
    finally:
        if getattr(fx, "sleeper", None) is not None:
            fx.sleeper.kill()
        shutil.rmtree(root, ignore_errors=True)
    table = collections.defaultdict(collections.Counter)
    for r in results:
        table[r["category"]][r["outcome"]] += 1
    print(f"\n{'category':32s} {'cases':>5s} {'clear':>6s} {'traceback':>9s} {'silent':>6s}")
    for category, counts in table.items():
        print(f"{category:32s} {sum(counts.values()):5d} {counts['clear']:6d} {counts['traceback']:9d} {counts['silent']:6d}")
    total = collections.Counter(r["outcome"] for r in results)
    print(f"{'total':32s} {len(results):5d} {total['clear']:6d} {total['traceback']:9d} {total['silent']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if total["clear"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
