"""config/console.py: the libraries' chatter is off by default, on with --verbose; ranks > 0 drop
Python warnings (rank 0 shows them)."""

from __future__ import annotations

import logging
import warnings

import pytest

from config import console
from config.console import NOISY_LOGGERS, every_rank_warns, quiet_libraries


@pytest.fixture()
def clean_levels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    saved = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    monkeypatch.setattr(console, "_every_rank_warns", True)
    with warnings.catch_warnings():
        yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_default_quiets_the_libraries(clean_levels, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    quiet_libraries(verbose=False)
    assert not logging.getLogger("onnxscript").isEnabledFor(logging.INFO)
    assert not logging.getLogger("torchao").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("transformers.integrations.hub_kernels").isEnabledFor(logging.WARNING)
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("rank 0 shows this")
    assert len(seen) == 1


def test_verbose_changes_nothing_and_other_ranks_drop_warnings(clean_levels) -> None:
    import os

    logging.getLogger("onnxscript").setLevel(logging.NOTSET)
    quiet_libraries(verbose=True, rank=3)
    assert logging.getLogger("onnxscript").level == logging.NOTSET and "TRANSFORMERS_VERBOSITY" not in os.environ
    assert every_rank_warns()
    quiet_libraries(verbose=False, rank=3)
    assert not every_rank_warns()  # train.distributed.configure_logging: ranks > 0 log errors only
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("every rank would print this")
    assert seen == []

