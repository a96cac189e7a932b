"""The first cell of every notebook: load and validate the run, pick the device, seed, load models.

Keeps notebooks thin: ``run, device = start_run(params_file, overrides)`` then
``model, sae = load_model_and_sae(run, device)``; both validate before any expensive work.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saets_utils.config import RunConfig, load_config

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def start_run(params_file: str, overrides: dict[str, Any] | None = None) -> tuple[RunConfig, str]:
    """Validated config and resolved device; seeds python, numpy and torch; offline-safe env."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = load_config(params_file, overrides)
    device = run.resolved_device()
    random.seed(run.seed)
    np.random.seed(run.seed)
    torch.manual_seed(run.seed)
    run.results_dir.mkdir(parents=True, exist_ok=True)
    return run, device


def load_model_and_sae(run: RunConfig, device: str) -> tuple[HookedTransformer, SAE]:
    """The run's model and SAE on ``device``, each checked against the other and the params."""
    from saets_utils.models.loading import load_model, validate_against_model
    from saets_utils.models.sae_loading import load_sae, validate_sae

    model = load_model(run.model, device)
    validate_against_model(run, model)
    sae = load_sae(run, device, model)
    validate_sae(run, model, sae)
    return model, sae
