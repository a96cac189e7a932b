"""What a throughput run measures: model, SAE, vectors, loss chunks and effect settings.

From a params file (default ``params/demo.yaml``: the embedded SmolLM2), with the SAE options of
benchmarks/README.md, or for ``--smoke`` the tiny seeded model and SAE of
``saets_utils.models.tiny`` at tiny effect settings (the sizes the tests use), so every code path
runs in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saets_utils.config import CalibrationConfig, LossTarget, RunConfig, load_config
from saets_utils.effects.measure import RolloutSpec

# --smoke: params/test.yaml with the tiny model and SAE at the tests' sizes (tests/helpers.py)
SMOKE_PARAMS = "params/test.yaml"
SMOKE_OVERRIDES: dict[str, Any] = {
    "device": "cpu",
    "model": {"source": "tiny", "bos_token_id": 1},
    "sae": {"source": "tiny", "hook_name": "blocks.1.hook_resid_post", "train": {"d_sae": 64, "k": 4}},
    "effects": {
        "vectors": {"source": "decoder_rows", "ids": {"start": 0, "stop": 8}},
        "scale_grid": {"start": 0, "stop": 40, "step": 10},
        "loss_target": {"kind": "relative", "value": 0.3},
        "loss_chunks": 4,
        "loss_chunk_tokens": 16,
        "prompts": ["", "I think"],
        "samples_per_prompt": 2,
        "total_tokens": 12,
        "vectors_per_batch": 2,
    },
}


@dataclass
class Setup:
    """One run's inputs: ``vectors [n, d_model]`` (unit) with their ``vector_ids [n]``, the loss
    chunks ``loss_tokens [c, seq]``, the rollout spec, the scale grid and loss target, and a label
    per setting for the report."""

    model: Any
    sae: Any
    hook: str
    spec: RolloutSpec
    loss_tokens: torch.Tensor
    vector_ids: torch.Tensor
    vectors: torch.Tensor
    grid: list[float]
    target: LossTarget
    seed: int
    vectors_per_batch: int
    device: str
    label: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def _sae_cached(run: RunConfig) -> bool:
    if run.sae.source != "train":
        return True
    from saets_utils.models.sae_training import sae_cache_path

    return (sae_cache_path(run) / "cfg.json").is_file()


def _choose_run(
    params: str, sae_dir: str | None, random_sae_at: str | None, allow_train: bool, fallback_sae_params: str
) -> tuple[RunConfig, str]:
    """The run to measure and a sentence saying where its settings come from. If the params' SAE is
    not cached (training takes minutes), the SAE of ``fallback_sae_params`` with the params' model
    and effect settings."""
    run = load_config(params)
    if sae_dir:
        cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
        sae = {"source": "local", "path": str(Path(sae_dir).resolve()), "hook_name": cfg["metadata"]["hook_name"]}
        return load_config(params, {"sae": sae}), f"effect settings of {params}; SAE loaded from --sae-dir {sae_dir}"
    if random_sae_at:
        t = run.sae.train
        return load_config(params, {"sae": {"source": "tiny", "hook_name": random_sae_at}}), (
            f"effect settings of {params}; RANDOM TopK SAE (d_sae {t.d_sae}, k {t.k}) at --random-sae-at "
            f"{random_sae_at} (throughput only)"
        )
    if _sae_cached(run) or allow_train:
        return run, f"{params} (model, SAE and effect settings)"
    # every effects field, so nothing of the fallback's effect settings survives
    keep = {
        "effects": run.effects.model_dump(mode="json"),
        "model": run.model.model_dump(mode="json"),
        "seed": run.seed,
    }
    run = load_config(fallback_sae_params, keep)
    if not _sae_cached(run):
        from saets_utils.models import assets

        found = [
            f"{p.parent} ({json.loads(p.read_text())['metadata'].get('hook_name')})"
            for p in sorted((assets.cache_dir() / "saes").glob("*/cfg.json"))
        ]
        raise SystemExit(
            f"neither {params}'s nor {fallback_sae_params}'s SAE is cached; run with --allow-train (minutes), "
            f"--sae-dir DIR (a saved sae_lens SAE; cached: {found}) or --random-sae-at HOOK"
        )
    return run, (
        f"SAE of {fallback_sae_params} ({run.sae.hook_name}, d_sae {run.sae.train.d_sae}) with the model and effect "
        f"settings of {params} (its SAE is not cached; --allow-train trains it)"
    )


def _load_model_and_sae(run: RunConfig, device: str, random_sae_at: str | None):
    from saets_utils.session import load_model_and_sae

    if not random_sae_at:
        return load_model_and_sae(run, device)
    # the model as load_model_and_sae loads it, a random SAE of the params' shape
    from saets_utils.models.loading import load_model, validate_against_model
    from saets_utils.models.tiny import tiny_sae

    model = load_model(run.model, device)
    validate_against_model(run, model)
    t = run.sae.train
    sae = tiny_sae(d_in=model.cfg.d_model, d_sae=t.d_sae, k=t.k, seed=run.seed, hook_name=random_sae_at)
    return model, sae.to(device)


def params_setup(
    *,
    params: str,
    vectors: int,
    smoke: bool = False,
    sae_dir: str | None = None,
    random_sae_at: str | None = None,
    allow_train: bool = False,
    fallback_sae_params: str = "params/test.yaml",
    device: str | None = None,
    dtype: str | None = None,
    max_prompts: int | None = None,
    vectors_per_batch: int | None = None,
) -> Setup:
    """The first ``vectors`` vectors of a params file's run (its model, SAE and effect settings), or
    with ``smoke`` of the tiny run; prompts, loss chunks and rollout spec as notebook 01 makes them."""
    from saets_utils.effects.runner import rollout_spec
    from saets_utils.effects.vector_sources import build_vectors
    from saets_utils.models.loading import bos_id, cut_loss_tokens, torch_dtype
    from saets_utils.models.sae_loading import load_sae_from

    if smoke:
        run, source = load_config(SMOKE_PARAMS, SMOKE_OVERRIDES), "--smoke: the tiny model and SAE, tiny settings"
    else:
        run, source = _choose_run(params, sae_dir, random_sae_at, allow_train, fallback_sae_params)
    device = device or run.resolved_device()
    torch.manual_seed(run.seed)
    model, sae = _load_model_and_sae(run, device, random_sae_at)
    if dtype and dtype != run.model.dtype:  # cast after loading: the SAE cache key includes the dtype
        model.to(torch_dtype(dtype))
    if max_prompts:
        e = run.effects
        run = run.model_copy(update={"effects": e.model_copy(update={"prompts": e.prompts[:max_prompts]})})
    e = run.effects
    bos = bos_id(model, run.model)
    ids, vecs = build_vectors(run, sae, model.cfg.d_model, lambda c: load_sae_from(c, run, "cpu"))
    if len(ids) < vectors:
        raise SystemExit(f"the params select only {len(ids)} vectors; asked for {vectors}")
    label = {
        "model": f"{run.model.name} ({run.model.source}, {dtype or run.model.dtype})",
        "params": source,
        "sae": f"{'random TopK' if random_sae_at else run.sae.key} (d_sae {sae.cfg.d_sae})",
        "start token id": bos,
    }
    return Setup(
        model=model,
        sae=sae,
        hook=run.sae.hook_name,
        spec=rollout_spec(run, model, bos),
        loss_tokens=cut_loss_tokens(run, model, bos).to(device),
        vector_ids=ids[:vectors],
        vectors=vecs[:vectors].to(device),
        grid=e.scale_grid.values(),
        target=e.loss_target,
        seed=run.seed,
        vectors_per_batch=vectors_per_batch or e.vectors_per_batch,
        device=device,
        label=label,
        calibration=e.calibration,
    )
