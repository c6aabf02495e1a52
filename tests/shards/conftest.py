import pytest

from dslm_local.cli import COMMAND_ENV


@pytest.fixture(autouse=True)
def as_dslm_shard(monkeypatch):
    """The builds these tests run in-process warn as under `dslm-shard` (run_command sets the name
    while a command runs), whatever ran before them."""
    monkeypatch.setenv(COMMAND_ENV, "dslm-shard")
