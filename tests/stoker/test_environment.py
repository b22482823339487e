"""stoker.environment.patched_environ: variables set or unset for a block, then put back."""

import os

import pytest

from stoker.environment import patched_environ


def test_variables_are_set_and_unset_for_the_block_and_put_back_after(monkeypatch):
    monkeypatch.setenv("STOKER_TEST_KEPT", "before")
    monkeypatch.setenv("STOKER_TEST_HIDDEN", "secret")
    monkeypatch.delenv("STOKER_TEST_NEW", raising=False)
    with patched_environ({"STOKER_TEST_KEPT": "during", "STOKER_TEST_HIDDEN": None, "STOKER_TEST_NEW": "1"}):
        assert os.environ["STOKER_TEST_KEPT"] == "during" and os.environ["STOKER_TEST_NEW"] == "1"
        assert "STOKER_TEST_HIDDEN" not in os.environ
    assert os.environ["STOKER_TEST_KEPT"] == "before" and os.environ["STOKER_TEST_HIDDEN"] == "secret"
    assert "STOKER_TEST_NEW" not in os.environ


def test_a_block_that_raises_puts_them_back_too(monkeypatch):
    monkeypatch.delenv("STOKER_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError), patched_environ({"STOKER_TEST_NEW": "1"}):
        raise RuntimeError("boom")
    assert "STOKER_TEST_NEW" not in os.environ
