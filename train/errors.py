"""The error type of training failures a user can act on (bad data, a stopped run, a bad resume)."""


class TrainingError(RuntimeError):
    """A failure whose message is one line saying what happened and what to do.

    Entry points print the message without a traceback (see `train.distributed.fail_loudly`).
    """
