"""The tokenizer: sentencepiece BPE trained on curated text, plus an HF `tokenizer.json` with identical ids.

sentencepiece settings (docs/data_contract.md): BPE, byte fallback (no <unk> from text), special
pieces <pad>=0 <s>=1 </s>=2 <unk>=3, identity normalization, whitespace kept as is (no dummy prefix,
no collapsing of runs, whitespace-only pieces allowed: indentation becomes few tokens), digits split,
and "\\n" as a user-defined piece (sentencepiece trains on lines, so it never sees newlines otherwise).

The HF file is built from the model's pieces: a BPE with the same vocabulary, merges ordered by piece
score (transformers' `generate_merges`, as its Llama converter does), " " -> "▁" normalization, byte
fallback, and "\\n" as an added token. Control pieces are registered as special tokens so decoders can
skip them; `load_hf_tokenizer` sets `encode_special_tokens` so a literal "</s>" in text is encoded as
text, as sentencepiece does (the flag is not stored in tokenizer.json).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from config.recipe import TokenizerConfig
from pipeline.layout import require_documents
from pipeline.splits import unit_hash

SPECIAL_PIECES = {"pad": (0, "<pad>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "unk": (3, "<unk>")}
MODEL_NAME, JSON_NAME = "tokenizer.model", "tokenizer.json"


def train_sentencepiece(text_file: Path, model_prefix: Path, cfg: TokenizerConfig) -> Path:
    """Train on every line of `text_file` (subsample it first: sentencepiece's own sampling is not
    reproducible across processes); returns the .model path."""
    import sentencepiece as spm

    ids = {f"{k}_id": i for k, (i, _) in SPECIAL_PIECES.items()}
    pieces = {f"{k}_piece": p for k, (_, p) in SPECIAL_PIECES.items()}
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(model_prefix), model_type="bpe", vocab_size=cfg.vocab_size,
        byte_fallback=True, **ids, **pieces, user_defined_symbols=["\n"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=cfg.split_digits,
        character_coverage=cfg.character_coverage, max_sentence_length=cfg.max_sentence_length,
        num_threads=len(os.sched_getaffinity(0)), minloglevel=2,
    )
    return _strip_run_details(model_prefix.with_suffix(".model"))


def _strip_run_details(model_file: Path) -> Path:
    """Clear the training paths and thread count sentencepiece records, so that the same sample gives
    the same model bytes in any output folder on any machine."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    for field in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(field)
    model_file.write_bytes(proto.SerializeToString())
    return model_file


def spm_to_hf(model_file: Path):
    """tokenizers.Tokenizer giving the same ids as the sentencepiece model (one that passes `check_model`)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    unk, control, user = (sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Value(t)
                          for t in ("UNKNOWN", "CONTROL", "USER_DEFINED"))
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    special = [p.piece for p in proto.pieces if p.type in (unk, control)]
    user_defined = [p.piece for p in proto.pieces if p.type == user]
    merges = generate_merges(vocab, [(p.piece, p.score) for p in proto.pieces], skip_tokens=special + user_defined)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece,
                               fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in user_defined])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in special])
    return tok


def load_hf_tokenizer(path: str | Path):
    """Load tokenizer.json for encoding curated text exactly as the sentencepiece model does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def check_model(model_file: Path) -> None:
    """ValueError unless the model is one `spm_to_hf` converts exactly: BPE with byte fallback, identity
    normalization, whitespace kept, and <pad>=0 <s>=1 </s>=2 <unk>=3 (the data contract)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception:  # protobuf's DecodeError has no stable import path
        raise ValueError(f"{model_file} is not a sentencepiece model") from None
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    ids = {p: i for i, p in enumerate(x.piece for x in proto.pieces[:4])}
    wanted = {
        "model_type BPE": spec.model_type == pb.TrainerSpec.BPE,
        "byte_fallback": spec.byte_fallback,
        "identity normalization": norm.name == "identity" and not norm.precompiled_charsmap,
        "add_dummy_prefix off": not norm.add_dummy_prefix,
        "remove_extra_whitespaces off": not norm.remove_extra_whitespaces,
        "<pad>=0 <s>=1 </s>=2 <unk>=3": ids == {p: i for _, (i, p) in SPECIAL_PIECES.items()},
    }
    missing = [k for k, ok in wanted.items() if not ok]
    if missing:
        raise ValueError(f"{model_file} lacks {', '.join(missing)} (train it with pipeline/spm_tokenizer.py settings)")


def subsample_lines(src: Path, dst: Path, max_lines: int, seed: int) -> int:
    """Copy at most ~`max_lines` lines of `src` to `dst`, each kept with the same seeded probability."""
    keep = min(1.0, max_lines / max(_count_lines(src), 1))
    kept = 0
    with open(src, encoding="utf-8") as lines, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(lines):
            if keep == 1.0 or unit_hash(seed, str(i)) < keep:
                out.write(line)
                kept += 1
    return kept


def _count_lines(path: Path, chunk: int = 1 << 24) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(chunk), b""))


def write_training_sample(curated_train: Path, weights: dict[str, float], sample_docs: int, seed: int,
                          out_file: Path) -> int:
    """Write ~`sample_docs` curated training documents to `out_file`, each source contributing its
    weight's share, chosen uniformly by id hash; returns the number written."""
    written = 0
    with open(out_file, "w", encoding="utf-8") as out:
        for source, weight in weights.items():
            files = sorted((curated_train / source).glob("*.jsonl"))
            total = sum(_count_lines(f) for f in files)
            quota = math.ceil(sample_docs * weight)
            keep = min(1.0, 1.1 * quota / max(total, 1))  # 10% slack so the quota fills in one pass
            taken = 0
            for f in files:
                with open(f, encoding="utf-8") as lines:
                    for line in lines:
                        if taken >= quota:
                            break
                        doc = json.loads(line)
                        if unit_hash(seed, doc["id"]) < keep:
                            out.write(doc["text"] + "\n")
                            taken += 1
            written += taken
    return written


class TokenizerStep(PipelineStep):
    """Single-task step: train (or copy) tokenizer.model and write tokenizer.json into `out_dir`."""

    name = "🔤 sentencepiece BPE"
    type = "🔢 - TOKENIZER"

    def __init__(self, cfg: TokenizerConfig, reuse: str | None, curated_train: str, work_dir: str, out_dir: str,
                 weights: dict[str, float], seed: int):
        super().__init__()
        self.cfg, self.reuse, self.seed, self.weights = cfg, reuse, seed, weights
        self.curated_train, self.work_dir, self.out_dir = Path(curated_train), Path(work_dir), Path(out_dir)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from config.atomic import atomic_write_bytes

        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.track_time(unit="tokenizer"):
            if self.reuse:
                model = Path(self.reuse)
            else:
                # checked here too (Slurm/Ray stages run without the local executor's check): sentencepiece
                # on an empty sample dies with a long traceback
                require_documents(self.curated_train)
                docs, lines = self.work_dir / "sample_docs.txt", self.work_dir / "sample_lines.txt"
                self.stat_update("sample_docs", value=write_training_sample(
                    self.curated_train, self.weights, self.cfg.sample_docs, self.seed, docs))
                kept = subsample_lines(docs, lines, self.cfg.input_sentence_size, self.seed)
                self.stat_update("sample_lines", value=kept)
                model = train_sentencepiece(lines, self.work_dir / "spm", self.cfg)
            check_model(model)
            atomic_write_bytes(self.out_dir / JSON_NAME, spm_to_hf(model).to_str(pretty=True).encode())
            atomic_write_bytes(self.out_dir / MODEL_NAME, model.read_bytes())
