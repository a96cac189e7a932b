"""Console progress where `make demo` used to print nothing for minutes: SAE training draws a text
bar on stderr (which papermill's log shows), not sae_lens's tqdm.auto widget (which it never shows)."""

from __future__ import annotations

import numpy as np

from helpers import HOOK, build_run_cfg
from saets_utils.models import loading, sae_training


def synthetic_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran far away into green hills and cold rivers".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(n)]


def test_sae_training_shows_a_console_bar(tmp_path, monkeypatch, tiny_model, capsys):
    from sae_lens.training import sae_trainer

    def widget_bar(*args, **kwargs):
        raise AssertionError("sae_lens drew its tqdm.auto bar: an ipywidget under papermill, never in the log")

    monkeypatch.setattr(sae_trainer, "tqdm", widget_bar)
    monkeypatch.setenv("SAETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "load_texts", lambda cfg: synthetic_texts())
    train = {"d_sae": 64, "k": 4, "training_tokens": 2048, "context_size": 32, "batch_size_tokens": 256}
    run = build_run_cfg(
        tmp_path, model={"bos_token_id": None}, sae={"source": "train", "hook_name": HOOK, "train": train}
    )
    sae_training.train_or_load_sae(run, run.sae, model=tiny_model)
    err = capsys.readouterr().err
    assert "Training SAE" in err and "2048/2048" in err  # sae_lens's bar, drawn as text, moved every step
    assert f"SAE {HOOK} (tokenise, train, check)" in err and "3/3" in err
    assert sae_trainer.tqdm is widget_bar  # restored after training
