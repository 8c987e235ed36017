"""sentencepiece model and the converted tokenizer.json give identical ids and decode back to the text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from config.recipe import TokenizerConfig

pytest.importorskip("datatrove", reason="datatrove is not installed here (curation runs on it)")
from pipeline.spm_tokenizer import load_hf_tokenizer, spm_to_hf, subsample_lines, train_sentencepiece

from .conftest import EMBEDDED, docstring_rows, stdlib_files

VARIED = [
    "def f(x):\n    return x  + 1\n\n\n",
    "\tclass A:\n\t\tpass  # tabs\n",
    "    leading spaces and trailing   ",
    "héllo wörld — naïve café, Straße, ÆØÅ",
    "日本語のテキストと中文字符，한국어 텍스트",
    "emoji 🤖🚀 and symbols ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "literal special strings: <s> </s> <pad> <unk> and <|endoftext|>",
    "windows\r\nline\r\nends and a\u00a0no-break space",
    "numbers 1234567890 3.14159 -2e10 0x1F",
    "", " ", "\n", "a" * 3000,
    "mixed\u200bzero width\u2028line separator\x00nul",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("spm")
    text = tmp / "sample.txt"
    text.write_text("\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(40)) + "\n"
                    + "\n".join(r["text"] for r in docstring_rows()), encoding="utf-8")
    return train_sentencepiece(text, tmp / "spm", TokenizerConfig(vocab_size=1000))


def test_special_ids_follow_the_contract(model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.vocab_size() == 1000


def test_hf_json_gives_identical_ids(model: Path, tmp_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    path = tmp_path / "tokenizer.json"
    path.write_text(spm_to_hf(model).to_str())
    hf = load_hf_tokenizer(path)
    texts = VARIED + [p.read_text(encoding="utf-8") for p in stdlib_files(200)[40:]]
    texts += [json.loads(line)["text"] for line in (EMBEDDED / "planted.jsonl").read_text().splitlines()]
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:60]
        assert hf.decode(ids) == sp.decode(ids)
    for text in VARIED[:9]:  # identity normalization: text survives the round trip exactly
        assert sp.decode(sp.encode(text)) == text


def test_byte_fallback_never_yields_unk(model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.unk_id() not in sp.encode("龘 𓀀 ꙮ")


def test_training_is_reproducible(model: Path, tmp_path: Path) -> None:
    sample = tmp_path / "lines.txt"
    src = tmp_path / "all.txt"
    src.write_text("\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(40)), encoding="utf-8")
    assert 0 < subsample_lines(src, sample, 5000, seed=3) < 5000 * 1.2
    first = train_sentencepiece(sample, tmp_path / "a", TokenizerConfig(vocab_size=500)).read_bytes()
    second = train_sentencepiece(sample, tmp_path / "b", TokenizerConfig(vocab_size=500)).read_bytes()
    assert first == second


def test_reused_tokenizer_is_checked_and_copied(model: Path, tmp_path: Path) -> None:
    from config.recipe import RecipeConfig
    from pipeline.errors import CurationError
    from pipeline.preflight import resolve_tokenizer
    from pipeline.spm_tokenizer import TokenizerStep

    recipe = RecipeConfig(name="r", sources=[{"name": "a", "type": "pydoc"}], tokenizer={"path": str(model)})
    with pytest.raises(CurationError, match="has 1000 pieces but tokenizer.vocab_size is 32000"):
        resolve_tokenizer(recipe, tmp_path)
    recipe.tokenizer.vocab_size = 1000
    reuse = resolve_tokenizer(recipe, tmp_path)
    TokenizerStep(recipe.tokenizer, reuse, str(tmp_path), str(tmp_path / "work"), str(tmp_path / "tok"), {}, 0).run()
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == model.read_bytes()
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == spm_to_hf(model).to_str(pretty=True)

    text = tmp_path / "t.txt"
    text.write_text("\n".join(r["text"] for r in docstring_rows()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "plain"), vocab_size=300,
                                   minloglevel=2)  # sentencepiece defaults: unigram, NFKC, dummy prefix
    recipe.tokenizer.path = str(tmp_path / "plain.model")
    recipe.tokenizer.vocab_size = 300
    with pytest.raises(CurationError, match=r"lacks model_type BPE, byte_fallback, identity normalization, "
                                            r"add_dummy_prefix off, remove_extra_whitespaces off, <pad>=0"):
        resolve_tokenizer(recipe, tmp_path)
