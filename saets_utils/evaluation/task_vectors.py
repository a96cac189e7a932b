"""Turn a steering goal (a task) into one steering vector per method, from the run's files.

Target features come from the task file (keyed by ``sae.targets_key``) or, for an SAE with no
published ids (the embedded default), are discovered from the task's contrastive examples.
Every choice is recorded in a :class:`TaskVectors` so 03 can write down how each vector was built.

Each method of :mod:`saets_utils.registry` that has a vector has one builder here, registered with
``@builds("<name>")``: it turns the context, the task and the method's targets into a unit vector
with the pure functions of :mod:`saets_utils.evaluation.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator
from saets_utils.config import RunConfig
from saets_utils.evaluation import methods as M
from saets_utils.registry import METHODS, REGISTRY, Method, get_method
from saets_utils.steering.tasks import Task, check_target_ids

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

# Methods built from the task's target features (listed in its file, or discovered), registry order.
TARGET_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.targets == "task")
# A variant steers toward the targets its parent method's task entry lists (Gemma tasks list per method).
TARGETS_OF: dict[str, str] = {"SAE-TS-nobias": "SAE-TS"}


@dataclass
class SteeringContext:
    """What building vectors needs: the run, the unsteered model and SAE, the effect approximator
    and rotation of 02 (None before 02 has run), the baseline feature density ``[d_sae]`` of 01,
    and the start token id."""

    run: RunConfig
    model: HookedTransformer
    sae: SAE
    approx: EffectApproximator | None
    rotation: Tensor | None
    density: Tensor
    bos: int
    # Where ``approx`` came from ("02: <file>" or the published adapter) and, for a published adapter,
    # how its rotation and correction bias compare with ours (rows of what / rel_diff / cosine).
    approx_source: str = ""
    approx_check: list[dict] = field(default_factory=list)

    @property
    def hook_name(self) -> str:
        return self.run.sae.hook_name

    @property
    def has_density(self) -> bool:
        """Whether 01's baseline density is known (NaN when 01 has not run and the approximator is published)."""
        return bool(torch.isfinite(self.density).all())

    def tokens(self, texts: list[str]) -> list[Tensor]:
        """Each text as ``[bos, *tokens]`` (1-D), the same way rollouts start."""
        assert self.model.tokenizer is not None
        return [torch.tensor([self.bos, *self.model.tokenizer.encode(t, add_special_tokens=False)]) for t in texts]


@dataclass
class TaskVectors:
    """Unit steering vectors ``{method: [d_model]}`` of one task, the targets each used, and how
    the targets were obtained (``listed`` under a targets key, or ``discovered``)."""

    task: str
    vectors: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    targets_how: str = ""


def contrast_acts(task: Task, ctx: SteeringContext) -> tuple[Tensor, Tensor]:
    """Mean SAE activations ``[d_sae]`` on the task's positive and negative examples."""
    incl, sink = ctx.run.effects.include_first_position, ctx.run.effects.max_resid_norm
    pos = M.mean_sae_acts(
        ctx.model, ctx.sae, ctx.hook_name, ctx.tokens(task.positive), include_first_position=incl, max_resid_norm=sink
    )
    neg = M.mean_sae_acts(
        ctx.model, ctx.sae, ctx.hook_name, ctx.tokens(task.negative), include_first_position=incl, max_resid_norm=sink
    )
    return pos, neg


