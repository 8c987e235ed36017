"""An offline word tokenizer for datatrove's text filters, MinHash and decontamination.

datatrove 0.10.1 assigns English to `SpaCyTokenizer("en")` (datatrove/assets/tokenizer_assignment.csv),
which needs spaCy (not installed; NLTK's `word_tokenize` in turn needs the punkt data download). This
tokenizer needs neither: sentences come from datatrove's `WhitespaceTokenizer` regex, words from NLTK's
Treebank tokenizer (pure regex, ships with the nltk wheel). datatrove accepts a `WordTokenizer` instance
wherever it takes a `language`, so every step below gets `WORD_TOKENIZER`.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WhitespaceTokenizer, strip_strings

# Treebank splits a period only at the end of its input: cut sentences first (after . ! ? and newlines).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


class OfflineWordTokenizer(WhitespaceTokenizer):
    """Regex sentences + Treebank words; `span_tokenize`/`sent_tokenize` are WhitespaceTokenizer's."""

    def __init__(self) -> None:
        super().__init__()
        self._treebank = None

    def word_tokenize(self, text: str) -> list[str]:
        if self._treebank is None:  # nltk is slow to import: only when words are needed
            from nltk.tokenize import NLTKWordTokenizer

            self._treebank = NLTKWordTokenizer()
        return strip_strings([w for part in _SENTENCE_BREAK.split(text) for w in self._treebank.tokenize(part)])


WORD_TOKENIZER = OfflineWordTokenizer()
