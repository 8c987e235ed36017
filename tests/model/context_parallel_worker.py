"""One rank of tests/model/test_context_parallel.py: `python context_parallel_worker.py RANK 4 PORT OUT`.

Builds the tiny float64 hybrid of tests/model/conftest.py (pattern MAGM: Mamba2, attention, gated memory),
computes the loss and every parameter's gradient on whole rows in this process (the reference), then the
same with each row split over a group of ranks (gloo; two groups of 2, then one of 4), the gradients summed
over the group, and rank 0 writes the largest relative errors over the ranks, per case, to OUT (JSON). Cases: packed documents (boundaries inside slices, one
exactly at a slice boundary, and a row that is one document across every rank), plain rows, and packed
documents under activation checkpointing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from model.context_parallel import ContextParallel
from model.loss import IGNORE_INDEX, token_nll

LENGTH = 32  # whole row: 16 tokens per rank at 2 ranks, 8 (two chunks of 4) at 4
DOCS = ([3, 13, 9, 7], [32])  # row 0: boundaries at 3, 16 (a slice boundary), 25; row 1: one document


def _conftest():
    spec = importlib.util.spec_from_file_location("model_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(vocab: int, documents: bool) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (len(DOCS), LENGTH + 1), generator=gen)
    labels = ids[:, 1:].clone()
    seq_idx = None
    if documents:
        seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in DOCS])
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        labels[:, :-1] = labels[:, :-1].masked_fill(starts[:, 1:], IGNORE_INDEX)  # as train/data.py's collate
    return {"input_ids": ids[:, :-1], "labels": labels, "seq_idx": seq_idx}


def _loss_and_grads(model, batch, n_scored: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], seq_idx=batch["seq_idx"])
    loss = token_nll(logits, batch["labels"]).sum() / n_scored
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worst_over_ranks(errors: dict[str, dict]) -> dict[str, dict]:
    """Every rank's errors, the largest of each case kept (every group is checked, not only rank 0's)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, errors)
    return {case: max((e[case] for e in everyone), key=lambda e: max(e["loss"], e["grad"])) for case in errors}


def main(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    conftest = _conftest()
    torch.manual_seed(0)
    reference = conftest.HybridLM(conftest._tiny_config("MAGM")).double()
    conftest._randomize_vectors_(reference, 0)
    reference.set_impl("reference")
    split = copy.deepcopy(reference)
    errors = {}
    for size in (2, 4):  # groups of consecutive ranks (as DeepSpeed's sequence-parallel groups): 2 x 2, then 1 x 4
        groups = [dist.new_group(list(range(g, g + size))) for g in range(0, world, size)]  # every rank makes all
        group, cp_rank = groups[rank // size], rank % size
        split.context_parallel = ContextParallel(group, cp_rank, size)
        l = LENGTH // size
        for case, documents, checkpointing in (("documents", True, False), ("plain", False, False),
                                               ("documents_checkpointed", True, True)):
            batch = _batch(reference.cfg.vocab_size, documents)
            n_scored = int((batch["labels"] != IGNORE_INDEX).sum())
            want_loss, want = _loss_and_grads(reference, batch, n_scored)
            split.train(checkpointing)
            split.activation_checkpointing = checkpointing
            mine = {k: None if v is None else v[:, cp_rank * l : (cp_rank + 1) * l] for k, v in batch.items()}
            loss, grads = _loss_and_grads(split, mine, n_scored)
            dist.all_reduce(loss, group=group)
            for g in grads.values():
                dist.all_reduce(g, group=group)
            grad_errs = {n: conftest._rel_err(grads[n], want[n]) for n in want}
            worst = max(grad_errs, key=grad_errs.get)
            errors[f"{size} ranks, {case}"] = {"loss": conftest._rel_err(loss, want_loss), "grad": grad_errs[worst],
                                               "worst": worst, "n_params": len(grad_errs)}
    errors = _worst_over_ranks(errors)
    if rank == 0:
        out.write_text(json.dumps(errors))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
