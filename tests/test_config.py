"""The ConfigDict -> typed sections conversion (efficient_dlm/config.py `typed`): one line naming an unknown or
mistyped key, frozen hashable sections, and the CLI's schema is exactly the packages' dataclass fields."""
import dataclasses

import pytest
from ml_collections import ConfigDict

from efficient_dlm.config import SECTIONS, Config, base_config, override, to_plain, typed
from efficient_dlm.errors import UserError


def test_the_schema_is_the_packages_typed_sections():
    config = base_config()
    assert typed(config) == Config()  # every default of the ConfigDict is the dataclass default
    for name, cls in SECTIONS.items():
        assert set(config[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert config.mesh.rules.embed == "fsdp" and config.sample.threshold is None  # nested section, typed placeholder
    config.sample.threshold = 0.5  # a placeholder accepts its declared type
    config.mesh.rules.embed = "fsdp,tensor"
    sections = typed(config)
    assert sections.sample.threshold == 0.5 and ("embed", "fsdp,tensor") in sections.mesh.rules


@pytest.mark.parametrize("values, message", [
    ({"diffusion": {"bogus": 1}}, "unknown config key 'diffusion.bogus' (not in the diffusion section's schema; "
                                  "see efficient_dlm/diffusion/config.py)"),
    ({"train": {"steps": "10"}}, "train.steps must be an int, got '10'"),
    ({"train": {"resume": 1}}, "train.resume must be a bool, got 1"),
    ({"sample": {"stop_tokens": (1, "x")}}, "sample.stop_tokens[1] must be an int, got 'x'"),
    ({"mesh": {"rules": {"embed": "fsdp,bogus"}}}, "mesh.rules.embed: unknown mesh axis 'bogus'; mesh axes are "
                                                  "data, fsdp, tensor, expert"),
    ({"extra": 1}, "unknown config section or key 'extra' (see efficient_dlm/config.py)"),
    ({"data": {"seq_len": 30}}, "diffusion.block_size 32 does not divide data.seq_len 30"),
])
def test_unknown_mistyped_and_inconsistent_keys_are_one_line(values, message):
    """A recipe can build sections ml_collections does not type-check; the typed layer names the key."""
    with pytest.raises(UserError) as err:
        typed(ConfigDict(values))
    assert str(err.value) == message


def test_typed_sections_are_frozen_and_hash_by_value():
    """The compiled-step caches key on these sections (train/loop.py cached_step)."""
    one, two = typed(base_config()), typed(base_config())
    assert hash(one.diffusion) == hash(two.diffusion) and one.train == two.train
    assert one.diffusion.replace(block_size=16) != two.diffusion
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.diffusion.block_size = 16
    with pytest.raises(UserError, match="diffusion.half_life must be positive, got 0.0"):
        one.diffusion.replace(half_life=0)  # a replaced section is checked again


def test_a_typed_config_records_as_its_configdict_and_derives_checked_variants():
    """Library code holds the typed Config only: what a run records from it (to_plain) is the ConfigDict's own
    to_dict, which reads back to the same Config; `override` re-checks a changed section and the cross-section rules."""
    config = base_config()
    config.sample.threshold, config.mesh.rules.embed, config.train.steps = 0.5, "fsdp,tensor", 7
    c = typed(config)
    assert typed(c) is c  # an entry point takes either; a Config is already checked
    assert to_plain(c) == config.to_dict() and typed(to_plain(c)) == c
    v = override(c, {"train.steps": 9, "run_dir": "elsewhere"})
    assert (v.train.steps, v.run_dir, c.train.steps) == (9, "elsewhere", 7) and v.diffusion is c.diffusion
    for values, message in [({"train.steps": 0}, "train.steps must be positive, got 0"),
                            ({"data.seq_len": 30}, "diffusion.block_size 32 does not divide data.seq_len 30"),
                            ({"train.bogus": 1}, "unknown config key 'train.bogus' (see efficient_dlm/config.py)")]:
        with pytest.raises(UserError) as err:
            override(c, values)
        assert str(err.value) == message
