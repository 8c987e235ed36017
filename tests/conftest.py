"""Shared fixtures. Add fixtures here only when several test areas need them."""

from __future__ import annotations

import fcntl
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Callable

import pytest
import torch

from model import HybridLM, ModelConfig
from model.bundle import save_bundle


def repo_first_pythonpath() -> str:
    """PYTHONPATH for a child process: the repository first, then what this process was given (a GPU
    machine's packages may live in a PYTHONPATH folder, e.g. scripts/test_gpu.sh's)."""
    repo = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` of a session fixture once per test run: under pytest-xdist every worker is its own
    session, so the first worker to ask builds it in the folder the workers share (the parent of their base
    temp folders) while the others wait on a lock, then read the same result (an xdist worker would otherwise
    repeat a launched run or an export that another already made). Without xdist: a fresh folder of this session."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    done = shared / f"{name}.done"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # a failed earlier attempt's leftovers
            folder.mkdir()
            done.write_text(str(build(folder)))
        return Path(done.read_text())


def stdlib_texts(limit: int = 200) -> list[str]:
    """Real text already on every machine: Python standard-library sources (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size < 60_000)[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_test_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Small byte-level BPE (tokenizer.json) with <pad>=0 <s>=1 </s>=2 <unk>=3, trained on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(60), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="session")
def test_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory, test_tokenizer_dir: Path) -> Path:
    """A consolidated checkpoint of a small random hybrid (both block types) + tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", vocab_size=512, d_model=64, n_layers=4, pattern="MAMA", ffn_hidden=128,
                      attention={"n_heads": 4, "n_kv_heads": 2},
                      mamba={"d_state": 16, "headdim": 16, "chunk_size": 16})
    model = HybridLM(cfg)
    return save_bundle(model, test_tokenizer_dir, tmp_path_factory.mktemp("bundle"), meta={"step": 0})


def write_granite(folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random GraniteMoeHybridForCausalLM folder + tokenizer: the dense Granite 4.0-H structure
    (granite-4.0-h-micro's config: shared MLP only, num_local_experts 0, position_embedding_type "nope",
    tied embeddings, its four multipliers, GQA 4:1, one SSM group) at tiny widths. The weights are redrawn
    with std 0.1 (transformers' init leaves norms at 1 and A/D/dt_bias at constants) so every tensor counts."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    values = dict(vocab_size=512, hidden_size=64, num_hidden_layers=5, layer_types=["mamba", "mamba", "attention",
                  "mamba", "attention"], num_attention_heads=4, num_key_value_heads=1, shared_intermediate_size=96,
                  intermediate_size=96, num_local_experts=0, num_experts_per_tok=0, position_embedding_type="nope",
                  embedding_multiplier=12.0, residual_multiplier=0.246, attention_multiplier=0.0078125,
                  logits_scaling=8.0, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                  mamba_expand=2, mamba_chunk_size=16, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = GraniteMoeHybridConfig(**{**values, **overrides})
    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(str(folder))
    (folder / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="session")
def granite_factory():
    """`write_granite` for the test areas that import Granite 4.0-H folders (export, train)."""
    return write_granite


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (-n 2 on CI's 2 cores): work-stealing scheduling unless --dist is given, and each
    worker and the processes it starts get their share of the cores (unless OMP_NUM_THREADS is set;
    tests/model sets 1 thread too): torch's intra-op threads default to every core, and beside the other
    worker (and a launched run's ranks) each parallel op then waits on a descheduled thread."""
    explicit = any(a.startswith("--dist") or a == "-d" for a in config.invocation_params.args)
    if getattr(config.option, "dist", None) == "load" and not explicit:
        # `-n 2` alone schedules with "load", which hands each worker a share of the tests up front and never
        # takes them back, so one worker can sit idle at the end while the other works through its queue;
        # "worksteal" lets the idle worker take queued tests from the other (bench/results/test_suite_cpu_*).
        config.option.dist = "worksteal"
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes the tests start
        torch.set_num_threads(threads)  # this worker (torch is imported already)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist: the tests marked slow first (a stable sort: the order within each group stays).
    The scheduler hands tests out in collection order (worksteal, pytest_configure: an idle worker takes from
    the end of the other's queue), so the launched runs of tests/train (last alphabetically) would start at
    the end, the last of them on one worker while the other had nothing left to take; started first, they
    overlap each other and the many short tests at the queues' ends fill both workers.
    Every worker collects the same order (xdist requires it); a run without xdist keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
