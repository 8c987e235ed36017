"""The launched adaptation runs need DeepSpeed's op built first, as tests/train's launched runs do."""

from tests.train.conftest import deepspeed_ops_built  # noqa: F401  (an autouse session fixture)
