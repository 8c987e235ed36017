"""The error type of training failures a user can act on (bad data, a stopped run, a bad resume)."""


class TrainingError(RuntimeError):
    """A failure whose message is one line saying what happened and what to do.

    Entry points print the message without a traceback (see `train.distributed.fail_loudly`).
    """


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error type that means bad input (printed as one line, exit 2, no traceback)."""
    from config.loader import ConfigError
    from config.manifest import ManifestError
    from model.weights import CheckpointError

    return ConfigError, ManifestError, CheckpointError, TrainingError
