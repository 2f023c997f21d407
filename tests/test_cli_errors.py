"""The CLI prints one line and exits 2 for a UserError only; any other exception is a bug and keeps its traceback."""
import pytest

from efficient_dlm import cli
from efficient_dlm.errors import UserError
from efficient_dlm.sample import cli_sample


@pytest.mark.parametrize("error", [ValueError("an internal bug"), KeyError("missing"), FileNotFoundError("internal")])
def test_an_internal_error_shows_its_traceback(monkeypatch, error):
    def run(config, flags):
        raise error

    monkeypatch.setattr(cli_sample, "run", run)
    with pytest.raises(type(error)):
        cli.main(["edlm", "sample", "--prompt", "x"])


def test_a_user_error_and_a_bad_key_are_one_line(monkeypatch, capsys):
    assert cli.main(["edlm", "sample", "--config.sample.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'sample.bogus'" in err and len(err.splitlines()) == 1

    def run(config, flags):
        raise UserError("prompts.jsonl:3: not a JSON object")

    monkeypatch.setattr(cli_sample, "run", run)
    assert cli.main(["edlm", "sample"]) == 2
    assert capsys.readouterr().err.strip() == "edlm sample: error: prompts.jsonl:3: not a JSON object"


@pytest.mark.parametrize("override, message", [
    ("--config.sample.threshold=1.5", "sample.threshold must be in [0, 1], got 1.5"),
    ("--config.mesh.data=0", "mesh.data must be a positive integer or -1, got 0"),
    ("--config.train.steps=0", "train.steps must be positive, got 0"),
    ("--config.diffusion.block_size=-4", "diffusion.block_size must be positive, got -4"),
    ("--config.diffusion.masking=random", "unknown diffusion.masking 'random'; choose one of position, uniform"),
    ("--config.diffusion.bogus=1", "unknown config key 'diffusion.bogus' (not in the recipe's schema; see efficient_dlm/config.py)"),
])
def test_every_verb_rejects_the_same_bad_key_or_value_in_a_shared_section(capsys, override, message):
    """Validation is composed explicitly (config.typed: each package's typed section, then the checks across
    sections), not registered by whatever a verb imports."""
    for verb in cli.VERBS:
        assert cli.main(["edlm", verb, override]) == 2, verb
        err = capsys.readouterr().err.strip()
        assert err == f"edlm {verb}: error: {message}", (verb, err)
