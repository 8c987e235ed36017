"""Fine-tuning sequences from JSON-lines records, in the shape the trainer takes (train/data.py's).

Shape legend: b micro-batch, l train.seq_len.

A record is {"text": ...} (the loss on every token) or {"prompt": ..., "response": ...} (the loss on the
response's tokens and the EOS only); the keys are finetune.text_key / prompt_key / response_key. It is
tokenized with the checkpoint's own tokenizer as pretraining's documents were (docs/data_contract.md:
no BOS unless finetune.bos, </s> appended), into one row of l + 1 tokens at most:

    tokens  = [<s>]? prompt response </s>          (truncated at l + 1; a prompt of l tokens or more is refused)
    input_ids = tokens[:-1], labels = tokens[1:] with -100 where the target is a prompt token (or <s>)

and right-padded to l with <pad> (labels -100): the model is causal, so padding changes no real token.

Sample order: global sample i is record perm_e[i mod n] of epoch e = i // n, perm_e a permutation seeded
by (seed, e): a pure function of i, so a resumed run continues exactly, on any world size, through the
same `RankBatches` as pretraining. The validation records are finetune.val_data, or a seeded
finetune.val_fraction of the records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from config.loader import ConfigError
from config.sections import FinetuneConfig
from model.loss import IGNORE_INDEX
from train.data import RankBatches, eval_index_batches, shield_worker_from_termination

log = logging.getLogger(__name__)
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass
class Example:
    """One record as model inputs: input_ids and labels, both (n,) with n <= l."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; ConfigError naming the line of a bad one."""
    if not path.is_file():
        raise ConfigError(f"fine-tuning data {path} does not exist: pass a JSON-lines file")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not JSON ({exc.msg}): one JSON object per line") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: a {type(record).__name__}, not a JSON object")
            records.append((number, record))
    if not records:
        raise ConfigError(f"fine-tuning data {path} holds no record: one JSON object per line")
    return records


class RecordEncoder:
    """Records -> Examples with the checkpoint's tokenizer (see the module doc)."""

    def __init__(self, tokenizer_json: Path, cfg: FinetuneConfig, seq_len: int) -> None:
        from pipeline.spm_tokenizer import load_hf_tokenizer

        self.tok = load_hf_tokenizer(tokenizer_json)  # text that spells </s> stays text, as when curating
        ids = {name: self.tok.token_to_id(name) for name in (PAD, BOS, EOS)}
        if None in ids.values():
            raise ConfigError(f"{tokenizer_json} lacks the special tokens {PAD} {BOS} {EOS} (docs/data_contract.md)")
        self.pad, self.bos, self.eos = ids[PAD], ids[BOS], ids[EOS]
        self.cfg, self.seq_len = cfg, seq_len
        self.truncated = self.prompted = 0  # records cut at l + 1 tokens; prompt/response records

    def __call__(self, path: Path, number: int, record: dict) -> Example:
        c = self.cfg
        head = [self.bos] if c.bos else []
        if c.prompt_key in record or c.response_key in record:
            prompt, response = (self._text(path, number, record, k) for k in (c.prompt_key, c.response_key))
            head += self.tok.encode(prompt, add_special_tokens=False).ids
            if len(head) >= self.seq_len:
                raise ConfigError(f"{path}:{number}: the prompt is {len(head)} tokens, train.seq_len is {self.seq_len}: "
                                  "no response token would be trained on; shorten it or raise train.seq_len")
            body = self.tok.encode(response, add_special_tokens=False).ids
            self.prompted += 1
        elif c.text_key in record:
            body = self.tok.encode(self._text(path, number, record, c.text_key), add_special_tokens=False).ids
        else:
            raise ConfigError(f"{path}:{number}: the record has neither {c.text_key!r} nor {c.prompt_key!r} + "
                              f"{c.response_key!r} (keys: {', '.join(map(repr, record)) or 'none'})")
        tokens = torch.tensor(head + body + [self.eos])
        if len(tokens) > self.seq_len + 1:
            self.truncated += 1
            tokens = tokens[: self.seq_len + 1]
        labels = tokens[1:].clone()
        labels[: max(len(head) - 1, 0)] = IGNORE_INDEX  # targets that are prompt tokens (or <s>)
        return Example(tokens[:-1], labels)

    @staticmethod
    def _text(path: Path, number: int, record: dict, key: str) -> str:
        value = record.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{path}:{number}: {key!r} is {'missing' if value is None else type(value).__name__}, "
                              "not a string")
        return value


@dataclass
class ExampleSet(Dataset):
    """Global sample index -> {"input_ids", "labels", "source", "index"} over one split's examples
    (the interface of train/data.py's BlendedWindows that the trainer uses)."""

    examples: list[Example]
    name: str
    seed: int = 0
    skipped: list[str] = field(default_factory=list)
    _order: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def source_names(self) -> list[str]:
        return [self.name]

    def epochs(self, n: int) -> dict[str, float]:
        return {self.name: n / len(self.examples)}

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the records in `epoch` (the last one kept: samples arrive in order)."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=generator))
        return self._order[1]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        epoch, k = divmod(int(i), len(self.examples))
        ex = self.examples[int(self.order(epoch)[k])]
        return {"input_ids": ex.input_ids, "labels": ex.labels, "source": 0, "index": int(i)}