def resolve_targets(
    task: Task, ctx: SteeringContext, acts: tuple[Tensor, Tensor] | None = None
) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Targets per target-based method and a sentence saying where they came from."""
    key = ctx.run.sae.targets_key
    d_sae = ctx.sae.cfg.d_sae
    listed = {m: task.targets_for(key, TARGETS_OF.get(m, m)) for m in TARGET_METHODS}
    if all(t is not None for t in listed.values()):
        for m, t in listed.items():
            check_target_ids(t, d_sae, f"params/tasks/{task.name}.yaml targets[{key}] ({m})")  # type: ignore[arg-type]
        return {
            m: list(t) for m, t in listed.items() if t is not None
        }, f"listed in params/tasks/{task.name}.yaml under {key}"
    _need_density(ctx, f"discovering the targets of task {task.name!r}")
    pos, neg = acts if acts is not None else contrast_acts(task, ctx)
    found = M.discover_target_features(
        pos, neg, ctx.density, density_max=ctx.run.eval.fgaa_density_max, k=task.discover.k
    )
    how = (
        f"discovered: top {task.discover.k} feature(s) of mean SAE activation on the {len(task.positive)} positive "
        f"minus {len(task.negative)} negative examples, features with baseline density > "
        f"{ctx.run.eval.fgaa_density_max} dropped, weights L1-normalised"
    )
    return {m: found for m in TARGET_METHODS}, how


def _need_density(ctx: SteeringContext, what: str) -> None:
    """Refuse ``what`` when 01's baseline density is unknown (a published adapter without 01)."""
    if not ctx.has_density:
        raise FileNotFoundError(
            f"{what} needs 01's baseline feature density ({ctx.run.paths.baseline}), which a published "
            "adapter does not carry; run notebooks/01_effects.ipynb, or list the task's targets and leave out FGAA"
        )


# (context, task or None for hand-written targets, the method's targets or [] if it uses none) -> unit vector
Builder = Callable[[SteeringContext, Task | None, M.Target], Tensor]
BUILDERS: dict[str, Builder] = {}


def builds(name: str) -> Callable[[Builder], Builder]:
    """Register the function that builds the vector of registry method ``name`` (one per method)."""
    entry = get_method(name)

    def register(fn: Builder) -> Builder:
        if not entry.vector:
            raise ValueError(f"{name} steers without a vector; it has no builder")
        if name in BUILDERS:
            raise ValueError(f"{name} already has a builder ({BUILDERS[name].__name__})")
        BUILDERS[name] = fn
        return fn

    return register


def _w_dec(ctx: SteeringContext) -> Tensor:
    return ctx.sae.W_dec.detach().float().cpu()


def _approx(ctx: SteeringContext) -> EffectApproximator:
    assert ctx.approx is not None  # checked by _build against the registry's needs_approximator
    return ctx.approx


