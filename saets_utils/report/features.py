"""Feature dashboards' numbers: what each SAE feature reads and writes, computed once per SAE and cached.

For every feature of the run's SAE, from the run's text: its density (fraction of text positions
where it is active), its top-activating contexts (token windows with the feature's activation on
each token), and its top positive and negative logit tokens (decoder row through the unembedding,
as SAEDashboard and Neuronpedia show them). A short label (the tokens it fires on most) goes next
to every feature id in plots, the explorer and the playground.

The numbers are cached in the asset cache by a fingerprint of the SAE weights, the model, the hook
and the text settings (a second run with the same SAE reuses them) and copied to
``results/<run>/features/`` (``feature_stats.safetensors`` and ``labels.csv``), where reports read them.

Example:
    >>> stats = feature_stats(run, model, sae)            # computes or loads
    >>> stats.label(2049)
    'wedding, bride, married'
    >>> load_labels(run.results_dir)[2049]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.paths import RunPaths

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

# Bump when the numbers below change meaning: cached stats of another version are recomputed.
FEATURES_VERSION = 1
CACHE_FOLDER = "features"  # in the asset cache: stats per SAE, model and text


@dataclass
class FeatureStats:
    """Dashboard numbers of an SAE with ``d_sae`` features.

    ``density [d_sae]``, ``max_act [d_sae]``; top contexts: ``ctx_tokens [d_sae, n_ctx, window]``
    (token ids, -1 = none), ``ctx_acts [d_sae, n_ctx, window]`` (the feature's activation on each
    token), ``ctx_max [d_sae, n_ctx]`` (activation at the window's focus token, 0 = no context);
    logit tokens ``pos_ids/pos_values`` and ``neg_ids/neg_values [d_sae, n_logits]``; ``vocab``:
    decoded string of every token id above; ``focus``: index of the max-activating token in a window.
    """

    density: Tensor
    max_act: Tensor
    ctx_tokens: Tensor
    ctx_acts: Tensor
    ctx_max: Tensor
    pos_ids: Tensor
    pos_values: Tensor
    neg_ids: Tensor
    neg_values: Tensor
    vocab: dict[int, str]
    focus: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.density.numel())

    def token(self, i: int) -> str:
        return self.vocab.get(int(i), f"<{int(i)}>")

    def top_tokens(self, feature: int, n: int = 3) -> list[str]:
        """The ``n`` most frequent tokens the feature fires on most (focus tokens of its top contexts)."""
        ids = [int(t) for t, a in zip(self.ctx_tokens[feature, :, self.focus], self.ctx_max[feature]) if a > 0]
        seen = Counter(_clean(self.token(t)) for t in ids)
        return [t for t, _ in seen.most_common() if t][:n]

    def logit_tokens(self, feature: int, n: int = 5, positive: bool = True) -> list[str]:
        ids = self.pos_ids if positive else self.neg_ids
        return [_clean(self.token(int(t))) for t in ids[feature, :n]]

    def label(self, feature: int, n: int = 3) -> str:
        """A short label: the tokens it fires on most, else its top logit tokens, ``dead`` if it never fires."""
        if float(self.max_act[feature]) <= 0:
            return "dead"
        return ", ".join(self.top_tokens(feature, n) or self.logit_tokens(feature, n))

    def labels(self) -> dict[int, str]:
        """Feature id -> :meth:`label` for every feature."""
        return {f: self.label(f) for f in range(self.d_sae)}

    def contexts(self, feature: int) -> list[list[tuple[str, float]]]:
        """Top contexts of ``feature``: each a list of (token, activation), strongest context first."""
        out = []
        for toks, acts, peak in zip(self.ctx_tokens[feature], self.ctx_acts[feature], self.ctx_max[feature]):
            if peak > 0:
                out.append([(self.token(int(t)), float(a)) for t, a in zip(toks, acts) if t >= 0])
        return out

    def table(self) -> pd.DataFrame:
        """One row per feature: feature, label, density, max_act, top_tokens, top_logits, bottom_logits."""
        rows = [
            {
                "feature": f,
                "label": label,
                "density": float(self.density[f]),
                "max_act": float(self.max_act[f]),
                "top_tokens": " | ".join(self.top_tokens(f, 8)),
                "top_logits": " | ".join(self.logit_tokens(f, 8)),
                "bottom_logits": " | ".join(self.logit_tokens(f, 8, positive=False)),
            }
            for f, label in self.labels().items()
        ]
        return pd.DataFrame(rows)


def _clean(tok: str) -> str:
    """A token as a label shows it: surrounding spaces dropped, newlines, control characters and
    empties made visible (labels live in a CSV and in HTML)."""
    t = "".join(c if c.isprintable() else repr(c)[1:-1] for c in tok.replace("\n", "⏎")).strip()
    return t if t else repr(tok)


def _hook_acts(model: HookedTransformer, hook_name: str, tokens: Tensor) -> Tensor:
    layer = int(hook_name.split(".")[1])
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=layer + 1)
    return cache[hook_name]


@torch.no_grad()
def logit_tokens(
    W_dec: Float[Tensor, "d_sae d_model"], W_U: Float[Tensor, "d_model d_vocab"], n: int = 10, block: int = 1024
) -> tuple[Int[Tensor, "d_sae n"], Float[Tensor, "d_sae n"], Int[Tensor, "d_sae n"], Float[Tensor, "d_sae n"]]:
    """Top ``n`` positive and negative logit tokens of each decoder row through the unembedding
    (ids and values, largest first / most negative first), in blocks of ``block`` features."""
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    W_U = W_U.float()
    for s in range(0, W_dec.shape[0], block):
        logits = W_dec[s : s + block].float().to(W_U.device) @ W_U
        hi, lo = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
        parts.append((hi.indices.cpu(), hi.values.cpu(), lo.indices.cpu(), lo.values.cpu()))
    pi, pv, ni, nv = (torch.cat(p) for p in zip(*parts))
    return pi, pv, ni, nv


@torch.no_grad()
def compute_feature_stats(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "n_seq seq_len"],
    *,
    n_contexts: int = 8,
    left: int = 10,
    right: int = 3,
    n_logits: int = 10,
    include_first_position: bool = False,
    max_resid_norm: float | None = None,
    batch_size: int = 16,
) -> FeatureStats:
    """Dashboard numbers of every feature of ``sae`` on ``tokens`` (text chunks, start token first).

    A position counts when it is not the start position (unless ``include_first_position``) and its
    residual norm is at most ``max_resid_norm`` (attention sinks left out, as in 01's effects).
    Contexts: the ``n_contexts`` sequences where the feature peaks highest (one context per
    sequence), each a window of ``left`` tokens before and ``right`` after the peak.
    """
    n_seq, seq_len = tokens.shape
    d_sae = int(sae.cfg.d_sae)
    codes = torch.zeros(n_seq, seq_len, d_sae, dtype=torch.float16)
    counted = torch.zeros(n_seq, seq_len, dtype=torch.bool)
    dev = next(sae.parameters()).device
    for s in range(0, n_seq, batch_size):
        acts = _hook_acts(model, hook_name, tokens[s : s + batch_size].to(model.cfg.device))
        mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
        if not include_first_position:
            mask[:, 0] = False
        if max_resid_norm is not None:
            mask &= acts.float().norm(dim=-1) <= max_resid_norm
        c = sae.encode(acts.to(dev, sae.W_dec.dtype)).float().clamp_min(0) * mask.to(dev)[..., None]
        codes[s : s + batch_size] = c.half().cpu()
        counted[s : s + batch_size] = mask.cpu()
    n_pos = max(int(counted.sum()), 1)
    density = (codes > 0).sum((0, 1)).double().div(n_pos).float()
    per_seq, argpos = codes.max(dim=1)  # [n_seq, d_sae]
    k = min(n_contexts, n_seq)
    peak, seqs = per_seq.float().topk(k, dim=0)  # [k, d_sae]
    pos = argpos.gather(0, seqs)  # [k, d_sae]
    offsets = torch.arange(-left, right + 1)
    win = pos.T[..., None] + offsets  # [d_sae, k, window]
    seq_idx = seqs.T[..., None].expand_as(win)
    inside = (win >= 0) & (win < seq_len)
    wc = win.clamp(0, seq_len - 1)
    ctx_tokens = torch.where(inside, tokens[seq_idx, wc], torch.full_like(wc, -1))
    feat = torch.arange(d_sae)[:, None, None].expand_as(win)
    ctx_acts = torch.where(inside, codes[seq_idx, wc, feat].float(), torch.zeros(())).half()
    W_U = model.W_U.detach()
    pi, pv, ni, nv = logit_tokens(sae.W_dec.detach().to(W_U.device), W_U, n_logits)
    assert model.tokenizer is not None
    used = torch.cat([ctx_tokens.flatten(), pi.flatten(), ni.flatten()]).unique().tolist()
    vocab = {int(t): str(model.tokenizer.decode([int(t)])) for t in used if t >= 0}
    return FeatureStats(
        density=density,
        max_act=codes.amax((0, 1)).float(),
        ctx_tokens=ctx_tokens.long(),
        ctx_acts=ctx_acts,
        ctx_max=peak.T.contiguous().float(),
        pos_ids=pi.long(),
        pos_values=pv.float(),
        neg_ids=ni.long(),
        neg_values=nv.float(),
        vocab=vocab,
        focus=left,
        meta={"n_seq": n_seq, "seq_len": seq_len, "n_positions": n_pos, "version": FEATURES_VERSION},
    )


_TENSORS = ("density", "max_act", "ctx_tokens", "ctx_acts", "ctx_max", "pos_ids", "pos_values", "neg_ids", "neg_values")


def save_feature_stats(stats: FeatureStats, path: Path) -> Path:
    """Write ``stats`` to one safetensors file (vocab, focus and meta in its metadata), atomically
    through a uniquely named temporary sibling: runs sharing the asset cache may write it at once."""
    from saets_utils.io_utils import atomic_save_safetensors

    meta = {"vocab": json.dumps(stats.vocab), "focus": str(stats.focus), "meta": json.dumps(stats.meta)}
    atomic_save_safetensors({k: getattr(stats, k) for k in _TENSORS}, path, metadata=meta)
    return path


def load_feature_stats(path: Path) -> FeatureStats:
    """Read what :func:`save_feature_stats` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in _TENSORS}
    vocab = {int(k): v for k, v in json.loads(meta["vocab"]).items()}
    return FeatureStats(**tensors, vocab=vocab, focus=int(meta["focus"]), meta=json.loads(meta["meta"]))


def fingerprint(run: RunConfig, sae: SAE, n_chunks: int, chunk_tokens: int) -> str:
    """Key of a run's feature stats: SAE weights, model, hook, text settings, sink rule, code version."""
    h = hashlib.sha256()
    for t in (sae.W_dec, sae.W_enc, sae.b_enc):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    settings = {
        "model": run.model.model_dump(mode="json"),
        "hook": run.sae.hook_name,
        "text": run.text.model_dump(mode="json"),
        "chunks": [n_chunks, chunk_tokens, run.seed],
        "first": run.effects.include_first_position,
        "max_norm": run.effects.max_resid_norm,
        "version": FEATURES_VERSION,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def feature_stats(
    run: RunConfig, model: HookedTransformer, sae: SAE, *, n_chunks: int = 128, chunk_tokens: int = 64
) -> FeatureStats:
    """The run's SAE's dashboard numbers on ``n_chunks`` chunks of the run's text: from the asset
    cache when this SAE, model and text were seen before, else computed (seconds to a minute on a
    CPU). Written to ``results/<run>/features/`` with ``labels.csv`` either way."""
    from saets_utils.models.assets import cache_dir
    from saets_utils.models.loading import bos_id, load_texts, tokenize_chunks

    cached = cache_dir() / CACHE_FOLDER / f"{fingerprint(run, sae, n_chunks, chunk_tokens)}.safetensors"
    if cached.is_file():
        stats = load_feature_stats(cached)
    else:
        tokens = tokenize_chunks(
            model, load_texts(run.text), chunk_tokens, n_chunks, bos=bos_id(model, run.model), seed=run.seed + 1
        )
        stats = compute_feature_stats(
            model,
            sae,
            run.sae.hook_name,
            tokens,
            include_first_position=run.effects.include_first_position,
            max_resid_norm=run.effects.max_resid_norm,
        )
        stats.meta["sae"] = run.sae.key
        save_feature_stats(stats, cached)
    out = run.paths
    save_feature_stats(stats, out.feature_stats)
    stats.table().to_csv(out.feature_labels, index=False)
    return stats


def load_labels(results_dir: Path) -> dict[int, str]:
    """Feature id -> short label from ``results/<run>/features/labels.csv``; empty before 01 wrote it."""
    path = RunPaths(results_dir).feature_labels
    if not path.is_file():
        return {}
    df = pd.read_csv(path, usecols=["feature", "label"], keep_default_na=False)
    return dict(zip(df["feature"].astype(int), df["label"].astype(str)))


def with_labels(df: pd.DataFrame, labels: dict[int, str], column: str = "feature") -> pd.DataFrame:
    """``df`` with a ``label`` column right after ``column`` (feature ids); unchanged without labels."""
    if not labels or column not in df or "label" in df:
        return df
    out = df.copy()
    out.insert(out.columns.get_loc(column) + 1, "label", [labels.get(int(f), "") for f in out[column]])
    return out


# Words a goal is phrased with that name no feature ("steer toward the sea" is about the sea).
STOP_WORDS = frozenset("the and for with from that this toward towards about more less into".split())


def _stems(word: str) -> set[str]:
    """The word and its forms without a plural or -ing ending (at least 4 letters)."""
    w = word.lower()
    out = {w}
    for suffix in ("ings", "ing", "es", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 4:
            out.add(w[: -len(suffix)])
    return out


def targets_from_text(query: str, stats: FeatureStats, k: int = 3, density_max: float = 0.1) -> list[tuple[int, float]]:
    """Target features for a free-text goal (``"weddings"``, ``"steer toward: the sea"``) from the
    dashboards: a feature scores by how many of its top-context focus tokens and top logit tokens
    start with a word of the query (plural and -ing endings dropped); the ``k`` best features with
    density at most ``density_max`` are returned, weights proportional to score (summing to 1)."""
    text = re.sub(r"^\s*steer\s+toward[s]?\s*:?", "", query, flags=re.I)
    words = {s for w in re.findall(r"[A-Za-z]+", text) if len(w) > 2 and w.lower() not in STOP_WORDS for s in _stems(w)}
    if not words:
        raise ValueError(f"no words to steer toward in {query!r}; write e.g. 'steer toward: weddings'")
    scores: dict[int, float] = {}
    hits = {t: any(_clean(s).lower().startswith(w) for w in words) for t, s in stats.vocab.items()}
    for f in range(stats.d_sae):
        if float(stats.density[f]) > density_max or float(stats.max_act[f]) <= 0:
            continue
        ctx = [int(t) for t, a in zip(stats.ctx_tokens[f, :, stats.focus], stats.ctx_max[f]) if a > 0]
        score = sum(hits.get(t, False) for t in ctx) / max(len(ctx), 1)
        score += 0.5 * sum(hits.get(int(t), False) for t in stats.pos_ids[f]) / stats.pos_ids.shape[1]
        if score > 0:
            scores[f] = score
    if not scores:
        raise ValueError(f"no feature's dashboard mentions {sorted(words)}; try another word or feature ids")
    best = sorted(scores, key=lambda f: -scores[f])[:k]
    total = sum(scores[f] for f in best)
    return [(f, scores[f] / total) for f in best]
