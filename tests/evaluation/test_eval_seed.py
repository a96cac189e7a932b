"""eval.seed: 03's rollouts replicate on new seeds without touching 01's settings."""

from __future__ import annotations

import torch

from helpers import build_run_cfg
from saets_utils.config import eval_seed
from saets_utils.effects.plan import fingerprint
from saets_utils.evaluation.evaluate import generate_rows
from saets_utils.evaluation.task_vectors import SteeringContext


def texts(run, tiny_model, tiny_sae) -> list[str]:
    ctx = SteeringContext(run, tiny_model, tiny_sae, None, None, torch.zeros(tiny_sae.cfg.d_sae), 1)
    rows = [{"vector": None, "scale": 0.0, "sample": s} for s in range(4)]
    return generate_rows(ctx, rows, "")


def test_eval_seed_moves_03s_rollouts_only(tmp_path, tiny_model, tiny_sae):
    base = build_run_cfg(tmp_path, seed=3)
    same = build_run_cfg(tmp_path, seed=3, eval={"seed": 3}, stem="same")
    other = build_run_cfg(tmp_path, seed=3, eval={"seed": 4}, stem="other")
    assert eval_seed(base) == 3 and eval_seed(other) == 4
    assert texts(base, tiny_model, tiny_sae) == texts(same, tiny_model, tiny_sae)
    assert texts(other, tiny_model, tiny_sae) != texts(base, tiny_model, tiny_sae)
    assert fingerprint(other) == fingerprint(base)  # 01's work stays valid: only 03 re-runs
