"""Offline loader paths: Gemma Scope npz, local sae_lens folders, the trained-SAE cache, text chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import HOOK, build_run_cfg
from saets_utils.config import ConfigError, ModelConfig, RunConfig, TextConfig
from saets_utils.models import loading, sae_loading, sae_training


def make_run(tmp_path: Path, sae: dict, model: dict | None = None) -> RunConfig:
    """A tiny run whose SAE is ``sae`` (source ``train`` unless given) and whose model takes the
    tokenizer's start token unless ``model`` says otherwise."""
    return build_run_cfg(tmp_path, model=model or {"bos_token_id": None}, sae={"source": "train", **sae})


# --- Gemma Scope params.npz -------------------------------------------------------------------


def gemma_scope_params(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": rng.uniform(0.2, 1.0, size=d_sae).astype(np.float32),
    }


def gemma_scope_encode(p: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's reference JumpReLU: no ``x - b_dec`` before the encoder."""
    pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    return torch.relu(pre) * (pre > torch.from_numpy(p["threshold"]))


def test_gemma_scope_npz_encode_matches_reference(tmp_path):
    p = gemma_scope_params()
    np.savez(tmp_path / "params.npz", **p)
    sae = sae_loading.sae_from_gemma_scope_npz(tmp_path / "params.npz", hook_name=HOOK)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * 2
    want = gemma_scope_encode(p, x)
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.metadata.hook_name == HOOK
    assert (want > 0).any() and (want == 0).any()  # the threshold matters in this example
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae.decode(want), want @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"]))


def test_gemma_scope_npz_through_load_sae_from(tmp_path):
    p = gemma_scope_params()
    np.savez(tmp_path / "params.npz", **p)
    run = make_run(tmp_path, {"source": "gemma_scope_npz", "path": str(tmp_path / "params.npz")})
    sae = sae_loading.load_sae_from(run.sae, run)
    x = torch.randn(3, 8)
    torch.testing.assert_close(sae.encode(x), gemma_scope_encode(p, x))
    assert not sae.training and not any(q.requires_grad for q in sae.parameters())


def test_gemma_scope_npz_missing_key_fails_clearly(tmp_path):
    p = gemma_scope_params()
    del p["threshold"]
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(ConfigError, match=r"not a Gemma Scope params.npz: missing \['threshold'\]"):
        sae_loading.sae_from_gemma_scope_npz(tmp_path / "params.npz")


def test_gemma_scope_npz_missing_file_names_field(tmp_path):
    run = make_run(tmp_path, {"source": "gemma_scope_npz", "path": str(tmp_path / "nope.npz")})
    with pytest.raises(ConfigError, match=r"sae.path .* does not exist"):
        sae_loading.load_sae_from(run.sae, run)


# --- local sae_lens folder ------------------------------------------------------------------


def test_local_sae_lens_folder_round_trip(tmp_path, tiny_sae):
    tiny_sae.save_model(tmp_path / "sae")
    run = make_run(tmp_path, {"source": "local", "path": str(tmp_path / "sae")})
    loaded = sae_loading.load_sae_from(run.sae, run)
    assert type(loaded) is type(tiny_sae)
    for name, value in tiny_sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    x = torch.randn(7, tiny_sae.cfg.d_in)
    torch.testing.assert_close(loaded.encode(x), tiny_sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), tiny_sae.decode(tiny_sae.encode(x)))


def test_local_sae_missing_folder_names_field(tmp_path):
    run = make_run(tmp_path, {"source": "local", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"sae.path .* not a folder saved by sae_lens"):
        sae_loading.load_sae_from(run.sae, run)


# --- trained SAE: cache round trip and quality ------------------------------------------------


def synthetic_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran far away into green hills and cold rivers".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(n)]


TRAIN = {
    "d_sae": 64,
    "k": 4,
    "training_tokens": 4096,
    "context_size": 32,
    "batch_size_tokens": 256,
    "n_batches_in_buffer": 16,
}


@pytest.fixture()
def sae_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "load_texts", lambda cfg: synthetic_texts())
    return tmp_path / "cache"


def test_trained_sae_is_cached_and_reloaded_without_training(sae_cache, tiny_model, monkeypatch, tmp_path):
    run = make_run(tmp_path, {"train": TRAIN})
    seen: list[torch.Tensor] = []
    real_train = sae_training.train_sae

    def spy(model, tokens, *args, **kwargs):
        seen.append(tokens)
        return real_train(model, tokens, *args, **kwargs)

    monkeypatch.setattr(sae_training, "train_sae", spy)
    first = sae_training.train_or_load_sae(run, run.sae, model=tiny_model)
    assert type(first).__name__ == "TopKSAE" and not first.training
    assert (first.cfg.d_in, first.cfg.d_sae, first.cfg.k) == (32, 64, 4)
    bos = loading.bos_id(tiny_model, run.model)
    assert seen and (seen[0][:, 0] == bos).all() and seen[0].shape[1] == 32

    folder = sae_training.sae_cache_path(run)
    assert folder.parent == sae_cache / "saes" and (folder / "cfg.json").is_file()
    quality = sae_training.load_sae_quality(run)
    assert quality == json.loads((folder / "quality.json").read_text())
    for key in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "train_seconds"):
        assert key in quality
    assert quality["include_first_position"] is False and quality["exclude_tokens"] == [bos]
    assert quality["l0"] <= 4

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(sae_training, "train_sae", no_training)
    monkeypatch.setattr(loading, "load_model", no_training)  # a cache hit needs no model
    second = sae_loading.load_sae_from(run.sae, run)
    for name, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], value)


