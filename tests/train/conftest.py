"""Fixtures of the training tests: a small curated corpus of real text and launched training runs.

The corpus is Python standard-library source (on every machine), split into documents at blank-line
runs (short and long documents), tokenized with a 512-piece sentencepiece BPE trained here by the
pipeline's own tokenizer code, written as datatrove shards (datatrove's TokenizedFile: .ds uint16
tokens + .ds.index uint64 cumulative document ends) under a manifest the pipeline's reader accepts.
Two train sources (weights 0.75 / 0.25, two shards each) and a validation split.
"""

from __future__ import annotations

import json
import os
import shutil
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bench.scale_runs import deepspeed_cmd
from tests.conftest import built_once
from train.metrics import read_metrics  # noqa: F401  (for the tests)

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"
VOCAB = 512
SOURCES = {"stdlib_a": 0.75, "stdlib_b": 0.25}
LAUNCH_TIMEOUT = 420  # the first launch on a machine JIT-builds DeepSpeed's CPU comm op (~1.5 min)

# The tiny preset shrunk for CPU tests: 2 ranks x micro-batch 2 x 2 accumulation x 64 tokens per step.
BASE_SETS = [
    f"model.vocab_size={VOCAB}", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_tokens=512",
    "train.max_steps=16", "train.lr=3e-3", "train.warmup_steps=4", "train.eval_every=6", "train.eval_sequences=10",
    "train.save_every=6", "train.keep_last=3", "train.log_every=4", "train.precision=fp32",
    "train.ds_config=ds_configs/zero2.json", "train.wandb.mode=disabled",
]


def stdlib_documents(n_files: int = 48) -> list[list[str]]:
    """Documents per file: the blank-line-separated blocks of stdlib modules (short and long)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:n_files]
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append([chunk.strip("\n") + "\n" for chunk in text.split("\n\n") if chunk.strip()])
    return docs


def write_shard(folder: Path, name: str, docs: list[list[int]]) -> None:
    from datatrove.pipeline.tokens.tokenizer import TokenizedFile

    folder.mkdir(parents=True, exist_ok=True)
    out = TokenizedFile(str(folder), name, save_index=True, token_size=2)
    for tokens in docs:
        out.write(tokens, None)
    out.close()


def make_corpus(root: Path) -> Path:
    """Write tokenizer, shards and manifest.json under `root`; return the manifest path."""
    import sentencepiece as spm

    from config.manifest import FORMAT_VERSION, sha256_of
    from pipeline.finalize import shard_entry
    from pipeline.spm_tokenizer import spm_to_hf

    per_file = stdlib_documents()
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "train.txt").write_text("".join(d for docs in per_file for d in docs))
    spm.SentencePieceTrainer.train(  # the contract's special ids; byte fallback: no <unk> from text
        input=str(tok_dir / "train.txt"), model_prefix=str(tok_dir / "tokenizer"), model_type="bpe",
        vocab_size=VOCAB, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    (tok_dir / "train.txt").unlink()
    model = tok_dir / "tokenizer.model"
    spm_to_hf(model).save(str(tok_dir / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    eos = sp.eos_id()
    names = list(SOURCES)
    splits: dict[str, dict] = {}
    for split in ("train", "validation"):
        sources = []
        for s, name in enumerate(names):
            # every 8th file is held out; the rest alternate between the two sources
            files = [docs for i, docs in enumerate(per_file) if (i % 8 == 7) == (split == "validation")]
            mine = [d for i, docs in enumerate(files) if i % 2 == s for d in docs]
            encoded = [ids + [eos] for ids in sp.encode(mine)]
            folder = root / "tokens" / split / name
            half = len(encoded) // 2
            for k, part in enumerate((encoded[:half], encoded[half:])):
                write_shard(folder, f"{k:03d}_{name}.ds", part)
            shards = [shard_entry(p, root, 2) for p in sorted(folder.glob("*.ds"))]
            sources.append({"name": name, "weight": SOURCES[name], "folder": str(folder.relative_to(root)),
                            "documents": sum(x["documents"] for x in shards),
                            "tokens": sum(x["tokens"] for x in shards), "shards": shards})
        splits[split] = {"documents": sum(x["documents"] for x in sources),
                         "tokens": sum(x["tokens"] for x in sources), "sources": sources}
    manifest = {
        "format_version": FORMAT_VERSION, "created": "2026-11-23T00:00:00Z",
        "recipe": {"name": "stdlib-test", "sha256": "0" * 64},
        "tokenizer": {"model": "tokenizer/tokenizer.model", "json": "tokenizer/tokenizer.json",
                      "sha256": sha256_of(model), "json_sha256": sha256_of(tok_dir / "tokenizer.json"),
                      "vocab_size": VOCAB, "bos_id": 1, "eos_id": eos, "pad_id": 0, "unk_id": 3},
        "token_dtype": "uint16", "token_size": 2, "splits": splits,
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """manifest.json of the test corpus (one per test run, also with xdist: run_a's manifest)."""
    return built_once(tmp_path_factory, "corpus", make_corpus)


# ---- launching runs -----------------------------------------------------------------------------------
def run_env() -> dict[str, str]:
    """The launched runs are CPU worlds of gloo processes (bitwise-resume assertions are about CPU float32), also on
    a GPU machine, whose one GPU could not hold 2-4 ranks anyway: CUDA hidden, DeepSpeed's CPU accelerator."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build DeepSpeed's shared-memory allreduce op (a gloo world's first start compiles it) once, before any
    launched world: the launcher SIGKILLs the other ranks when one fails, and a rank killed while compiling
    leaves a stale build lock that every later launched test then refuses (train/ds_ops.py)."""
    def build(folder: Path) -> Path:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "build_ds_shm_op.py")], cwd=REPO,
                              env=run_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, f"building DeepSpeed's shm op failed:\n{proc.stderr[-3000:]}"
        return folder

    if importlib.util.find_spec("deepspeed") is not None:
        built_once(tmp_path_factory, "deepspeed_ops", build)


def launch_cmd(nprocs: int, manifest: Path, out: Path, sets: list[str], resume: str = "auto") -> list[str]:
    return deepspeed_cmd(nprocs, "tiny", [*BASE_SETS, f"data.manifest={manifest}", *sets], resume, out)


def train_run(nprocs: int, manifest: Path, out: Path, sets: list[str] = (), resume: str = "auto") -> Path:
    """Run to the end; fail the test with the output's tail if the run fails."""
    cmd = launch_cmd(nprocs, manifest, out, list(sets), resume)
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"training run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    port = cmd[cmd.index("--master_port") + 1]
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the run left DeepSpeed's shared-memory segments behind: {leaked}"
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out


def copy_checkpoint(src_run: Path, step: int, out: Path) -> None:
    """Copy run `src_run`'s step-`step` checkpoint into run folder `out` (which then resumes from it)."""
    tag = f"step_{step:08d}"
    shutil.copytree(src_run / "checkpoints" / tag, out / "checkpoints" / tag)


@pytest.fixture(scope="session")
def run_a(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared reference run: ZeRO-2 fp32, 2 ranks, 16 steps, checkpoints at 6, 12, 16, final export (one
    per test run, also with xdist: the tests only read it or copy its checkpoints)."""
    return built_once(tmp_path_factory, "run_a", lambda folder: train_run(2, corpus, folder))
