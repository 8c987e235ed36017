"""What the entry points print: their own progress and results, and warnings once, by default; the
libraries' chatter only with --verbose.

Quieted by default (each still reaches the console with --verbose):
- transformers' progress bars ("Loading weights") and notices (kernel fallbacks such as "`causal_conv1d_fn` is falling back to its reference
  PyTorch implementation", load reports): TRANSFORMERS_VERBOSITY=error, read when transformers loads,
  and its logger's level if it is loaded already;
- torchao's optional-kernel load failures ("Failed to load .../_C_mxfp8...so"), logged at its import;
- onnxscript / onnx_ir INFO lines (one per rewrite rule and pass during torch.onnx export);
- torch's pytree notices about enum registration (printed when torchao registers its enums) and
  torch.onnx's "torchvision is not installed" (its vision ops are not registered; none are used);
- on every rank but 0, Python warnings and log warnings (each rank would print the same ones):
  train.distributed.configure_logging asks `every_rank_warns`.
Call `quiet_libraries` first thing in an entry point, before those libraries are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

NOISY_LOGGERS = {  # logger name -> the lowest level shown by default
    "transformers": logging.ERROR,  # if transformers is already imported (else the variable above acts)
    "torchao": logging.ERROR,
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.utils._pytree": logging.ERROR,
    "torch.onnx._internal.exporter._registration": logging.ERROR,  # "torchvision is not installed", 4x per graph
}


_every_rank_warns = True  # until an entry point asks for quiet


def every_rank_warns() -> bool:
    """Whether ranks > 0 log warnings (--verbose, or no entry point called `quiet_libraries`)."""
    return _every_rank_warns


def quiet_libraries(verbose: bool, rank: int = 0) -> None:
    """Raise the noisy libraries' log levels (module doc) unless `verbose`; `rank` > 0 also ignores
    Python warnings (rank 0 shows them)."""
    global _every_rank_warns
    _every_rank_warns = verbose
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar (read at import)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if rank > 0:
        warnings.simplefilter("ignore")
