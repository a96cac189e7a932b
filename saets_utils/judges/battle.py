"""The pairwise "battle" judge, as in the reference code: two texts of two methods (each at its best
scale) shown to the judge, which says which better meets the criterion, or a tie. Ratings of the
methods from all battles: Bradley-Terry strengths on the Elo scale (400 points = 10:1 odds, mean
1000), with percentile bootstrap CIs over battles.

A battle travels as a :class:`JudgeRequest` whose ``text`` holds both texts (JSON) and whose
``score`` codes the verdict (1: text A, 2: text B, 3: tie), so battles share the judges' cache,
de-duplication, retries and error accounting: a failed battle is counted and left out of the
ratings, never guessed. Two judges: the LLM (:class:`OpenAIBattleJudge`) and an offline one
(:class:`OfflineBattleJudge`: the text with the higher offline score wins, equal scores tie);
:func:`saets_utils.judges.make_battle_judge` builds the one ``eval.judge.kind`` names.

Example:
    >>> plan = plan_battles(samples, summary, per_pair=8, seed=0)
    >>> verdicts = judge_battles(judge, plan, criteria)
    >>> ratings = bradley_terry(verdicts, n_boot=200)
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from saets_utils.judges.base import Emit, Judge, JudgeRequest, JudgeResult, score_requests
from saets_utils.judges.offline import OfflineJudge
from saets_utils.judges.openai_judge import OpenAIJudge, ReplyError

BATTLE_TEMPLATE_VERSION = "battle-v1"
VERDICTS = {"A": 1, "B": 2, "tie": 3}
_VERDICT_OF = {v: k for k, v in VERDICTS.items()}

# Our wording of the reference's battle prompt: an impartial comparison on one criterion, JSON out.
SYSTEM_TEMPLATE = """You compare two texts written by a language model and decide which one better \
meets a criterion. Judge the texts, not their position or labels.

Criterion:
{criterion}

