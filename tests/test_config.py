"""Params validation: every error names the field and the fix, before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import HOOK, build_run_cfg
from saets_utils.config import REPO_ROOT, ConfigError, RunConfig, load_config
from saets_utils.models.loading import validate_against_model
from saets_utils.models.sae_loading import validate_sae


def write_params(tmp_path: Path, data: dict[str, Any], stem: str = "run") -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def config_error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, data))
    return str(err.value)


def test_minimal_params_load_with_name_and_results_dir(tmp_path):
    cfg = load_config(write_params(tmp_path, {"sae": {"hook_name": HOOK}}, stem="my_run"))
    assert cfg.name == "my_run"
    assert cfg.results_dir == REPO_ROOT / "results" / "my_run"
    assert cfg.sae.layer == 1


def test_overrides_win_over_file(tmp_path):
    path = write_params(tmp_path, {"seed": 1, "sae": {"hook_name": HOOK, "train": {"k": 16}}})
    cfg = load_config(path, {"seed": 5, "gpus": 2, "sae": {"train": {"k": 8}}})
    assert (cfg.seed, cfg.gpus, cfg.sae.train.k) == (5, 2, 8)
    assert cfg.sae.hook_name == HOOK  # nested override merges, does not replace the mapping


@pytest.mark.parametrize(
    ("data", "field", "fix"),
    [
        ({"sae": {"hook_name": HOOK}, "bogus": 1}, "bogus", "remove it"),
        ({"sae": {"hook_name": HOOK, "trian": {"k": 4}}}, "sae.trian", "remove it"),
        (
            {"sae": {"hook_name": HOOK}, "effects": {"scale_grid": {"start": 10, "stop": 0}}},
            "effects.scale_grid",
            "stop > start",
        ),
        ({"sae": {"hook_name": HOOK}, "effects": {"scale_grid": {"step": 0}}}, "effects.scale_grid", "step > 0"),
        ({"sae": {"hook_name": HOOK}, "model": {"source": "local"}}, "model.path", "required"),
        ({"sae": {"hook_name": HOOK, "source": "sae_lens", "sae_id": "x"}}, "sae.release", "required"),
        ({"sae": {"hook_name": HOOK, "source": "gemma_scope_npz"}}, "sae.path", "sae.repo_id + sae.sae_id"),
        ({"sae": {"hook_name": HOOK}, "text": {"source": "hf"}}, "text.hf_dataset", "required"),
        ({"sae": {"hook_name": HOOK}, "device": "gpu"}, "device", "'cuda[:N]'"),
        (
            {
                "sae": {
                    "hook_name": HOOK,
                    "train": {"n_batches_in_buffer": 2, "context_size": 128, "batch_size_tokens": 1024},
                }
            },
            "n_batches_in_buffer",
            "raise n_batches_in_buffer",
        ),
    ],
)
def test_invalid_params_name_field_and_fix(tmp_path, data, field, fix):
    msg = config_error(tmp_path, data)
    assert field in msg and fix in msg, msg


def test_missing_params_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"not found; pass e.g. params/"):
        load_config(tmp_path / "nope.yaml")


def test_name_in_file_is_refused(tmp_path):
    msg = config_error(tmp_path, {"name": "x", "sae": {"hook_name": HOOK}})
    assert "do not set 'name'" in msg and "file stem" in msg


def test_missing_hook_name_is_reported(tmp_path):
    assert "sae.hook_name" in config_error(tmp_path, {"sae": {}})


def run_with_hook(tmp_path: Path, hook_name: str) -> RunConfig:
    return build_run_cfg(tmp_path, model={"bos_token_id": None}, sae={"hook_name": hook_name})


def test_validate_against_model_accepts_every_layer_and_the_last_vocab_id(tiny_model, tmp_path):
    """Every residual hook of every layer passes, and so does a start token at the vocabulary's edge;
    one past the edge is refused naming the vocabulary."""
    for layer in range(tiny_model.cfg.n_layers):
        for hook in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"):
            run = run_with_hook(tmp_path, hook)
            assert run.sae.layer == layer and validate_against_model(run, tiny_model) is None
    last = tiny_model.cfg.d_vocab - 1
    ok = build_run_cfg(tmp_path, model={"bos_token_id": last}, sae={"hook_name": HOOK})
    validate_against_model(ok, tiny_model)
    bad = build_run_cfg(tmp_path, model={"bos_token_id": last + 1}, sae={"hook_name": HOOK})
    with pytest.raises(ConfigError, match=rf"model.bos_token_id {last + 1} outside vocab 0..{last}"):
        validate_against_model(bad, tiny_model)


def test_validate_against_model_hook_not_in_model(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"'blocks.1.hook_nope' is not a hook.*use e.g. blocks.1.hook_resid_post"):
        validate_against_model(run_with_hook(tmp_path, "blocks.1.hook_nope"), tiny_model)


def test_validate_against_model_layer_out_of_range(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"layer 7 out of range.*layers 0..2"):
        validate_against_model(run_with_hook(tmp_path, "blocks.7.hook_resid_post"), tiny_model)


def test_validate_against_model_malformed_hook(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"not of the form blocks.<layer>"):
        validate_against_model(run_with_hook(tmp_path, "hook_embed"), tiny_model)


def test_validate_sae_width_mismatch(tiny_model, tmp_path):
    from saets_utils.models.tiny import tiny_sae

    validate_sae(run_with_hook(tmp_path, HOOK), tiny_model, tiny_sae(d_in=tiny_model.cfg.d_model))
    with pytest.raises(ConfigError, match=r"d_in 16 but .* d_model 32; pick an SAE trained on this model"):
        validate_sae(run_with_hook(tmp_path, HOOK), tiny_model, tiny_sae(d_in=16))