def test_cached_sae_refuses_another_model(sae_cache, tiny_model, tmp_path):
    from saets_utils.models.tiny import tiny_model as make_tiny

    run = make_run(tmp_path, {"train": TRAIN})
    sae_training.train_or_load_sae(run, run.sae, model=tiny_model)
    with pytest.raises(ConfigError, match="trained on another model"):
        sae_training.train_or_load_sae(run, run.sae, model=make_tiny(seed=1))


def test_cache_key_changes_with_settings(tmp_path):
    base = make_run(tmp_path, {"train": TRAIN})
    keys = {
        sae_training.sae_cache_key(r, r.sae)
        for r in [
            base,
            make_run(tmp_path, {"train": {**TRAIN, "k": 8}}),
            make_run(tmp_path, {"train": TRAIN}, {"source": "tiny", "bos_token_id": 0}),
            base.model_copy(update={"seed": 1}),
            make_run(tmp_path, {"train": TRAIN, "hook_name": "blocks.2.hook_resid_post"}),
        ]
    }
    assert len(keys) == 5
    assert sae_training.sae_cache_key(base, base.sae) == sae_training.sae_cache_key(
        make_run(tmp_path, {"train": TRAIN}), base.sae
    )


def test_load_sae_quality_is_none_before_training(sae_cache, tmp_path):
    assert sae_training.load_sae_quality(make_run(tmp_path, {"train": TRAIN})) is None
    assert sae_training.load_sae_quality(make_run(tmp_path, {"source": "tiny"})) is None


def exact_sae(d_in: int):
    """A TopK SAE that reconstructs exactly: features are the positive and negative parts of x."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=2 * d_in, k=d_in, apply_b_dec_to_input=False))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_sae_quality_of_an_exact_sae(tiny_model):
    tokens = torch.randint(2, tiny_model.cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    q = sae_training.sae_quality(tiny_model, exact_sae(32), HOOK, tokens, include_first_position=False, batch_size=3)
    assert q["fvu"] < 1e-10 and q["l0"] <= 32
    assert q["ce_sae"] == pytest.approx(q["ce_clean"], abs=1e-5)
    assert q["n_tokens_scored"] == 4 * 15
    if q["ce_zero"] > q["ce_clean"]:
        assert q["ce_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_sae_quality_positions_scored(tiny_model, tiny_sae):
    tokens = torch.randint(2, tiny_model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    tokens[0, 5] = 1
    all_q = sae_training.sae_quality(tiny_model, tiny_sae, HOOK, tokens)
    some = sae_training.sae_quality(
        tiny_model, tiny_sae, HOOK, tokens, include_first_position=False, exclude_tokens=[1]
    )
    assert all_q["n_tokens_scored"] == 20 and some["n_tokens_scored"] == 17
    assert all_q["ce_clean"] == pytest.approx(some["ce_clean"])
    assert some["l0"] <= tiny_sae.cfg.k and 0 <= some["dead_fraction"] <= 1


# --- text chunks ------------------------------------------------------------------------------


def test_tokenize_chunks_shape_and_start_token(tiny_model):
    texts = synthetic_texts(50)
    chunks = loading.tokenize_chunks(tiny_model, texts, 24, 10, bos=0, seed=3)
    assert chunks.shape == (10, 24) and chunks.dtype == torch.long
    assert (chunks[:, 0] == 0).all()
    assert torch.equal(chunks, loading.tokenize_chunks(tiny_model, texts, 24, 10, bos=0, seed=3))
    with pytest.raises(ConfigError, match=r"only .* chunks"):
        loading.tokenize_chunks(tiny_model, texts[:2], 24, 10, bos=0)


def test_tokenize_chunks_aligned_to_document_starts(tiny_model):
    texts = synthetic_texts(50)
    chunks = loading.tokenize_chunks(tiny_model, texts, 24, 12, bos=0, seed=3, align_docs=True)
    firsts = {tuple(tiny_model.tokenizer.encode(t, add_special_tokens=False)[:3]) for t in texts}
    assert (chunks[:, 0] == 0).all()
    assert all(tuple(row[1:4].tolist()) in firsts for row in chunks)


def test_load_texts_gutenberg_has_many_paragraphs():
    texts = loading.load_texts(TextConfig())
    assert len(texts) > 5000
    assert all(len(t) > 200 and "\n" not in t for t in texts[:100])


# --- the real embedded SmolLM2 ----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_transformer_lens_matches_transformers():
    from transformers import AutoModelForCausalLM

    from saets_utils.models.assets import prepare_smollm2

    model = loading.load_model(ModelConfig())
    hf = AutoModelForCausalLM.from_pretrained(prepare_smollm2(), dtype=torch.float32).eval()
    texts = loading.load_texts(TextConfig())[:3]
    tokens = loading.tokenize_chunks(model, texts, 24, 3, bos=0, seed=0, align_docs=True)
    with torch.no_grad():
        ours = torch.log_softmax(model(tokens).float(), dim=-1)
        theirs = torch.log_softmax(hf(tokens).logits.float(), dim=-1)
    assert (ours - theirs).abs().max().item() < 1e-3
