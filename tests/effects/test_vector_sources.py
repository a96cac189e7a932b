"""The ``pairs`` and ``other_sae`` vector sources of 01: what each vector is, not only its shape.

``pairs``: each vector is the normalised sum of two distinct decoder rows of the run's SAE (equal
weights), drawn with the run's seed. ``other_sae``: the rows of the SAE named in
``effects.vectors.sae``, loaded by the runner, not the run's own SAE.
"""

from __future__ import annotations

import pytest
import torch

from helpers import D_MODEL, D_SAE, HOOK, build_run_cfg
from saets_utils.config import ConfigError
from saets_utils.effects.runner import prepare_plan
from saets_utils.effects.vector_sources import build_vectors
from saets_utils.models.sae_loading import load_sae_from

# Wider than the run's SAE (64 features): rows 64..127 exist only in the other SAE.
OTHER = {"source": "tiny", "hook_name": HOOK, "train": {"d_sae": 128, "k": 4}}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_pairs_are_normalised_sums_of_two_distinct_decoder_rows(tmp_path, tiny_sae):
    run = build_run_cfg(tmp_path, seed=3, effects={"vectors": {"source": "pairs", "count": 16}})
    ids, vecs = build_vectors(run, tiny_sae, D_MODEL)
    assert ids.tolist() == list(range(16)) and vecs.shape == (16, D_MODEL)
    W = tiny_sae.W_dec.detach().float()
    sums = _unit(W[:, None] + W[None])  # [d_sae, d_sae, d_model]: every pair, i == j included
    found = []
    for v in vecs:
        cos = sums @ v
        i, j = divmod(int(cos.argmax()), D_SAE)
        assert float(cos[i, j]) > 1 - 1e-5, "not the normalised sum of two decoder rows with equal weights"
        assert i != j, f"row {i} drawn twice"
        found.append(frozenset((i, j)))
    assert len(set(found)) > 1  # draws, not one pair repeated
    assert torch.equal(build_vectors(run, tiny_sae, D_MODEL)[1], vecs)  # fixed by the run's seed
    other_seed = build_run_cfg(tmp_path, seed=4, effects={"vectors": {"source": "pairs", "count": 16}})
    assert not torch.equal(build_vectors(other_seed, tiny_sae, D_MODEL)[1], vecs)


def test_other_sae_gives_the_other_saes_rows(tmp_path, tiny_sae):
    run = build_run_cfg(tmp_path, effects={"vectors": {"source": "other_sae", "sae": OTHER, "ids": [0, 100, 127]}})
    asked = []

    def load(cfg):
        asked.append(cfg)
        return load_sae_from(cfg, run, "cpu")

    ids, vecs = build_vectors(run, tiny_sae, D_MODEL, load_other_sae=load)
    assert asked == [run.effects.vectors.sae]
    other = load_sae_from(run.effects.vectors.sae, run, "cpu")
    assert ids.tolist() == [0, 100, 127]  # 100 and 127: rows the run's own 64-feature SAE does not have
    torch.testing.assert_close(vecs, _unit(other.W_dec.detach().float()[[0, 100, 127]]))
    with pytest.raises(ConfigError, match=r"'other_sae' needs effects.vectors.sae"):
        build_vectors(run, tiny_sae, D_MODEL)  # no loader given
    wide = build_run_cfg(tmp_path, effects={"vectors": {"source": "other_sae", "sae": OTHER, "ids": [127, 128]}})
    with pytest.raises(ConfigError, match=r"decoder rows \[128\] out of range 0..127"):
        build_vectors(wide, tiny_sae, D_MODEL, load_other_sae=load)


def test_other_sae_rows_are_what_01_plans_to_measure(tmp_path, tiny_model, tiny_sae):
    run = build_run_cfg(tmp_path, effects={"vectors": {"source": "other_sae", "sae": OTHER, "ids": [70, 90]}})
    plan = prepare_plan(run, tiny_model, tiny_sae)  # the runner loads the other SAE itself
    other = load_sae_from(run.effects.vectors.sae, run, "cpu")
    assert plan.vector_ids.tolist() == [70, 90]
    torch.testing.assert_close(plan.vectors, _unit(other.W_dec.detach().float()[[70, 90]]))


def test_a_replaced_other_sae_is_not_resumed(tmp_path, tiny_model, tiny_sae):
    """01's fingerprint digests the other SAE's files: one retrained at the same path is refused
    instead of resumed on the old plan's vectors; the same files resume."""
    from saets_utils.models.tiny import tiny_sae as make_tiny_sae

    folder = tmp_path / "other_sae"
    make_tiny_sae(d_sae=128, seed=0, hook_name=HOOK).save_model(str(folder))
    other = {"source": "local", "path": str(folder), "hook_name": HOOK}
    run = build_run_cfg(tmp_path, effects={"vectors": {"source": "other_sae", "sae": other, "ids": [70, 90]}})
    prepare_plan(run, tiny_model, tiny_sae)
    prepare_plan(run, tiny_model, tiny_sae)  # unchanged: resumes
    make_tiny_sae(d_sae=128, seed=1, hook_name=HOOK).save_model(str(folder))  # retrained, same path
    with pytest.raises(ConfigError, match=r"other effects settings or inputs"):
        prepare_plan(run, tiny_model, tiny_sae)
