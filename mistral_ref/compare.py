"""Cross-engine comparison, teacher-forced: mistral-ref and another engine read the same token ids,
and at every position their next-token distributions are compared.

Engines (each an optional extra; `ENGINES`):
  llama_cpp     llama-cpp-python on the GGUF file, all-position logits (logits_all).
  transformers  HF transformers on the checkpoint directory (or the GGUF file, which transformers
                dequantizes), float32, eager attention.
  mistralrs     the mistralrs wheel on the GGUF file. Its Python API returns no prompt logits, so
                each position is a one-token chat request on the prompt's prefix, with a chat
                template that is only the message's text (jinja_explicit) and top_logprobs=20:
                only those 20 log-probs are known. A prefix whose text mistral.rs tokenizes to
                another length is skipped.

Per position: max |logit difference| (logits as each engine returns them), whether the most
likely token is the same, and KL(mistral-ref || other) of the softmax distributions. With
mistralrs, differences are over its top 20 tokens and the KLD is between both distributions
renormalized to them (`restricted: true` in the report).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral_ref.errors import MistralRefError
from mistral_ref.model import Model
from mistral_ref.tokenizer import Tokenizer

ENGINES = ("llama_cpp", "transformers", "mistralrs")
MISTRALRS_TOP = 20


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float (..., vocab) logits."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Positions:
    """What the other engine gave for each position: full logits (n, vocab), or the top log-probs
    `ids` / `logprobs` (n, k) with `valid` (n,) marking positions it could score."""

    logits: np.ndarray | None = None
    ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    valid: np.ndarray | None = None


def position_metrics(ours: np.ndarray, theirs: Positions) -> dict[str, list]:
    """Per position: max_abs_logit_diff, top1_agree, kld (KL(ours || theirs)); None where the
    other engine could not score a position."""
    if theirs.logits is not None:
        other = np.asarray(theirs.logits, np.float32)
        p, q = log_softmax(ours), log_softmax(other)
        kld = (np.exp(p) * (p - q)).sum(axis=-1)
        return {"max_abs_logit_diff": np.abs(ours - other).max(axis=-1).tolist(),
                "top1_agree": (ours.argmax(-1) == other.argmax(-1)).tolist(), "kld": kld.tolist()}
    out: dict[str, list] = {"max_abs_logit_diff": [], "top1_agree": [], "kld": []}
    mine = log_softmax(ours)
    for t in range(len(ours)):
        if not theirs.valid[t]:
            for values in out.values():
                values.append(None)
            continue
        ids, q = theirs.ids[t], np.asarray(theirs.logprobs[t], np.float64)
        p = mine[t, ids]
        out["max_abs_logit_diff"].append(float(np.abs(p - q).max()))  # log-prob differences
        out["top1_agree"].append(bool(ours[t].argmax() == ids[0]))
        pr, qr = p - np.log(np.exp(p).sum()), q - np.log(np.exp(q).sum())
        out["kld"].append(float((np.exp(pr) * (pr - qr)).sum()))
    return out


class _LlamaCpp:
    def __init__(self, model: Path, n_ctx: int, threads: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MistralRefError("--engine llama_cpp needs llama-cpp-python") from None
        if model.is_dir():
            raise MistralRefError("--engine llama_cpp reads GGUF files, not checkpoint directories")
        self.llm = Llama(model_path=str(model), n_ctx=n_ctx, logits_all=True, verbose=False,
                         n_threads=threads, n_batch=n_ctx)

    def positions(self, ids: list[int], tokenizer: Tokenizer) -> Positions:
        self.llm.reset()
        self.llm.eval(ids)
        return Positions(logits=np.array(self.llm.scores[:len(ids)], np.float32))


class _Transformers:
    def __init__(self, model: Path, n_ctx: int, threads: int):
        try:
            import torch
            import transformers
        except ImportError:
            raise MistralRefError("--engine transformers needs torch and transformers") from None
        torch.set_num_threads(threads)
        where = (dict(pretrained_model_name_or_path=str(model)) if model.is_dir() else
                 dict(pretrained_model_name_or_path=str(model.parent), gguf_file=model.name))
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            **where, dtype=torch.float32, attn_implementation="eager").eval()

    def positions(self, ids: list[int], tokenizer: Tokenizer) -> Positions:
        with self.torch.no_grad():
            return Positions(logits=self.model(self.torch.tensor([ids])).logits[0].float().numpy())


class _Mistralrs:
    def __init__(self, model: Path, n_ctx: int, threads: int):
        try:
            import mistralrs
        except ImportError:
            raise MistralRefError("--engine mistralrs needs the mistralrs wheel") from None
        if model.is_dir():
            raise MistralRefError("--engine mistralrs is run on GGUF files here")
        self.mistralrs = mistralrs
        self.template = tempfile.NamedTemporaryFile("w", suffix=".jinja")  # kept open: mistral.rs reads it
        self.template.write("{{ messages[0]['content'] }}")
        self.template.flush()
        self.runner = mistralrs.Runner(which=mistralrs.Which.GGUF(
            quantized_model_id=str(model.parent), quantized_filename=model.name), token_source="none",
            jinja_explicit=self.template.name)

    def positions(self, ids: list[int], tokenizer: Tokenizer) -> Positions:
        n = len(ids)
        out = Positions(ids=np.zeros((n, MISTRALRS_TOP), np.int64), logprobs=np.zeros((n, MISTRALRS_TOP)),
                        valid=np.zeros(n, bool))
        for t in range(n):
            prefix = tokenizer.decode(ids[:t + 1])
            response = self.runner.send_chat_completion_request(self.mistralrs.ChatCompletionRequest(
                model="default", messages=[{"role": "user", "content": prefix}], max_tokens=1,
                logprobs=True, top_logprobs=MISTRALRS_TOP))
            top = response.choices[0].logprobs.content[0].top_logprobs
            if response.usage.prompt_tokens != t + 1 or len(top) < MISTRALRS_TOP:
                continue  # the text does not tokenize back to this prefix
            out.ids[t] = [entry.token for entry in top]
            out.logprobs[t] = [entry.logprob for entry in top]
            out.valid[t] = True
        return out


_ENGINE_CLASSES = {"llama_cpp": _LlamaCpp, "transformers": _Transformers, "mistralrs": _Mistralrs}


class Comparer:
    """mistral-ref and one other engine, each loaded once: what a process, or a Ray actor, holds."""

    def __init__(self, model_path: str | os.PathLike, engine: str, activations: str = "f32",
                 n_ctx: int = 2048, threads: int | None = None):
        if engine not in ENGINES:
            raise MistralRefError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        if threads:
            import numba
            numba.set_num_threads(threads)
        path = Path(model_path)
        self.model = Model.load(path, activations=activations)
        self.tokenizer = Tokenizer.of_model(self.model.file)
        self.other = _ENGINE_CLASSES[engine](path, n_ctx, threads or os.cpu_count() or 1)

    def compare(self, prompt: str) -> dict[str, Any]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        ours = self.model.logits(ids)
        metrics = position_metrics(ours, self.other.positions(ids, self.tokenizer))
        return {"prompt": prompt, "token_ids": ids, **metrics}


def summary(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Over every scored position of every prompt."""
    values = lambda key: [v for p in prompts for v in p[key] if v is not None]  # noqa: E731
    diffs, kld, agree = values("max_abs_logit_diff"), values("kld"), values("top1_agree")
    return {"positions": len(diffs), "max_abs_logit_diff": max(diffs, default=0.0),
            "mean_abs_logit_diff": float(np.mean(diffs)) if diffs else 0.0,
            "top1_agreement": float(np.mean(agree)) if agree else 0.0,
            "mean_kld": float(np.mean(kld)) if kld else 0.0, "max_kld": max(kld, default=0.0)}


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Per position max |logit difference| and KLD, one line per prompt."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MistralRefError("the plot needs matplotlib: pip install 'mistral-ref[bench]'") from None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, p in enumerate(report["prompts"]):
        x = [t for t, v in enumerate(p["kld"]) if v is not None]
        top.plot(x, [p["max_abs_logit_diff"][t] for t in x], label=f"prompt {i}")
        bottom.plot(x, [max(p["kld"][t], 1e-12) for t in x])
    top.set_ylabel("max |logit difference|" if not report["restricted"] else "max |log-prob difference|")
    bottom.set_ylabel("KL(mistral-ref || other)")
    bottom.set_yscale("log")
    bottom.set_xlabel("position")
    top.set_title(f"{Path(report['model']).name}: mistral-ref ({report['activations']}) vs {report['engine']}")
    if len(report["prompts"]) <= 10:
        top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
