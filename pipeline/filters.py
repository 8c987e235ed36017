"""Quality filters from recipe thresholds: datatrove's Gopher, C4 and FineWeb filters, and an offline
language-id filter.

datatrove's `LanguageFilter` downloads a fastText model at run time, so language id here is py3langid
(langid.py's model, shipped inside the wheel) wrapped as a datatrove `BaseFilter`; it records
`language` and `language_score` in the metadata like datatrove's filter does.
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter

from config.recipe import FiltersConfig, SourceConfig
from pipeline.wordtok import WORD_TOKENIZER


class LangIdFilter(BaseFilter):
    """Keep documents whose most likely language is in `languages` with probability >= `threshold`."""

    name = "🌍 Language ID (py3langid)"

    def __init__(self, languages: list[str], threshold: float, max_chars: int = 20000):
        super().__init__()
        self.languages = set(languages)
        self.threshold = threshold
        self.max_chars = max_chars
        self._identifier = None

    @property
    def identifier(self):
        if self._identifier is None:  # loaded lazily, once per task process
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return self._identifier

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.identifier.classify(doc.text[: self.max_chars])
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.threshold:
            return False, "language_low_score"
        return True


def build_filters(cfg: FiltersConfig, source: SourceConfig) -> list[BaseFilter]:
    """The enabled filters the source selects, in FineWeb's order (language, repetition, quality, C4, FineWeb)."""
    wanted = set(source.filters) if source.filters is not None else None

    def on(name: str) -> bool:
        return getattr(cfg, name).enabled and (wanted is None or name in wanted)

    def kwargs(name: str) -> dict:
        return getattr(cfg, name).model_dump(exclude={"enabled"})

    steps: list[BaseFilter] = []
    if on("language"):
        steps.append(LangIdFilter(cfg.language.languages, cfg.language.threshold, cfg.language.max_chars))
    if on("gopher_repetition"):
        rep = kwargs("gopher_repetition")
        rep["top_n_grams"] = tuple(map(tuple, rep["top_n_grams"]))
        rep["dup_n_grams"] = tuple(map(tuple, rep["dup_n_grams"]))
        steps.append(GopherRepetitionFilter(**rep, language=WORD_TOKENIZER))
    if on("gopher_quality"):
        steps.append(GopherQualityFilter(**kwargs("gopher_quality"), language=WORD_TOKENIZER))
    if on("c4"):
        steps.append(C4QualityFilter(**kwargs("c4"), language=WORD_TOKENIZER))
    if on("fineweb"):
        steps.append(FineWebQualityFilter(**kwargs("fineweb"), language=WORD_TOKENIZER))
    return steps
