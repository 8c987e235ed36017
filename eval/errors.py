"""The one error type of the evaluation package."""


class EvalError(RuntimeError):
    """Bad evaluation input (unknown benchmark, unreachable data, corrupt shard); one-line message."""
