"""What the engine calls once per step: the slot programs with their caches, on one device or over a mesh.

`BlockRunner` runs the block-diffusion / AR step programs (step_program.py) over one KV cache,
`SpecRunner` the speculative one (speculative.py) over a drafter and a verifier cache. Both turn the
host's slot states into program inputs, call the compiled program and hand back, per occupied slot,
(tokens made final, whether a stop token ended the request, the request's forward counter).

Under a mesh (`mesh=`, e.g. from the config's mesh section) the slots shard over the data axes as the
sampler's batch does: the per-slot inputs and the caches' slot dimension by the "batch" /
"cache_batch" rules (parallel/rules.py), the weights by their own logical names, and the programs run
inside `parallel.mesh.use`, so the model's activation constraints apply. The knobs are replicated.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from flax import nnx

from efficient_dlm.models.cache import KVCache
from efficient_dlm.parallel import mesh as mesh_lib
from efficient_dlm.parallel import sharding
from efficient_dlm.serve import slots as slots_lib
from efficient_dlm.serve import speculative as spec_lib
from efficient_dlm.serve.step_program import ar_step_jit, diffusion_step_jit


class Placement:
    """Where arrays live: one device (mesh None) or sharded over a mesh."""

    def __init__(self, mesh=None, rules=None):
        self.mesh, self.rules = mesh, rules

    def context(self):
        return mesh_lib.use(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def params(self, model):
        graphdef, params = nnx.split(model)
        if self.mesh is not None:
            params = jax.device_put(params, sharding.state_shardings(params, self.mesh))
        return graphdef, params

    def cache(self, cfg, slots: int, size: int) -> KVCache:
        rope = np.ones((slots,), np.int32) if cfg.rope_type == "dynamic" else None
        cache = KVCache.empty(cfg, slots, size, rope_length=rope)
        if self.mesh is None:
            return cache
        kv = sharding.cache_sharding(self.mesh, cache.k.shape)
        rows = lambda x: None if x is None else jax.device_put(x, self.rows(x))  # noqa: E731
        return cache.replace(k=jax.device_put(cache.k, kv), v=jax.device_put(cache.v, kv), start=rows(cache.start),
                             length=rows(cache.length), rope_length=rows(cache.rope_length))

    def rows(self, x):
        return sharding.named(self.mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape)

    def inputs(self, inputs: dict) -> dict:
        if self.mesh is None:
            return inputs
        return {k: jax.device_put(v, self.rows(v)) for k, v in inputs.items()}

    def knobs(self, knobs: dict) -> dict:
        if self.mesh is None:
            return knobs
        replicated = sharding.named(self.mesh, ())
        return {k: jax.device_put(v, replicated) for k, v in knobs.items()}


class Runner:
    """What both runners share: the warm-up (every chunk width, each sampling variant, empty slots)."""

    def warmup(self, knobs: dict, sampled: tuple[bool, ...]) -> int:
        count, out = 0, None
        for inputs in self.empty_inputs():
            for flag in sampled:
                out = self._call(flag, inputs, knobs)
                count += 1
        jax.block_until_ready(out)
        return count


class BlockRunner(Runner):
    """Block diffusion (one block per call) or AR (one token per call) over one cache."""

    def __init__(self, model, geometry: slots_lib.SlotGeometry, plan, placement: Placement):
        self.geometry, self.plan, self.place = geometry, plan, placement
        self.program = ar_step_jit if geometry.kind == "ar" else diffusion_step_jit
        self.graphdef, self.params = placement.params(model)
        self.cache = placement.cache(model.config, geometry.slots, geometry.cache_size)

    def _call(self, sampled: bool, inputs: dict, knobs: dict) -> dict:
        plan = dataclasses.replace(self.plan, sampled=sampled)
        with self.place.context():
            self.cache, out = self.program(self.graphdef, plan, self.params, self.cache, self.place.inputs(inputs),
                                           self.place.knobs(knobs))
        return out

    def empty_inputs(self) -> list[dict]:
        return [slots_lib.empty_inputs(self.geometry, width) for width in slots_lib.chunk_widths(self.geometry)]

    def step(self, slots: list, knobs: dict) -> dict[int, tuple[list[int], bool, int]]:
        out = jax.device_get(self._call(bool((knobs["temperature"] > 0).any()),
                                        slots_lib.build_inputs(self.geometry, slots), knobs))
        results = {}
        for i, slot in enumerate(slots):
            if slot is not None:
                new, stopped = slots_lib.committed(out["block"][i], out["step"][i], slot.request.settings["stop_ids"])
                slot.block += 1
                slot.clean = out["block"][i]
                results[i] = (new, stopped, int(out["forwards"][i]))
        return results


class SpecRunner(Runner):
    """Speculative decoding (one draft + verify iteration per call) over a drafter and a verifier cache."""

    def __init__(self, model, verifier, geometry: spec_lib.SpecGeometry, plan: spec_lib.SpecSlotPlan,
                 placement: Placement):
        self.geometry, self.plan, self.place = geometry, plan, placement
        self.draft_graphdef, self.draft_params = placement.params(model)
        self_verify = isinstance(verifier, str)
        self.verify_graphdef, self.verify_params = (None, None) if self_verify else placement.params(verifier)
        d = geometry.draft
        self.draft_cache = placement.cache(model.config, d.slots, d.cache_size)
        self.verify_cache = placement.cache((model if self_verify else verifier).config, d.slots,
                                            geometry.verify_cache_size)

    def _call(self, sampled: bool, inputs: dict, knobs: dict) -> dict:
        plan = dataclasses.replace(self.plan, sampled=sampled)
        with self.place.context():
            self.draft_cache, self.verify_cache, out = spec_lib.spec_step_jit(
                self.draft_graphdef, self.verify_graphdef, plan, self.draft_params, self.verify_params,
                self.draft_cache, self.verify_cache, self.place.inputs(inputs), self.place.knobs(knobs))
        return out

    def empty_inputs(self) -> list[dict]:
        return [spec_lib.empty_inputs(self.geometry, widths) for widths in self.geometry.all_widths()]

    def step(self, slots: list, knobs: dict) -> dict[int, tuple[list[int], bool, int]]:
        out = jax.device_get(self._call(bool((knobs["temperature"] > 0).any()),
                                        spec_lib.build_inputs(self.geometry, slots), knobs))
        results = {}
        self.drafts = [0, 0]  # draft tokens offered to the verifier and accepted by it in this call
        for i, slot in enumerate(slots):
            if slot is not None:
                self.drafts[0] += int(out["proposed"][i])
                self.drafts[1] += int(out["accepted"][i])
                new = out["tokens"][i][: out["count"][i]].tolist()
                slot.block += 1
                results[i] = (new, bool(out["stopped"][i]), int(out["forwards"][i]))
        return results