def collate_padded(samples: list[dict], seq_len: int, pad: int) -> dict[str, torch.Tensor]:
    """Rows right-padded to (b, l): input_ids with `pad`, labels with -100; source, index (b,)."""
    ids = torch.full((len(samples), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(samples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n] = s["input_ids"], s["labels"]
    return {"input_ids": ids, "labels": labels, "source": torch.tensor([s["source"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples])}


def hold_out(examples: list[Example], fraction: float, seed: int, what: str) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded `fraction` of `examples` (at least one when > 0) held out. `what` names
    the data and the key in the error when too few examples remain."""
    n_val = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    if n_val >= len(examples):
        raise ConfigError(f"{what}: {len(examples)} example(s) are too few to hold out {fraction:g} of them for the "
                          "eval loss: add data, or lower the fraction")
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def file_identity(paths: list[Path]) -> str:
    """sha256 over data files (a resumed run warns when they changed)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ExampleData:
    """Train and validation Examples, rows right-padded to seq_len with `pad`: what the trainer asks of
    train/data.py's TrainData. `no_validation` is the error when the eval loss is asked of an empty split."""

    def __init__(self, train: list[Example], val: list[Example], seq_len: int, pad: int, seed: int,
                 num_workers: int, no_validation: str) -> None:
        self.seq_len, self.pad, self.num_workers, self.no_validation = seq_len, pad, num_workers, no_validation
        self.train = ExampleSet(train, "train", seed)
        self._validation = ExampleSet(val, "validation", seed)

    @property
    def validation(self) -> ExampleSet:
        if not self._validation.examples:
            raise ConfigError(self.no_validation)
        return self._validation

    def _collate(self) -> Any:
        return partial(collate_padded, seq_len=self.seq_len, pad=self.pad)

    def train_loader(self, first_sample: int, n_steps: int, per_step: int, rank: int, world: int,
                     micro_batch: int, pin_memory: bool = False) -> DataLoader:
        sampler = RankBatches(first_sample, n_steps, per_step, rank, world, micro_batch)
        # its own generator: a DataLoader iterator otherwise draws its seed from torch's global RNG, which a
        # resumed run would then use differently from the run it continues (LoRA dropout masks)
        return DataLoader(self.train, batch_sampler=sampler, collate_fn=self._collate(), num_workers=self.num_workers,
                          pin_memory=pin_memory, generator=torch.Generator().manual_seed(first_sample),
                          worker_init_fn=shield_worker_from_termination if self.num_workers else None)

    def eval_batches(self, n_sequences: int, rank: int, world: int, micro_batch: int) -> tuple[list[dict], int]:
        """This rank's validation micro-batches (each validation record at most once) and the forward passes per rank."""
        n = min(n_sequences, len(self.validation))
        index_batches, n_forward = eval_index_batches(n, rank, world, micro_batch)
        collate = self._collate()
        return [collate([self._validation[i] for i in idx]) for idx in index_batches], n_forward


class FinetuneData(ExampleData):
    """Train and validation examples of a fine-tuning run."""

    def __init__(self, cfg: FinetuneConfig, tokenizer_json: Path, seq_len: int, seed: int,
                 num_workers: int = 0) -> None:
        if cfg.data is None:
            raise ConfigError("finetune.data is not set: pass --data FILE.jsonl")
        self.paths = [Path(cfg.data)] + ([Path(cfg.val_data)] if cfg.val_data else [])
        encode = RecordEncoder(tokenizer_json, cfg, seq_len)
        train = [encode(self.paths[0], n, r) for n, r in read_records(self.paths[0])]
        if cfg.val_data:
            val = [encode(self.paths[1], n, r) for n, r in read_records(self.paths[1])]
        else:
            train, val = hold_out(train, cfg.val_fraction, seed, f"{self.paths[0]} (finetune.val_fraction; or set "
                                  "finetune.val_data)")
        if encode.truncated:
            log.warning("%d record(s) longer than train.seq_len + 1 = %d tokens: cut there", encode.truncated, seq_len + 1)
        self.prompted = encode.prompted
        super().__init__(train, val, seq_len, encode.pad, seed, num_workers,
                         "no validation records (finetune.val_fraction=0 and no finetune.val_data): "
                         "set train.eval_every=0, finetune.val_fraction or finetune.val_data")

    def identity(self) -> str:
        return file_identity(self.paths)

    def describe(self) -> str:
        return (f"data: {', '.join(map(str, self.paths))}: {len(self.train)} train / {len(self._validation)} "
                f"validation records ({self.prompted} prompt/response), rows padded to {self.seq_len}")
