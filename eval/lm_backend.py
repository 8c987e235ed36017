"""The hybrid model as an lm-evaluation-harness backend, registered as `hybrid`.

    lm = HybridEvalLM(checkpoint="runs/x/consolidated", device="cuda", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])      # or --model hybrid --model_args checkpoint=...

Conventions follow lm-eval's HFLM so scores are comparable with the `hf` backend:
- (context, continuation) pairs are tokenized jointly and split at the context's token length
  (TemplateLM._encode_pair), empty contexts condition on `prefix_token_id`;
- requests are sorted longest first, right-padded and scored one forward per batch; requests that
  share context + continuation[:-1] share one forward (lm-eval's Collator, group_by="contexts");
- rolling log-likelihoods use lm-eval's disjoint windows of `max_length` tokens.
Differences: only the continuation positions go through the LM head (not the whole (b, l, vocab)),
and generation uses the model's cached decoding (model.generation.generate: one prefill, then O(1)
per token for Mamba2 layers) instead of `transformers.generate`.

Registration happens on import of this module (see eval/lm_eval_cli.py for the CLI).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (registers lm-eval's backends first: its get_model() only
# imports them while the registry is empty, so registering ours alone would hide "hf" & co.)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from export.loading import load_checkpoint
from model.bundle import Bundle
from model.decode_graph import decode_graph_enabled
from model.generation import SamplingParams, generate

log = logging.getLogger(__name__)

BACKEND_NAME = "hybrid"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A request as TemplateLM hands it over: (cache key or None, context ids, continuation ids).
TokenRequest = tuple[Any, list[int], list[int]]


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but torch sees no CUDA device (use --device cpu)")
    return dev


@register_model(BACKEND_NAME)
class HybridEvalLM(TemplateLM):
    """lm-eval backend for a consolidated checkpoint folder (model/bundle.py).

    Args (`--model_args key=value` on lm-eval's CLI, except device and batch_size: lm-eval's CLI passes
    its own `--device` / `--batch_size` flags, so naming them in --model_args too fails):
        checkpoint: bundle folder (model.safetensors, config.json, tokenizer.json).
        device: auto | cpu | cuda | cuda:N (CLI: --device).
        dtype: auto (the checkpoint's) | float32 | bfloat16 | float16.
        batch_size: sequences per forward pass (an integer; "auto" is not supported; CLI: --batch_size).
        max_length: context window in tokens; default the model's max_seq_len.
        max_gen_toks: default generation budget when a task sets none (HFLM's default, 256).
        prefix_token_id: token that conditions empty contexts and rolling windows; default EOS,
            the token that precedes every document in the EOS-separated training stream.
        max_batch_size: accepted for lm-eval compatibility, unused.
        cuda_graph: generate_until decodes through a CUDA graph (model/decode_graph.py): auto (the
            default: on for CUDA devices), true (CUDA only) or false.
    """

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        max_batch_size: int | None = None,
        cuda_graph: bool | str = "auto",
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for the {BACKEND_NAME} backend, got {batch_size!r}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        self._device = resolve_device(device)
        self._cuda_graph = decode_graph_enabled(cuda_graph, self._device)
        # any folder the other stages read: a bundle, or a Hugging Face folder imported on load
        bundle = load_checkpoint(checkpoint, self._device, DTYPES.get(dtype))
        self.bundle: Bundle = bundle
        self.model = bundle.model.eval()
        self.tokenizer = bundle.tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or self.model.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = prefix_token_id
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {bundle.folder} has no EOS token")

    # ---- properties lm-eval reads ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id if self._prefix_token_id is None else int(self._prefix_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eot_token_id if pad is None else pad

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.bundle.folder).replace("/", "__")

    def get_model_info(self) -> dict:
        """Merged into lm-eval's results['config']."""
        p = next(self.model.parameters())
        return {
            "checkpoint": str(self.bundle.folder),
            "step": self.bundle.meta.get("step"),
            "model_num_parameters": sum(x.numel() for x in self.model.parameters()),
            "model_dtype": str(p.dtype),
            "model_impl": self.model.impl,
            "max_length": self.max_length,
            "prefix_token_id": self.prefix_token_id,
        }

    # ---- tokenization -----------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of `string`; add_special_tokens None: the tokenizer's own default (as HFLM)."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- scoring ----------------------------------------------------------------------------------
    def _continuation_logprobs(self, rows: list[list[int]], n_scored: list[int]) -> list[torch.Tensor]:
        """Right-pad `rows`, run one forward, return per row the log-probs (k, vocab) float32 of the
        tokens at its last k = n_scored positions' next-token predictions."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            h = self.model.hidden_states(ids)  # (b, l, d); right padding leaves earlier positions unchanged
            picked = torch.cat([h[i, len(r) - k: len(r)] for i, (r, k) in enumerate(zip(rows, n_scored))])
            # the head of HybridLM.forward, applied only to the scored positions: (sum k, vocab)
            logits = self.model.logits(picked)
            return list(torch.log_softmax(logits.float(), dim=-1).split(n_scored))

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy decode) per request."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-(len(r[1]) + len(r[2])), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            rows = []
            for key, ctx, cont in chunk:
                if not cont:
                    raise ValueError(f"request {key!r} has an empty continuation: nothing to score")
                if len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])  # left-truncate like HFLM
            logprobs = self._continuation_logprobs(rows, [len(cont) for _, _, cont in chunk])
            for (key, ctx, cont), lp in zip(chunk, logprobs):
                # requests sharing ctx + cont[:-1] end at the same position: score each on its tail
                for key_i, cont_i, lp_i in collator.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                             logits=lp.unsqueeze(0)):
                    answer = score_continuation(lp_i[0, -len(cont_i):], cont_i)
                    results.append(answer)
                    if key_i is not None:
                        self.cache_hook.add_partial("loglikelihood", key_i, answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string over lm-eval's disjoint windows of max_length tokens."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if a task asks) continuations, cut at the first stop string."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            params = self._sampling_params(kwargs)
            max_ctx = self.max_length - params.max_new_tokens
            if max_ctx < 1:
                raise ValueError(f"max_gen_toks ({params.max_new_tokens}) must be below max_length ({self.max_length})")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) or [self.prefix_token_id] for c in contexts]
            new_tokens = generate(self.model, prompts, params, eos_id=self.eot_token_id, pad_id=self.pad_token_id,
                                  should_stop=StopOnText(self, until), cuda_graph=self._cuda_graph)
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, new_tokens):
                text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    @staticmethod
    def _sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
        """lm-eval's normalized gen kwargs (max_gen_toks, do_sample, temperature, ...) -> SamplingParams."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", None) or 0.0)
        params = SamplingParams(
            max_new_tokens=int(kwargs.pop("max_gen_toks")),
            temperature=temperature if do_sample else 0.0,
            top_k=int(kwargs.pop("top_k", None) or 0),
            top_p=float(kwargs.pop("top_p", None) or 1.0),
            repetition_penalty=float(kwargs.pop("repetition_penalty", None) or 1.0),
        )
        if kwargs:
            log.warning("generate_until ignores unsupported generation kwargs: %s", sorted(kwargs))
        return params


class StopOnText:
    """`should_stop` for model.generation.generate: stop a row once its decoded text holds a stop string."""

    def __init__(self, lm: HybridEvalLM, until: list[str]) -> None:
        self.lm = lm
        self.until = [s for s in until if s]

    def __call__(self, row: int, tokens: list[int]) -> bool:
        text = self.lm.tok_decode(tokens)
        return any(s in text for s in self.until)


def score_continuation(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """logprobs: (k, vocab) next-token log-probs at the continuation's k positions ->
    (sum of the continuation's log-probs, every continuation token is the argmax)."""
    target = torch.as_tensor(continuation, dtype=torch.long, device=logprobs.device)
    total = logprobs.gather(-1, target.unsqueeze(-1)).sum()
    return float(total), bool((logprobs.argmax(-1) == target).all())
