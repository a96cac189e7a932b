"""ipywidgets UIs over the package functions: the effect explorer (notebook 01) and the steering
playground (notebook 05).

Callbacks only read widget values and call plain functions (:mod:`saets_utils.report.explore`,
:func:`playground_generate`); the last rendered state stays on the widget object (``summary``,
``table``, ``samples``, ``result``) so tests drive the UIs without a browser.

Example:
    >>> EffectExplorer(load_run_effects(run), model.tokenizer, run=run).widget
    >>> SteeringPlayground(load_context(run, model, sae), run.eval.tasks, ["SAE-TS", "CAA", "prompt"]).widget
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import ipywidgets as W
import matplotlib.pyplot as plt  # registers Jupyter's inline formatter, so display(Figure) shows a PNG
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.effects.store import Effects
from saets_utils.evaluation.task_vectors import SteeringContext, build_target_vector, build_task_vectors
from saets_utils.manifest import check_current
from saets_utils.registry import get_method
from saets_utils.report import explore
from saets_utils.report.features import (
    FeatureStats,
    load_feature_stats,
    load_labels,
    targets_from_text,
    with_labels,
)
from saets_utils.report.neuronpedia import feature_html, table_html
from saets_utils.report.plots import feature_name, plot_effect_profile
from saets_utils.steering.generation import generate, row_seed
from saets_utils.steering.tasks import Task, check_target_ids, join_prompt, load_task

CUSTOM = "(custom targets or text)"

# Side by side and wrapping: long continuations break inside their column, never overlap the next.
_GRID = "display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:6px 14px;width:100%"
_CELL = "white-space:pre-wrap;overflow-wrap:anywhere;min-width:0;margin:0;font-family:monospace;font-size:12px"
_WRAP = W.Layout(flex_flow="row wrap", width="100%")


def _html_table(df: pd.DataFrame, caption: str, run: RunConfig | None = None) -> str:
    """``df`` as HTML under ``caption``; with ``run``, its feature ids link to Neuronpedia where the SAE is hosted."""
    body = table_html(df, run, index=False, float_format=lambda x: f"{x:.4g}", border=0) if len(df) else "<i>none</i>"
    return f"<b>{html.escape(caption)}</b><br>{body}"


class EffectExplorer:
    """Pick a measured vector (or a feature, to list the vectors that raise it most) and see its
    calibrated scale and status, its most raised and lowered features with density, and a few
    steered samples. ``.widget`` is the container; ``.show(vector_id)`` renders programmatically.
    ``labels`` (feature id -> short label, :func:`saets_utils.report.features.load_labels`) are shown
    next to every feature id; with ``run``, ids link to Neuronpedia where the run's SAE is hosted there,
    and the run's 01 files must be those its last finished 01 recorded (else
    :class:`~saets_utils.manifest.StaleInputs` names the step to re-run)."""

    def __init__(
        self,
        effects: Effects,
        *,
        tokenizer: Any | None = None,
        k: int = 15,
        n_vectors: int = 10,
        labels: Mapping[int, str] | None = None,
        run: RunConfig | None = None,
    ) -> None:
        if run is not None:
            check_current(run, ("01_effects",), "the effect explorer")
        self.effects, self.tokenizer, self.k, self.n_vectors, self.run = effects, tokenizer, k, n_vectors, run
        self.labels: dict[int, str] = dict(labels or {})
        self.summary: dict[str, Any] = {}
        self.table = pd.DataFrame()
        self.samples: list[str] = []
        self.raising = pd.DataFrame()
        self.figure: Figure | None = None
        self.error = ""
        d_sae = effects.effects.shape[1]
        first = int(effects.vector_ids[0]) if len(effects.vector_ids) else 0
        self.vector = W.IntText(value=first, description="vector id")
        self.feature = W.BoundedIntText(value=0, min=0, max=d_sae - 1, description="raises feature")
        self.vector_list = W.Select(options=[], rows=6, description="vectors")
        self.summary_html, self.table_html, self.samples_html = W.HTML(), W.HTML(), W.HTML()
        self.plot = W.Output()
        self.vector.observe(lambda ch: self.show(ch["new"]), names="value")
        self.feature.observe(lambda ch: self.find(ch["new"]), names="value")
        self.vector_list.observe(self._pick, names="value")
        self.feature_label = W.HTML()
        controls = W.VBox([W.HBox([self.vector, self.feature, self.feature_label]), self.vector_list])
        self.widget = W.VBox(
            [controls, self.summary_html, W.HBox([self.plot, self.table_html], layout=_WRAP), self.samples_html]
        )
        self.show(first)

    def show(self, vector_id: int) -> None:
        """Render the summary, effect profile, top-effects table and samples of ``vector_id``."""
        if self.vector.value != int(vector_id):
            self.vector.value = int(vector_id)  # the observer calls show again with this id
            return
        e = self.effects
        try:
            row = e.row(vector_id)
        except KeyError as err:
            self.error = str(err.args[0])
            self.summary_html.value = f"<span style='color:#d62728'>{html.escape(self.error)}</span>"
            return
        self.error = ""
        self.summary = explore.vector_summary(e, vector_id, k=self.k)
        self.table = with_labels(explore.top_effects(e, vector_id, self.k), self.labels)
        self.samples = explore.decode_samples(e, vector_id, self.tokenizer) if self.tokenizer is not None else []
        s = self.summary
        own = (
            ""
            if s["own_rank"] is None
            else f" &middot; own feature {self._feature(s['own_feature'])}: rank {s['own_rank']}"
            f" ({'in' if s['own_in_top_k'] else 'not in'} top {self.k}), effect {s['own_effect']:.4g}"
        )
        self.summary_html.value = (
            f"<b>vector {s['vector_id']}</b> &middot; scale {s['scale']:.4g} &middot; "
            f"calibration: {html.escape(str(s['status']))} &middot; {s['seconds']:.2f} s{own}"
        )
        self.table_html.value = _html_table(self.table, f"top {self.k} raised / lowered features", self.run)
        self.samples_html.value = (
            "<b>steered samples</b><ol>"
            + "".join(
                f"<li><pre style='white-space:pre-wrap;margin:0'>{html.escape(t)}</pre></li>" for t in self.samples
            )
            + "</ol>"
        )
        self.plot.clear_output(wait=True)
        self.figure = None
        if bool(e.valid[row]):
            targets = [s["own_feature"]] if s["own_feature"] is not None else []
            self.figure = plot_effect_profile(
                e.effects[row],
                targets,
                density=e.baseline_density,
                top=self.k,
                title=f"effect of vector {vector_id} at scale {s['scale']:.3g}",
                labels=self.labels,
            )
            with self.plot:
                display(self.figure)
            plt.close(self.figure)  # no-op for an unmanaged Figure; guards against a pyplot one

    def find(self, feature: int) -> None:
        """List the vectors that raise SAE ``feature`` most in the vector selector."""
        self.raising = explore.vectors_raising_feature(self.effects, feature, self.n_vectors)
        self.feature_label.value = self._feature(feature)
        self.vector_list.options = [
            (f"{v} (effect {x:+.3g})", int(v)) for v, x in zip(self.raising["vector_id"], self.raising["effect"])
        ]
        self.vector_list.value = None

    def _feature(self, feature: int) -> str:
        """``#id label`` as HTML, linked to Neuronpedia where the run's SAE is hosted there."""
        return feature_html(self.run, feature, feature_name(feature, self.labels))

    def _pick(self, change: dict) -> None:
        if change["new"] is not None:
            self.show(change["new"])


