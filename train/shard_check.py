"""The default check of a token shard, made when training first reads from it: cheap but real.

The manifest check at start-up (data.verify=size) compares sizes only, so same-size damage went
through: token ids >= the vocabulary crashed step 1 with an IndexError, and flipped bits within the
vocabulary or shifted document offsets trained silently. When a shard is first opened this reads it
once and checks that its largest token id is below the vocabulary and that its .index offsets
(datatrove's cumulative document ends) increase strictly and end at the shard's token count.
Flipped bits that stay in range need data.verify=sha256 (every byte against the manifest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHUNK = 1 << 24  # tokens per read: bounded memory for any shard size


def shard_problem(tokens: Path, token_size: int, vocab_size: int) -> str | None:
    """What is wrong with the shard `tokens` and its `<tokens>.index` (None: consistent)."""
    data = np.memmap(tokens, dtype=np.uint16 if token_size == 2 else np.uint32, mode="r")
    ends = np.fromfile(f"{tokens}.index", dtype="<u8").astype(np.int64)
    if len(ends) and (ends[0] <= 0 or np.any(np.diff(ends) <= 0) or ends[-1] != len(data)):
        return (f"its document offsets ({tokens.name}.index) are not increasing up to its {len(data)} tokens "
                f"(first {ends[0]}, last {ends[-1]})")
    for start in range(0, len(data), CHUNK):
        top = int(data[start:start + CHUNK].max())
        if top >= vocab_size:
            return f"it holds token id {top}, outside the vocabulary of {vocab_size}"
    return None
