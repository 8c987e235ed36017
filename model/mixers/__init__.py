"""The registry of block types: one pattern letter -> one mixer class (model/mixers/base.py).

Adding a block type = its module (a `Mixer` subclass) + one line in `_builtin` + its tests (add its letter
to the parametrized checks of tests/model/test_block_types.py: causality, decode == forward, packing,
gradients, save/load, exports; M and A have their own tests in tests/model). Nothing else in
the code names a block type: the model, sizing, the cache, CUDA-graph decoding, ZeRO-3 preparation,
quantization and export all ask the mixer.
"""

from __future__ import annotations

from model.mixers.base import LayerState, Mixer, MixerContext

__all__ = ["LayerState", "Mixer", "MixerContext", "block_type", "block_types", "letters"]


def _builtin() -> list[type[Mixer]]:
    # Imported here, not at module level: the mixer modules import model.mixers.base, and the config
    # asks for `letters()` while the model package is still importing.
    from model.attention import Attention
    from model.mamba2 import Mamba2Mixer
    from model.mixers.gated import GatedMemoryMixer
    from model.mixers.hierarchical import HierarchicalMixer
    from model.mixers.routed import RoutedMixer

    return [Mamba2Mixer, Attention, RoutedMixer, GatedMemoryMixer, HierarchicalMixer]


_REGISTRY: dict[str, type[Mixer]] = {}


def block_types() -> dict[str, type[Mixer]]:
    """Letter -> mixer class, in registration order."""
    if not _REGISTRY:
        for cls in _builtin():
            if cls.letter in _REGISTRY or len(cls.letter) != 1:
                raise ValueError(f"block type letter {cls.letter!r} of {cls.__name__} is not one new character")
            _REGISTRY[cls.letter] = cls
    return _REGISTRY


def letters() -> str:
    return "".join(block_types())


def block_type(letter: str) -> type[Mixer]:
    """The mixer class of a pattern letter; ValueError naming the letters that exist."""
    try:
        return block_types()[letter]
    except KeyError:
        known = ", ".join(f"{k} ({cls.name})" for k, cls in block_types().items())
        raise ValueError(f"unknown block type {letter!r}: known letters are {known}") from None