@builds("CAA")
def _caa(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    if task is None:
        raise ValueError("CAA needs a task's contrastive examples, not target features")
    return M.build_caa_vector(
        ctx.model,
        ctx.hook_name,
        ctx.tokens(task.positive),
        ctx.tokens(task.negative),
        include_first_position=ctx.run.effects.include_first_position,
    )


@builds("SAE")
def _sae(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_sae_vector(_w_dec(ctx), targets)


@builds("SAE-TS")
def _sae_ts(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_sae_ts_vector(_approx(ctx), targets, ctx.run.approximator.sae_ts_lambda)


@builds("SAE-TS-nobias")
def _sae_ts_nobias(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_sae_ts_vector(_approx(ctx), targets, 0.0)


@builds("pinverse")
def _pinverse(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_pinverse_vector(_approx(ctx), targets)


@builds("rotation")
def _rotation(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_rotation_vector(
        _approx(ctx), _w_dec(ctx), targets, R=ctx.rotation, lam=ctx.run.approximator.sae_ts_lambda
    )


@builds("FGAA")
def _fgaa(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    return M.build_fgaa_vector(_approx(ctx), targets, ctx.run.approximator.sae_ts_lambda)


@builds("random")
def _random(ctx: SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
    key = task.name if task is not None else ",".join(f"{f}:{w}" for f, w in targets)
    return M.build_random_vector(ctx.model.cfg.d_model, key, ctx.run.seed)


def _build(ctx: SteeringContext, entry: Method, task: Task | None, targets: M.Target) -> Tensor:
    if entry.needs_approximator and ctx.approx is None:
        raise FileNotFoundError(f"{entry.name} needs the effect approximator; run notebooks/02_train.ipynb first")
    return BUILDERS[entry.name](ctx, task, targets)


def build_target_vector(ctx: SteeringContext, method: str, targets: list[tuple[int, float]]) -> Tensor:
    """Unit vector of a target-based method (SAE, SAE-TS, pinverse, rotation, FGAA) for ``targets``;
    FGAA is the SAE-TS formula applied to its own target."""
    entry = get_method(method)
    if not entry.from_targets:
        raise ValueError(
            f"{method!r} is not built from target features; use one of "
            f"{tuple(m.name for m in REGISTRY if m.from_targets)}"
        )
    return _build(ctx, entry, None, targets)


def build_task_vectors(task: Task, ctx: SteeringContext, methods: list[str]) -> TaskVectors:
    """Unit vectors for every steering method in ``methods`` (``prompt`` needs none)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; use one of {METHODS}")
    entries = [get_method(m) for m in methods]
    out = TaskVectors(task=task.name)
    needs_acts = any(e.targets == "contrast" for e in entries) or ctx.run.sae.targets_key is None
    if needs_acts:  # FGAA and discovered targets drop dense features: they need 01's density
        _need_density(ctx, f"FGAA or discovering the targets of task {task.name!r}")
    acts = contrast_acts(task, ctx) if needs_acts else None
    targets, out.targets_how = resolve_targets(task, ctx, acts)
    needs_approx = {e.name for e in entries if e.needs_approximator}
    if needs_approx and ctx.approx is None:
        raise FileNotFoundError(
            f"methods {sorted(needs_approx)} need the effect approximator; run notebooks/02_train.ipynb first"
        )
    for e in entries:
        if e.targets == "contrast":
            assert acts is not None
            targets[e.name] = M.build_fgaa_target(
                acts[0],
                acts[1],
                ctx.density,
                density_max=ctx.run.eval.fgaa_density_max,
                bos_features=ctx.run.eval.fgaa_bos_features,
                top_k=ctx.run.eval.fgaa_top_k,
            )
    for e in entries:
        if not e.vector:
            continue
        v = _build(ctx, e, task, targets.get(e.name, []))
        if e.from_targets:
            out.targets[e.name] = targets[e.name]
        out.vectors[e.name] = v.float().cpu()
    return out


def load_context(
    run: RunConfig, model: HookedTransformer, sae: SAE, require_approximator: bool = True
) -> SteeringContext:
    """A :class:`SteeringContext` from ``results/<run>/`` (baseline of 01, approximator of 02), or,
    as ``approximator.adapter_source`` says, with the published adapter (docs/published.md): its
    ``W``, ``b`` checked against the SAE, its rotation when given, and the comparison of its rotation and
    correction bias with ours in ``approx_check``. Without 01 (the published adapter, or 02's fit of the
    published effects: :func:`~saets_utils.approximator.published.approximator_is_published`) the
    baseline density is unknown (NaN): FGAA and discovered targets then refuse, naming 01."""
    from safetensors.torch import load_file

    from saets_utils.approximator.model import load_rotation
    from saets_utils.approximator.published import (
        adapter_source_is_published,
        approximator_is_published,
        load_published_adapter,
    )
    from saets_utils.models.loading import bos_id

    d = run.paths
    published = adapter_source_is_published(run)
    if d.baseline.is_file():
        density = load_file(d.baseline)["density"]
    elif approximator_is_published(run):
        density = torch.full((int(sae.W_dec.shape[0]),), float("nan"))
    else:
        raise FileNotFoundError(f"{d.baseline} not found; run notebooks/01_effects.ipynb first")
    path = d.approximator
    check: list[dict] = []
    approx: EffectApproximator | None
    rotation: Tensor | None
    if published:
        pub = load_published_adapter(run, sae.W_dec)
        approx, rotation, source, check = pub.approx, pub.rotation, f"published: {pub.source}", pub.comparison
    else:
        if require_approximator and not path.is_file():
            raise FileNotFoundError(f"{path} not found; run notebooks/02_train.ipynb first")
        approx = EffectApproximator.load(path) if path.is_file() else None
        rotation = load_rotation(path) if path.is_file() else None
        source = f"02: {path}" if path.is_file() else ""
    return SteeringContext(
        run=run,
        model=model,
        sae=sae,
        approx=approx,
        rotation=rotation,
        density=density,
        bos=bos_id(model, run.model),
        approx_source=source,
        approx_check=check,
    )