Read both texts, compare them on the criterion only, and pick the better one. Declare a tie only \
when they meet it equally well. Answer with one JSON object: {{"winner": "A"}}, {{"winner": "B"}} \
or {{"winner": "tie"}}."""
USER_TEMPLATE = (
    '{prompt_part}Text A:\n"""\n{text_a}\n"""\n\nText B:\n"""\n{text_b}\n"""\n\nWhich text better meets the criterion?'
)


def battle_request(
    task: str, method_a: str, method_b: str, *, text_a: str, text_b: str, criteria: Mapping[str, str], prompt: str
) -> JudgeRequest:
    """One battle as a request; ``criteria`` maps ``behaviour``/``coherence`` to the criteria the
    battle is about (one or both; the LLM judge reads them joined)."""
    return JudgeRequest(
        task=task,
        method=f"{method_a} vs {method_b}",
        scale=0.0,
        criterion_kind="behaviour",
        criterion=" ".join(criteria.values()),
        prompt=prompt,
        text=json.dumps([text_a, text_b], ensure_ascii=False),
        key=dict(criteria),
    )


def _texts(req: JudgeRequest) -> tuple[str, str]:
    a, b = json.loads(req.text)
    return a, b


def parse_verdict(content: str | None) -> int:
    """The verdict code in a reply ``{"winner": "A" | "B" | "tie"}``; raises ReplyError otherwise."""
    s = (content or "").strip()
    if m := re.match(r"^```(?:json)?\s*(.*?)\s*```$", s, re.S | re.I):
        s = m.group(1)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        raise ReplyError("malformed", f"reply is not a JSON object: {s[:80]!r}") from None
    winner = obj.get("winner") if isinstance(obj, dict) else None
    if not isinstance(winner, str) or winner.strip().upper() not in ("A", "B", "TIE"):
        raise ReplyError("malformed", f"reply has no winner A, B or tie: {s[:80]!r}")
    w = winner.strip().upper()
    return VERDICTS["tie" if w == "TIE" else w]


class OpenAIBattleJudge(OpenAIJudge):
    """Battles judged by an OpenAI-compatible LLM (retries, concurrency and key as :class:`OpenAIJudge`)."""

    kind = "openai_battle"

    def _messages(self, req: JudgeRequest) -> list[dict[str, str]]:
        a, b = _texts(req)
        prompt_part = f"Prompt:\n\n{req.prompt}\n\n" if req.prompt else ""
        return [
            {"role": "system", "content": SYSTEM_TEMPLATE.format(criterion=req.criterion)},
            {"role": "user", "content": USER_TEMPLATE.format(prompt_part=prompt_part, text_a=a, text_b=b)},
        ]

    def _parse(self, content: str | None) -> int:
        return parse_verdict(content)

    def _cache_extra(self, req: JudgeRequest) -> str:
        return BATTLE_TEMPLATE_VERSION


class OfflineBattleJudge(Judge):
    """Battles decided by the offline judge's scores: each text is scored on the battle's criteria
    (normalised scores multiplied when both), the higher wins, equal values tie. The scores come
    from (and go to) the offline judge's own cache, so texts 03 scored cost nothing."""

    kind = "offline_battle"

    def __init__(self, scorer: OfflineJudge) -> None:
        self.scorer = scorer
        self.model = scorer.model
        super().__init__(scorer.cache)

    def _cache_extra(self, req: JudgeRequest) -> str:
        kinds = sorted((req.key or {}).keys())
        return f"{BATTLE_TEMPLATE_VERSION};kinds={kinds};" + ";".join(
            self.scorer._cache_extra(r) for r in self._inner(req)
        )

    def _inner(self, req: JudgeRequest) -> list[JudgeRequest]:
        """The single-text requests of a battle: per text, one per criterion kind."""
        out = []
        for text in _texts(req):
            for kind, crit in (req.key or {}).items():
                out.append(
                    JudgeRequest(req.task, req.method, 0.0, kind, crit, req.prompt, text)  # type: ignore[arg-type]
                )
        return out

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        inner = [self._inner(r) for r in requests]
        flat = [q for qs in inner for q in qs]
        results = await self.scorer.ascore(flat)
        self.stats.calls += len(flat)
        i = 0
        for j, qs in enumerate(inner):
            res = results[i : i + len(qs)]
            i += len(qs)
            bad = next((r for r in res if not r.ok), None)
            if bad is not None:
                emit(j, JudgeResult.failed(bad.error or "internal: no score", self.judge_id))
                continue
            half = len(qs) // 2
            va = float(np.prod([float(r.normalised or 0.0) for r in res[:half]]))
            vb = float(np.prod([float(r.normalised or 0.0) for r in res[half:]]))
            code = VERDICTS["A"] if va > vb else VERDICTS["B"] if vb > va else VERDICTS["tie"]
            emit(j, JudgeResult.scored(code, self.judge_id, reply=f"A={va:.4f} B={vb:.4f}"))


def plan_battles(samples: pd.DataFrame, summary: pd.DataFrame, per_pair: int, seed: int = 0) -> pd.DataFrame:
    """Battles to judge: per task and pair of methods, ``per_pair`` pairs of texts, each drawn (with
    replacement) from the method's texts at its best scale (``summary.best_scale``), sides (A/B)
    assigned at random. Seeded per (task, pair), so adding a method leaves other pairs' draws alone.
    Columns: task, method_a, method_b, text_a, text_b."""
    rows = []
    for task, sm in summary.dropna(subset=["best_scale"]).groupby("task", sort=False):
        pools = {}
        for r in sm.itertuples():
            s = samples[(samples.task == task) & (samples.method == r.method) & (samples.scale == r.best_scale)]
            if len(s):
                pools[r.method] = s
        for m1, m2 in combinations(pools, 2):
            rng = np.random.default_rng([seed, zlib.crc32(f"{task}\0{m1}\0{m2}".encode())])
            for _ in range(per_pair):
                t1 = pools[m1].iloc[int(rng.integers(len(pools[m1])))]
                t2 = pools[m2].iloc[int(rng.integers(len(pools[m2])))]
                (a, ta), (b, tb) = ((m1, t1), (m2, t2)) if rng.random() < 0.5 else ((m2, t2), (m1, t1))
                rows.append(
                    {
                        "task": task,
                        "method_a": a,
                        "method_b": b,
                        "text_a": ta["text"],
                        "text_b": tb["text"],
                    }
                )
    return pd.DataFrame(rows, columns=["task", "method_a", "method_b", "text_a", "text_b"])


