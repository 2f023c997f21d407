"""Run by test_lora.py in a subprocess with 8 fake CPU devices: a LoRA run sharded over
(data=2, fsdp=2, tensor=2) computes the single-device run's losses and adapter updates, leaves the base
bitwise unchanged, and holds adapters and their Adam moments where the base weights' rules put them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lora_multidevice.py RUN_DIR
"""
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

import efficient_dlm as edlm  # noqa: E402
from efficient_dlm.data.byte_tokenizer import ASSET_DIR  # noqa: E402
from efficient_dlm.models.decoder import MODEL_STATE  # noqa: E402
from efficient_dlm.train.loop import train  # noqa: E402
from tests.test_chat_sft import _conversations, _write  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# weight -> its contracted (input) axes after the layers axis: [layers, in..., out...] (models/layers.py)
CONTRACTED = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def _spec(array) -> tuple:
    """The array's PartitionSpec padded to its rank (P(None, "fsdp") == P(None, "fsdp", None))."""
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def _flat(tree) -> dict:
    """{"layers/attn/q_proj": array, ...} of a state or optimizer-state tree."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(names[:-1] if names[-1] == "value" else names)] = x
    return out


def _check_shardings(adapters: dict, base: dict, moments: dict) -> None:
    """A [layers, in..., r] shards like its weight's leading and input axes, B [layers, r, out...] like
    its leading and output axes, the rank replicated; Adam moments like their adapter."""
    assert _spec(adapters["layers/attn/q_proj_lora_a"]) == (None, "fsdp", None)  # [layers, embed, r]
    assert _spec(adapters["layers/attn/q_proj_lora_b"]) == (None, None, "tensor", None)  # [layers, r, heads, head_dim]
    assert _spec(adapters["layers/mlp/down_proj_lora_b"]) == (None, None, "fsdp")  # [layers, r, embed]
    for name, n_con in CONTRACTED.items():
        module = "attn" if name[0] in "qkvo" else "mlp"
        weight = _spec(base[f"layers/{module}/{name}"])
        a, b = (adapters[f"layers/{module}/{name}_lora_{s}"] for s in "ab")
        assert _spec(a) == (*weight[: 1 + n_con], None), (name, a.sharding, weight)
        assert _spec(b) == (weight[0], None, *weight[1 + n_con :]), (name, b.sharding, weight)
    tensors = {path: m for path, m in moments.items() if np.ndim(m) > 0}
    assert len(tensors) == 2 * len(adapters), sorted(tensors)  # Adam mu and nu, adapters only
    for path, moment in tensors.items():
        (adapter,) = [a for name, a in adapters.items() if path.endswith("/" + name)]
        assert moment.sharding == adapter.sharding, (path, moment.sharding, adapter.sharding)


def main(tmp: pathlib.Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(tmp, "single", steps=2, save_every=2, eval_every=0)
    config.model.num_kv_heads = 2  # kv heads (and k/v adapters' B) split over tensor=2
    base_model = edlm.init_model(edlm.ModelConfig.from_dict(config.model.to_dict()), seed=0)
    base_dir = edlm.save(base_model, str(tmp / "base"), tokenizer_dir=ASSET_DIR)
    base = [np.asarray(x) for x in jax.tree.leaves(nnx.state(base_model, MODEL_STATE))]
    config.data.update(format="chat", chat_template="builtin", seq_len=64, eval_files="")
    config.data.train_files = _write(tmp / "chat.jsonl", _conversations(64))
    config.diffusion.update(mask_token="model", block_size_schedule="")
    config.init.checkpoint = base_dir
    config.lora.update(rank=4, alpha=8.0, dropout=0.1, targets=ALL)  # dropout: the keys shard too
    config.train.learning_rate = 1e-2
    single = train(config)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"))
    config.run_dir = str(tmp / "sharded")
    sharded = train(config, mesh=mesh)

    # Step 1's loss is the base forward (B = 0), step 2's the adapted one after one adapter update.
    assert [h["step"] for h in sharded.history] == [1, 2]
    for a, b in zip(single.history, sharded.history):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params)):
        assert np.abs(np.asarray(a)).max() > 0  # every adapter moved (A and B)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    for run in (single, sharded):  # the base went through both steps bitwise unchanged
        for a, b in zip(jax.tree.leaves(run.state.frozen), base, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
    _check_shardings(_flat(sharded.state.params), _flat(sharded.state.frozen), _flat(sharded.state.opt_state))
    print("OK")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
