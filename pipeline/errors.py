"""The one error type of the curation stage: bad input the user can fix (one line, says what to do)."""


class CurationError(RuntimeError):
    """Unusable input: missing path, unreachable source, unavailable eval set, inconsistent output folder."""
