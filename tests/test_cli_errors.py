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