def parse_targets(text: str, d_sae: int) -> list[tuple[int, float]]:
    """``"123:1.0, 456:0.5"`` (weight 1 when omitted) -> ``[(123, 1.0), (456, 0.5)]``; ids checked against ``d_sae``."""
    out: list[tuple[int, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fid, _, w = part.partition(":")
        try:
            out.append((int(fid), float(w) if w.strip() else 1.0))
        except ValueError:
            raise ValueError(f"cannot read target {part!r}; write feature ids as '123:1.0, 456:0.5'") from None
    if not out:
        raise ValueError("no target features given; write e.g. '123:1.0, 456:0.5'")
    check_target_ids(out, d_sae, "custom targets")
    return out


def custom_target_vector(
    ctx: SteeringContext, targets: list[tuple[int, float]], method: str
) -> Float[Tensor, " d_model"]:
    """Unit vector of a target-based ``method`` for hand-written ``targets`` (FGAA uses the SAE-TS formula)."""
    if not get_method(method).from_targets:
        raise ValueError(f"{method} needs a task's examples or instruction; choose a task, not custom targets")
    return build_target_vector(ctx, method, targets)


def free_text_targets(
    text: str, ctx: SteeringContext, tasks: Mapping[str, Task], stats: FeatureStats | None, *, k: int = 3
) -> tuple[list[tuple[int, float]], str]:
    """Targets for a free-text goal (``"steer toward: weddings"``) and where they came from: the
    targets of a task whose name the text names (task machinery: listed or discovered from its
    examples), else the features whose dashboards match the words (see
    :func:`saets_utils.report.features.targets_from_text`)."""
    from saets_utils.evaluation.task_vectors import resolve_targets
    from saets_utils.steering.tasks import available_tasks

    words = {w.lower().rstrip("s") for w in re.findall(r"[A-Za-z_]+", text)}
    for name in [*tasks, *(t for t in available_tasks() if t not in tasks)]:
        if name.lower().rstrip("s") in words or name.lower().replace("_", " ") in text.lower():
            task = tasks[name] if name in tasks else load_task(name)
            targets, how = resolve_targets(task, ctx)
            return targets["SAE"], f"task {name}: {how}"
    if stats is None:
        raise ValueError("no feature dashboards for this run yet (run notebook 01); write feature ids instead")
    return targets_from_text(text, stats, k), "feature dashboards whose top tokens match the text"


def parse_or_find_targets(
    text: str, ctx: SteeringContext, tasks: Mapping[str, Task], stats: FeatureStats | None
) -> tuple[list[tuple[int, float]], str]:
    """Feature ids (``"123:1.0, 456"``) or, when the text has letters, a free-text goal."""
    if any(c.isalpha() for c in text):
        return free_text_targets(text, ctx, tasks, stats)
    return parse_targets(text, ctx.sae.cfg.d_sae), "hand-written feature ids"


def _decode(ctx: SteeringContext, rows: Tensor) -> list[str]:
    assert ctx.model.tokenizer is not None
    return [cast(str, ctx.model.tokenizer.decode(t.tolist(), skip_special_tokens=True)) for t in rows.cpu()]


@torch.no_grad()
def playground_generate(
    ctx: SteeringContext,
    vector: Float[Tensor, " d_model"] | None,
    scale: float,
    prompt: str,
    *,
    seed: int,
    new_tokens: int,
    prompt_prefix: str = "",
    n_samples: int = 3,
    k: int = 10,
    on_text: Callable[[list[str], list[str]], None] | None = None,
) -> dict[str, Any]:
    """Unsteered and steered continuations of ``prompt`` drawn with the same seeds (same per-row
    uniforms), so any difference is the steering's. ``vector`` (normalised here) is added at
    ``scale``; ``prompt_prefix`` is prepended to the steered prompt only (the ``prompt`` method).
    ``on_text(unsteered, steered)`` receives the texts so far after every generated token (streaming).

    Returns ``unsteered``/``steered`` (lists of continuations), ``predicted`` (top ``k`` features the
    approximator predicts for the unit vector at its calibrated scale, None without a vector or
    approximator) and ``measured`` (top ``k`` of mean SAE activation over steered minus unsteered
    generated tokens), plus the prompts and seeds.
    """
    seeds = [row_seed(int(seed), i) for i in range(n_samples)]
    steered_prompt = join_prompt(prompt_prefix, prompt)
    sampling, hook, dev = ctx.run.eval.sampling, ctx.hook_name, ctx.model.cfg.device
    unit = None if vector is None else vector.detach().float().cpu() / vector.float().norm().clamp_min(1e-12).cpu()
    delta = None if unit is None else (unit * float(scale)).to(dev)
    ids = ctx.tokens([prompt, steered_prompt])
    n = n_samples
    if len(ids[0]) == len(ids[1]):  # one batch of 2n rows: on CPU a step costs about the same for n or 2n rows
        zeros = torch.zeros(n, ctx.model.cfg.d_model, device=dev)
        runs = [
            (
                torch.stack([ids[0]] * n + [ids[1]] * n),
                seeds * 2,
                None if delta is None else torch.cat([zeros, delta.expand(n, -1)]),
            )
        ]
    else:
        runs = [(ids[0].repeat(n, 1), seeds, None), (ids[1].repeat(n, 1), seeds, delta)]
    texts: list[str] = []
    codes: list[Tensor] = []
    for tokens, row_seeds, d in runs:
        start, done = tokens.shape[1], list(texts)

        def stream(so_far: Tensor, start: int = start, done: list[str] = done) -> None:
            if on_text is not None:
                now = done + _decode(ctx, so_far[:, start:])
                on_text(now[:n], now[n:])

        gen = generate(
            ctx.model,
            tokens,
            int(new_tokens),
            row_seeds,
            sampling=sampling,
            hook_name=hook,
            delta=d,
            capture=True,
            on_step=stream,
        )
        texts += _decode(ctx, gen.tokens[:, start:])
        acts = gen.activations[:, start:]  # type: ignore[index]
        codes.append(ctx.sae.encode(acts.to(ctx.sae.W_dec.device, ctx.sae.W_dec.dtype)).float().mean(1).cpu())
    per_row = torch.cat(codes)  # [2n, d_sae]; every row has new_tokens positions
    measured = explore.top_features(per_row[n:].mean(0) - per_row[:n].mean(0), ctx.density, k, lowered=False)
    predicted = None
    if unit is not None and ctx.approx is not None:
        predicted = explore.top_features(ctx.approx.predict(unit).cpu(), ctx.density, k, lowered=False)
        predicted.insert(2, "bias", ctx.approx.b.cpu()[predicted["feature"].tolist()].numpy())
    return {
        "prompt": prompt,
        "steered_prompt": steered_prompt,
        "scale": float(scale),
        "seeds": seeds,
        "unsteered": texts[:n],
        "steered": texts[n:],
        "predicted": predicted,
        "measured": measured,
    }


def samples_grid(unsteered: Sequence[str], steered: Sequence[str]) -> str:
    """Two wrapping columns (unsteered | steered), one row per sample, as HTML."""
    cells = ["<b>unsteered</b>", "<b>steered</b>"]
    for a, b in zip(unsteered, steered):
        cells += [f"<pre style='{_CELL}'>{html.escape(a)}</pre>", f"<pre style='{_CELL}'>{html.escape(b)}</pre>"]
    body = "".join(f"<div style='min-width:0'>{c}</div>" for c in cells)
    return f"<div class='saets-samples' style='{_GRID}'>{body}</div>"


class SteeringPlayground:
    """Steer the model by a task's vector, hand-written target features or a free-text goal
    (``steer toward: weddings``), and read unsteered and steered continuations side by side as they
    are generated, with the predicted and measured top features (labelled from the dashboards; ids
    linked to Neuronpedia where the run's SAE is hosted there).

    ``tasks``: task names (``params/tasks``), :class:`Task` objects or a mapping name -> Task.
    Vectors are built once per (task or targets, method) and cached in ``.vectors``; the default
    selection's vector is built when the playground is made, so the first click only generates.
    The button is disabled while generating (a second click cannot queue work).
    """

    def __init__(
        self,
        ctx: SteeringContext,
        tasks: Sequence[str | Task] | Mapping[str, Task],
        methods: Sequence[str],
        *,
        scale: float | None = None,
        n_samples: int = 3,
        new_tokens: int = 24,
        k: int = 10,
        labels: Mapping[int, str] | None = None,
        warm: bool = True,
    ) -> None:
        self.ctx, self.n_samples, self.k = ctx, n_samples, k
        items = (
            tasks.items()
            if isinstance(tasks, Mapping)
            else ((t.name, t) if isinstance(t, Task) else (str(t), load_task(t)) for t in tasks)
        )
        self.tasks: dict[str, Task] = dict(items)
        stats_path = ctx.run.paths.feature_stats
        self.stats: FeatureStats | None = load_feature_stats(stats_path) if stats_path.is_file() else None
        self.labels: dict[int, str] = dict(labels) if labels is not None else load_labels(ctx.run.results_dir)
        self.vectors: dict[tuple[str, str], Tensor | None] = {}
        self.targets_how: dict[str, str] = {}
        self.targets_html: dict[str, str] = {}  # targets_how as HTML, ids linked to Neuronpedia where hosted
        self.result: dict[str, Any] = {}
        self.error = ""
        self.first_text_s: float | None = None  # seconds from the click to the first visible text
        grid = ctx.run.eval.scale_grid.values()
        self.task = W.Dropdown(options=[*self.tasks, CUSTOM], description="task")
        self.targets = W.Text(placeholder="123:1.0, 456:0.5  or  steer toward: weddings", description="targets")
        self.method = W.Dropdown(options=list(methods), description="method")
        self.scale = W.FloatSlider(
            value=grid[len(grid) // 2] if scale is None else scale,
            min=0.0,
            max=max(grid[-1], scale or 0.0),
            step=1.0,
            description="scale",
        )
        self.prompt = W.Text(value=ctx.run.eval.prompt, description="prompt")
        self.seed = W.IntText(value=ctx.run.seed, description="seed")
        self.new_tokens = W.BoundedIntText(value=new_tokens, min=1, max=512, description="new tokens")
        self.button = W.Button(description="Generate", button_style="primary")
        self.status, self.samples_html, self.predicted_html, self.measured_html = W.HTML(), W.HTML(), W.HTML(), W.HTML()
        self.samples_html.layout = W.Layout(width="100%")
        self.button.on_click(lambda _: self.generate())
        self.targets.on_submit(lambda _: self.generate())
        self.widget = W.VBox(
            [
                W.HBox([self.task, self.targets, self.method], layout=_WRAP),
                W.HBox([self.scale, self.seed, self.new_tokens], layout=_WRAP),
                W.HBox([self.prompt, self.button], layout=_WRAP),
                self.status,
                self.samples_html,
                W.HBox([self.predicted_html, self.measured_html], layout=_WRAP),
            ],
            layout=W.Layout(width="100%"),
        )
        if warm:
            self.warm()

    def warm(self) -> None:
        """Build the default selection's vector and run one token through the model (first-call costs)."""
        try:
            self.vector_for(self.task.value, self.method.value)
            playground_generate(self.ctx, None, 0.0, self.prompt.value, seed=0, new_tokens=1, n_samples=1, k=1)
        except (ValueError, FileNotFoundError, KeyError):
            pass  # generate() reports the same error when the user clicks

    def vector_for(self, task: str, method: str) -> Tensor | None:
        """The cached unit vector of ``method`` for ``task`` (or the targets text when task is custom); None for ``prompt``."""
        key = (f"custom:{self.targets.value.strip()}" if task == CUSTOM else task, method)
        if key not in self.vectors:
            if not get_method(method).vector:
                self.vectors[key] = None
            elif task == CUSTOM:
                targets, how = parse_or_find_targets(self.targets.value, self.ctx, self.tasks, self.stats)
                names = ", ".join(f"{feature_name(f, self.labels)} ({w:.2g})" for f, w in targets)
                self.targets_how[key[0]] = f"targets {names} from {how}"
                links = ", ".join(
                    f"{feature_html(self.ctx.run, f, feature_name(f, self.labels))} ({w:.2g})" for f, w in targets
                )
                self.targets_html[key[0]] = f"targets {links} from {html.escape(how)}"
                self.vectors[key] = custom_target_vector(self.ctx, targets, method)
            else:
                self.vectors[key] = build_task_vectors(self.tasks[task], self.ctx, [method]).vectors[method]
        return self.vectors[key]

    def _table(self, df: pd.DataFrame, caption: str) -> str:
        return _html_table(with_labels(df, self.labels), caption, self.ctx.run)

    def generate(self) -> dict[str, Any]:
        """Read the controls, generate (streaming the texts into the page), render; errors are shown
        in ``.status`` (and kept in ``.error``). The button is disabled until it returns."""
        task, method = self.task.value, self.method.value
        self.button.disabled, self.button.description = True, "Generating…"
        t0 = time.perf_counter()
        self.first_text_s = None

        def show(unsteered: list[str], steered: list[str]) -> None:
            if self.first_text_s is None:
                self.first_text_s = time.perf_counter() - t0
            self.samples_html.value = samples_grid(unsteered, steered)

        try:
            vectorless = not get_method(method).vector
            if vectorless and task == CUSTOM:
                raise ValueError(f"the {method} method needs a task's instruction; choose a task")
            vector = self.vector_for(task, method)
            prefix = self.tasks[task].steering_prompt if vectorless else ""
            what = f"{method} for {task}" + ("" if vectorless else f" at scale {self.scale.value:.4g}")
            how = self.targets_html.get(f"custom:{self.targets.value.strip()}", "") if task == CUSTOM else ""
            self.status.value = f"<b>{html.escape(what)}</b> &middot; generating… {how}"
            self.result = playground_generate(
                self.ctx,
                vector,
                self.scale.value,
                self.prompt.value,
                seed=self.seed.value,
                new_tokens=self.new_tokens.value,
                prompt_prefix=prefix,
                n_samples=self.n_samples,
                k=self.k,
                on_text=show,
            )
        except (ValueError, FileNotFoundError, KeyError) as err:
            self.error = str(err)
            self.status.value = f"<span style='color:#d62728'>{html.escape(self.error)}</span>"
            return {}
        finally:
            self.button.disabled, self.button.description = False, "Generate"
        self.error = ""
        r = self.result
        self.status.value = (
            f"<b>{html.escape(what)}</b> &middot; steered prompt: <code>{html.escape(r['steered_prompt'])}</code>"
            f" &middot; {time.perf_counter() - t0:.1f} s{' &middot; ' + how if how else ''}"
        )
        self.samples_html.value = samples_grid(r["unsteered"], r["steered"])
        self.predicted_html.value = (
            "<i>no predicted effects (prompt method or no approximator)</i>"
            if r["predicted"] is None
            else self._table(r["predicted"], "predicted top features (unit vector, calibrated scale)")
        )
        self.measured_html.value = self._table(r["measured"], "measured: steered minus unsteered mean SAE activation")
        return r
