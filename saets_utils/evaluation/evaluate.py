"""Notebook 03's work: for each task and method, sweep the steering scale, generate, judge, score.

Generation is batched per task across methods, scales and samples (one steering delta per row).
Sample ``i`` uses the same random numbers for every method and scale (common random numbers), so
at scale 0 all methods write the same text and differences between methods are not sampling noise.
The judge is built (and an OpenAI key checked) before any generation starts.

Writes ``results/<run>/eval/``: ``samples.jsonl`` (every text with its scores or errors),
``by_scale.csv``, ``summary.csv``, ``vectors.safetensors`` (``<task>/<method>``), ``targets.json``,
``judge_stats.json``; the judge cache lives in ``eval/judge_cache``. With ``eval.targeting`` (default)
it then measures, without any judge, how well each vector moves the task's target SAE features
(:mod:`saets_utils.evaluation.targeting`): ``targeting.csv``, ``targeting_summary.csv``, ``targeting_effects.safetensors``.
When it starts (after its checks) it removes every file of ``EVAL_OUTPUTS`` an earlier run left, so a
03 that fails leaves only its own files.

Without 01 (the published adapter, or 02 trained on the published effects: docs/published.md) 03 runs
with what it has, saying so (:func:`what_to_evaluate`): targeting is skipped (it needs 01's loss chunks
and unsteered baseline) and FGAA is left out (it drops dense features by 01's baseline density); the
task files must list their target features for the run's SAE (the Gemma ones do), since discovering
them needs that density too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch

from saets_utils.config import RunConfig, eval_seed
from saets_utils.evaluation.task_vectors import (
    SteeringContext,
    TaskVectors,
    build_task_vectors,
    load_context,
    resolve_targets,
)
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json, atomic_write_text, remove_outputs
from saets_utils.judges import CriterionKind, JudgeFailures, JudgeRequest, check_failures, make_judge, score_requests
from saets_utils.judges.kinds import get_judge_kind
from saets_utils.paths import RunPaths
from saets_utils.registry import get_method
from saets_utils.steering.generation import generate, row_seed
from saets_utils.steering.tasks import Task, join_prompt, load_tasks

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

EVAL_STREAM = 2  # seed stream of eval rollouts (01 uses 0 and 1)
MAX_ROWS = 256
# Every file 03 writes in eval/ (battles: notebook 03's later cell), removed when 03 starts, so a 03
# that fails (judge failures, an error, a kill) leaves no earlier run's file beside its new ones.
# The judge cache stays: its entries are keyed by content.
EVAL_OUTPUTS = tuple(Path(f).name for f in RunPaths.written_by("03_eval", recorded=True))  # names in eval/


NO_PLAN_NOTICE = (
    "no 01 plan: targeting skipped; run 01 to measure it ({path} not found: targeting calibrates each vector on "
    "01's loss chunks and measures it against 01's unsteered baseline; the approximator is {source})"
)
NO_BASELINE_NOTICE = (
    "no 01 baseline: {methods} left out of the evaluated methods; run 01 to evaluate {them} ({path} not found: "
    "{methods} drop(s) dense features by 01's baseline feature density; the approximator is {source})"
)


def what_to_evaluate(run: RunConfig) -> tuple[list[str], bool, list[str]]:
    """The methods 03 evaluates, whether it measures targeting, and a notice per thing left out.

    As ``eval.methods`` and ``eval.targeting`` say, except when 01 has not run and the approximator
    comes from published artifacts (:func:`~saets_utils.approximator.published.approximator_is_published`):
    then targeting is skipped when 01's plan is absent and FGAA is left out when 01's baseline is absent,
    each with a notice naming why. Anything else missing fails later, naming the notebook to run."""
    from saets_utils.approximator.published import adapter_source_is_published, approximator_is_published

    methods, notices = list(run.eval.methods), []
    published = approximator_is_published(run)
    source = (
        f"the published adapter ({run.approximator.published.adapter.describe()})"
        if adapter_source_is_published(run) and run.approximator.published.adapter is not None
        else "02's fit of the published effects"
    )
    baseline = run.paths.baseline
    if published and not baseline.is_file():
        dropped = [m for m in methods if get_method(m).targets == "contrast"]  # FGAA
        if dropped and len(dropped) == len(methods):
            raise FileNotFoundError(
                f"eval.methods {methods} all need 01's baseline feature density ({baseline} not found); "
                "run notebooks/01_effects.ipynb, or evaluate other methods"
            )
        if dropped:
            methods = [m for m in methods if m not in dropped]
            them = "it" if len(dropped) == 1 else "them"
            notices.append(
                NO_BASELINE_NOTICE.format(methods=", ".join(dropped), them=them, path=baseline, source=source)
            )
    targeting = run.eval.targeting and any(get_method(m).vector for m in methods)  # `prompt` has none
    plan = run.paths.plan
    if targeting and published and not plan.is_file():
        targeting = False
        notices.append(NO_PLAN_NOTICE.format(path=plan, source=source))
    return methods, targeting, notices


@dataclass
class EvalReport:
    """Everything 03 produced: per-text ``samples``, ``by_scale`` and ``summary`` tables, how targets
    were chosen (``targets``), judge/run statistics (``stats``) and, with ``eval.targeting``, the
    judge-free targeting table and its per-method summary (None otherwise). ``notices``: what 03 left
    out and why (:func:`what_to_evaluate`; e.g. targeting without 01's plan), as printed."""

    samples: pd.DataFrame
    by_scale: pd.DataFrame
    summary: pd.DataFrame
    targets: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    targeting: pd.DataFrame | None = None
    targeting_summary: pd.DataFrame | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def targeting_note(self) -> str:
        """Why ``targeting`` is None: its notice (e.g. no 01 plan), else ``eval.targeting: false``."""
        return next(
            (n for n in self.notices if "targeting skipped" in n), "Targeting is off (`eval.targeting: false`)."
        )

    def best_samples(self, n: int = 2) -> pd.DataFrame:
        """``n`` texts per task and method at the method's best scale."""
        best = self.summary[["task", "method", "best_scale"]]
        m = self.samples.merge(best, left_on=["task", "method", "scale"], right_on=["task", "method", "best_scale"])
        return m.groupby(["task", "method"]).head(n)[["task", "method", "scale", "behaviour", "coherence", "text"]]


def _rows_for_task(task: Task, tv: TaskVectors, run: RunConfig, methods: list[str]) -> list[dict[str, Any]]:
    """One dict per text to generate: method, scale, sample and, for steered rows, the vector."""
    e = run.eval
    rows = []
    for method in methods:
        scales = e.scale_grid.values() if get_method(method).vector else [0.0]
        for scale in scales:
            for s in range(e.samples_per_scale):
                rows.append(
                    {
                        "task": task.name,
                        "method": method,
                        "scale": float(scale),
                        "sample": s,
                        "vector": tv.vectors.get(method),
                    }
                )
    return rows


@torch.no_grad()
def generate_rows(ctx: SteeringContext, rows: list[dict[str, Any]], prefix: str, progress=None) -> list[str]:
    """Texts (eval prompt + continuation) for rows sharing one prompt: ``prefix`` (an instruction,
    or empty) joined to ``eval.prompt``."""
    model, e = ctx.model, ctx.run.eval
    assert model.tokenizer is not None
    ids = [ctx.bos, *model.tokenizer.encode(join_prompt(prefix, e.prompt), add_special_tokens=False)]
    d_model = model.cfg.d_model
    texts: list[str] = []
    for i in range(0, len(rows), MAX_ROWS):
        chunk = rows[i : i + MAX_ROWS]
        delta = torch.stack(
            [(r["vector"] * r["scale"]) if r["vector"] is not None else torch.zeros(d_model) for r in chunk]
        ).to(model.cfg.device)
        seeds = [row_seed(eval_seed(ctx.run), EVAL_STREAM, r["sample"]) for r in chunk]
        gen = generate(
            model,
            torch.tensor([ids] * len(chunk)),
            e.new_tokens,
            seeds,
            sampling=e.sampling,
            hook_name=ctx.hook_name,
            delta=delta,
        )
        new = list(gen.tokens[:, len(ids) :].cpu())
        if e.stop_at_eos:
            new = [cut_at_eos(t, model.tokenizer.eos_token_id) for t in new]
        texts += [e.prompt + cast(str, model.tokenizer.decode(t, skip_special_tokens=True)) for t in new]
        if progress is not None:
            progress.update(len(chunk))
    return texts


def cut_at_eos(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """``tokens [n]`` up to (not including) the first ``eos``. Rows are sampled with their own
    seeds, so the tokens before an EOS are those a generation stopping at EOS would give."""
    if eos is None:
        return tokens
    hits = (tokens == eos).nonzero()
    return tokens[: int(hits[0, 0])] if len(hits) else tokens


def _requests(task: Task, df: pd.DataFrame, prompt: str, template: str = "project") -> list[JudgeRequest]:
    reqs = []
    criteria: tuple[tuple[CriterionKind, str], ...] = (("behaviour", task.behaviour), ("coherence", task.coherence))
    if template == "reference":
        from saets_utils.judges.reference import reference_criteria

        criteria = reference_criteria(task.name, task.behaviour)
    for kind, crit in criteria:
        reqs += [
            JudgeRequest(
                task=task.name,
                method=r.method,
                scale=r.scale,
                criterion_kind=kind,
                criterion=crit,
                prompt=prompt,
                text=r.text,
                sample=int(r.sample),
            )
            for r in df.itertuples()
        ]
    return reqs


def evaluate_run(run: RunConfig, model: HookedTransformer, sae: SAE, progress: bool = True) -> EvalReport:
    """Run the whole evaluation of ``run.eval`` and write its files (see module docstring)."""
    from saets_utils.evaluation.scoring import by_scale, summary
    from saets_utils.judges.offline import make_mean_logprob_fn
    from saets_utils.progress import progress as progress_bar

    tasks = load_tasks(run.eval.tasks)
    methods, targeting, notices = what_to_evaluate(run)
    for notice in notices:
        print(notice)
    if targeting:
        from saets_utils.evaluation.targeting import load_plan

        load_plan(run, sae)  # fail before any generation if 01's plan is missing or stale
    needs_approx = any(get_method(m).needs_approximator for m in methods)
    ctx = load_context(run, model, sae, require_approximator=needs_approx)
    if not ctx.has_density:  # without 01 targets cannot be discovered: every task must list them
        for task in tasks:
            resolve_targets(task, ctx)
    out = run.paths
    out.eval_dir.mkdir(parents=True, exist_ok=True)
    lm_fn = make_mean_logprob_fn(model, ctx.bos) if get_judge_kind(run.eval.judge.kind).needs_lm else None
    judge = make_judge(
        run.eval.judge,
        out.judge_cache,
        mean_logprob_fn=lm_fn,
        examples={t.name: {"positive": t.positive, "negative": t.negative} for t in tasks},
    )
    remove_outputs(out.eval_dir, EVAL_OUTPUTS)  # checks passed: 03 starts
    frames, vectors, targets, requests, task_vectors = [], {}, [], [], {}
    n_scales = len(run.eval.scale_grid.values())
    total = len(tasks) * run.eval.samples_per_scale * sum(n_scales if get_method(m).vector else 1 for m in methods)
    bar = progress_bar(total=total, desc="generate", disable=not progress)
    for task in tasks:
        tv = build_task_vectors(task, ctx, methods)
        task_vectors[task.name] = tv
        vectors.update({f"{task.name}/{m}": v for m, v in tv.vectors.items()})
        targets += [
            {"task": task.name, "method": m, "targets": json.dumps(t), "how": tv.targets_how}
            for m, t in tv.targets.items()
        ]
        rows = _rows_for_task(task, tv, run, methods)
        steered = [r for r in rows if get_method(r["method"]).vector]
        prompted = [r for r in rows if not get_method(r["method"]).vector]
        texts = generate_rows(ctx, steered, "", bar) if steered else []
        texts += generate_rows(ctx, prompted, task.steering_prompt, bar) if prompted else []
        df = pd.DataFrame([{k: v for k, v in r.items() if k != "vector"} for r in steered + prompted])
        df["prompt"] = [
            run.eval.prompt if get_method(r["method"]).vector else join_prompt(task.steering_prompt, run.eval.prompt)
            for r in steered + prompted
        ]
        df["text"] = texts
        frames.append(df)
        requests += _requests(task, df, run.eval.prompt, _template(run))
    bar.close()
    atomic_save_safetensors(vectors, out.vectors)
    results = score_requests(judge, requests, progress=progress)
    samples = _attach_scores(pd.concat(frames, ignore_index=True), requests, results)
    atomic_write_text(
        out.samples,
        "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in samples.to_dict("records")),
    )
    stats = {
        "judge": judge.judge_id,
        **judge.stats.as_dict(),
        "n_texts": len(samples),
        "n_requests": len(requests),
        "n_errors": int(sum(not r.ok for r in results)),
        # which approximator built the vectors; a published one with its rotation / correction check
        "approximator": ctx.approx_source,
        **({"approximator_check": ctx.approx_check} if ctx.approx_check else {}),
        # what was left out without 01 (what_to_evaluate), and the methods evaluated then
        **({"notices": notices, "methods": methods} if notices else {}),
    }
    atomic_write_json(out.judge_stats, stats)
    try:
        check_failures(results, run.eval.judge.max_failed_share)  # no tables from a half-judged run
    except JudgeFailures as e:
        raise JudgeFailures(f"03 stopped: {e} Details per text: {out.samples}") from None
    bs = by_scale(samples)
    sm = summary(samples, n_boot=run.eval.bootstrap, seed=run.seed)
    atomic_write_text(out.by_scale, bs.to_csv(index=False))
    atomic_write_text(out.summary, sm.to_csv(index=False))
    tdf = pd.DataFrame(targets)
    atomic_write_json(out.targets, targets)
    tg = tg_summary = None
    if targeting:
        from saets_utils.evaluation.targeting import measure_targeting, targeting_summary

        tg = measure_targeting(run, model, sae, task_vectors=task_vectors, progress=progress)
        tg_summary = targeting_summary(tg, n_boot=run.eval.bootstrap, seed=run.seed)  # = targeting_summary.csv
    return EvalReport(samples, bs, sm, tdf, stats, tg, tg_summary, notices)


def _template(run: RunConfig) -> str:
    """The judge template actually used: a judge that is not prompted (the offline judge) has none."""
    return run.eval.judge.template if get_judge_kind(run.eval.judge.kind).prompted else "project"


def _attach_scores(df: pd.DataFrame, requests: list[JudgeRequest], results: list) -> pd.DataFrame:
    """Add ``behaviour``/``coherence`` (normalised or NaN), raw scores, errors and judge id per text."""
    key = {(q.task, q.method, q.scale, q.sample, q.criterion_kind): r for q, r in zip(requests, results)}
    for kind in ("behaviour", "coherence"):
        res = [key[(r.task, r.method, r.scale, r.sample, kind)] for r in df.itertuples()]
        df[kind] = [r.normalised if r.ok else math.nan for r in res]
        df[f"{kind}_score"] = [r.score for r in res]
        df[f"{kind}_error"] = [r.error for r in res]
        df["judge"] = [r.judge for r in res]
    return df


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