def judge_battles(
    judge: Judge,
    plan: pd.DataFrame,
    criteria: Mapping[str, Mapping[str, str]],
    eval_prompt: str,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """``plan`` with the verdict of each battle: ``winner`` (A, B, tie or None) and ``error``.
    ``criteria``: task -> {kind: criterion} for the kinds the battles are about. The judge sees the
    eval prompt (steered texts continue it; the prompt baseline's instruction is not shown)."""
    reqs = [
        battle_request(
            r.task,
            r.method_a,
            r.method_b,
            text_a=r.text_a,
            text_b=r.text_b,
            criteria=criteria[r.task],
            prompt=eval_prompt,
        )
        for r in plan.itertuples()
    ]
    results = score_requests(judge, reqs, progress=progress, desc=f"battles {judge.judge_id}")
    out = plan.copy()
    out["winner"] = [_VERDICT_OF.get(r.score) if r.ok and r.score is not None else None for r in results]
    out["error"] = [r.error for r in results]
    out["judge"] = [r.judge for r in results]
    return out


def _fit_bt(wins: np.ndarray, l2: float = 0.01, iters: int = 100) -> np.ndarray:
    """Bradley-Terry log-strengths ``[m]`` (mean 0) from ``wins [m, m]`` (i beat j; ties as half a
    win each) by Newton's method on the L2-penalised log-likelihood (the small penalty keeps a
    method that never lost finite)."""
    m = wins.shape[0]
    n = wins + wins.T
    theta = np.zeros(m)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
        grad = (wins - n * p).sum(1) - l2 * theta
        w = n * p * (1 - p)
        hess = w - np.diag(w.sum(1)) - l2 * np.eye(m)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    return theta - theta.mean()


def _wins(df: pd.DataFrame, index: Mapping[str, int]) -> np.ndarray:
    w = np.zeros((len(index), len(index)))
    for a, b, winner in zip(df["method_a"], df["method_b"], df["winner"]):
        i, j = index[a], index[b]
        if winner == "A":
            w[i, j] += 1
        elif winner == "B":
            w[j, i] += 1
        else:
            w[i, j] += 0.5
            w[j, i] += 0.5
    return w


ELO_PER_NAT = 400 / np.log(10)


def bradley_terry(verdicts: pd.DataFrame, n_boot: int = 200, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Ratings of the methods in ``verdicts`` (battles with a ``winner``; errors are left out) on
    the Elo scale (mean 1000; +400 = 10:1 odds of winning), with percentile bootstrap CIs that
    resample battles. Columns: method, rating, ci_low, ci_high, wins, losses, ties, battles."""
    ok = verdicts[verdicts["winner"].notna()]
    methods = list(dict.fromkeys([*ok["method_a"], *ok["method_b"]]))
    if not methods:
        return pd.DataFrame(columns=["method", "rating", "ci_low", "ci_high", "wins", "losses", "ties", "battles"])
    index = {m: i for i, m in enumerate(methods)}
    rating = 1000 + ELO_PER_NAT * _fit_bt(_wins(ok, index))
    lo = hi = np.full(len(methods), np.nan)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boot = np.stack([_fit_bt(_wins(ok.iloc[rng.integers(0, len(ok), len(ok))], index)) for _ in range(n_boot)])
        lo, hi = 1000 + ELO_PER_NAT * np.percentile(boot, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    rows = []
    for m, i in index.items():
        as_a, as_b = ok[ok.method_a == m], ok[ok.method_b == m]
        wins = int((as_a.winner == "A").sum() + (as_b.winner == "B").sum())
        losses = int((as_a.winner == "B").sum() + (as_b.winner == "A").sum())
        ties = int((as_a.winner == "tie").sum() + (as_b.winner == "tie").sum())
        rows.append(
            {
                "method": m,
                "rating": rating[i],
                "ci_low": lo[i],
                "ci_high": hi[i],
                "wins": wins,
                "losses": losses,
                "ties": ties,
                "battles": wins + losses + ties,
            }
        )
    return pd.DataFrame(rows).sort_values("rating", ascending=False, kind="stable").reset_index(drop=True)


def battle_criteria(kinds: str, behaviour: str, coherence: str) -> dict[str, Any]:
    """The criteria a battle is about: ``behaviour``, ``coherence`` or ``both``."""
    out = {"behaviour": behaviour, "coherence": coherence}
    return out if kinds == "both" else {kinds: out[kinds]}
