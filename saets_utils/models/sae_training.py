"""Train a TopK SAE with sae_lens on the run's text corpus, cache it, and measure its quality.

No package ships an SAE for the embedded SmolLM2, so ``sae.source: train`` trains one here
(``LanguageModelSAETrainingRunner`` on a pre-tokenised dataset, seeded, no wandb) and saves it once
under ``<cache>/saes/<key>/`` (``SAE.load_from_disk`` afterwards), with ``quality.json`` beside it.

Start token / position 0: every training chunk starts with the run's start token (``bos_id``) at
position 0 and starts at a document start (``tokenize_chunks(align_docs=True)``; documents inside a
chunk are separated by the same id). On SmolLM2 these start-token positions are attention sinks
(residual norm ~20k vs ~150 at layer 12), and a chunk starting mid-sentence makes position 1 a
second sink that alone held ~90% of the activation variance. So the SAE is trained without
start-token positions (sae_lens ``exclude_special_tokens=[bos]``), which is what the effects step
does with ``include_first_position: false``. ``quality.json`` measures the same way: position 0
and separator positions are neither scored nor spliced; CE is averaged over all next-token
predictions of the held-out chunks (documents never seen in training).

Recipe for short CPU runs: ``b_dec`` starts at the mean activation (sae_lens starts it at 0), the
last 20% of steps decay the lr to 0. On SmolLM2 a larger lr than the usual 3e-4 paid off here:
3e-3 at layer 12 (300k tokens, FVU 0.18 vs 0.21 at 1e-3), 1e-2 at layer 3 (41k tokens, FVU 0.11).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import numpy as np
import torch

from saets_utils.config import ConfigError, RunConfig, SAEConfig, SAETrainConfig
from saets_utils.models import assets, loading

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

RECIPE_VERSION = 2  # bump when the training recipe changes, so old cached SAEs are not reused
QUALITY_CHUNKS = 32  # held-out chunks (of context_size tokens) for quality.json
HELDOUT_DOC_FRACTION = 0.05
STORE_BATCH_PROMPTS = 16


def sae_cache_key(run: RunConfig, sae_cfg: SAEConfig) -> str:
    """Short hash of everything that determines the trained SAE (model, start token, text, hook,
    training settings, seed, recipe version)."""
    m = run.model
    bos = m.bos_token_id if m.bos_token_id is not None else "tokenizer"
    spec = {
        "model": [m.source, m.name, m.path, m.dtype],
        "bos": bos,
        "text": run.text.model_dump(),
        "hook": sae_cfg.hook_name,
        "train": sae_cfg.train.model_dump(),
        "seed": run.seed,
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def sae_cache_path(run: RunConfig, sae_cfg: SAEConfig | None = None) -> Path:
    """Folder of the cached SAE for this run (may not exist yet)."""
    sae_cfg = sae_cfg or run.sae
    return assets.cache_dir() / "saes" / sae_cache_key(run, sae_cfg)


def model_fingerprint(model: HookedTransformer) -> dict[str, Any]:
    """Shape and a weight statistic of ``model``, to refuse a cached SAE trained on another model."""
    c = model.cfg
    return {
        "model_name": c.model_name,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "d_vocab": c.d_vocab,
        "w_e_abs_mean": float(model.W_E.detach().float().abs().mean()),
    }


def _check_fingerprint(folder: Path, model: HookedTransformer) -> None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return
    want = json.loads(meta_file.read_text()).get("model_fingerprint", {})
    got = model_fingerprint(model)
    same = all(want.get(k) == got[k] for k in ("n_layers", "d_model", "d_vocab")) and math.isclose(
        want.get("w_e_abs_mean", 0.0), got["w_e_abs_mean"], rel_tol=1e-3
    )
    if not same:
        raise ConfigError(
            f"cached SAE {folder} was trained on another model ({want} vs {got}); "
            "delete that folder or fix the model settings in params"
        )


def split_documents(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of documents into (train, held-out); held-out feeds only ``quality.json``."""
    order = np.random.default_rng(seed + 1).permutation(len(texts))
    n_held = max(1, min(int(len(texts) * HELDOUT_DOC_FRACTION), 2000))
    held = set(order[:n_held].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def _chunks(model: HookedTransformer, texts: list[str], ctx: int, n: int, bos: int, seed: int) -> torch.Tensor:
    try:
        return loading.tokenize_chunks(model, texts, ctx, n, bos=bos, seed=seed, align_docs=True)
    except ConfigError:  # corpus too small: use all of it (sae_lens then runs more than one epoch)
        return loading.tokenize_chunks(model, texts, ctx, None, bos=bos, seed=seed, align_docs=True)


def train_sae(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    train: SAETrainConfig,
    *,
    bos: int,
    seed: int,
    out_dir: Path,
    device: str = "cpu",
    model_name: str = "",
) -> None:
    """Train a TopK SAE on ``tokens`` [n, context_size] with sae_lens and save it to ``out_dir``.

    Rows are used as given (no BOS prepended, nothing concatenated); start-token positions are
    excluded from the activations. ``b_dec`` starts at the mean activation and the last 20% of
    steps decay the learning rate linearly to 0.
    """
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training import sae_trainer

    from saets_utils.progress import console_bars

    steps = train.training_tokens // train.batch_size_tokens
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=train.d_sae, k=train.k, device=device),
        model_name=model_name or model.cfg.model_name,
        hook_name=hook_name,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=train.context_size,
        # Pre-tokenised rows pass through sae_lens unchanged; these say so explicitly.
        prepend_bos=False,
        sequence_separator_token=None,
        disable_concat_sequences=True,
        exclude_special_tokens=[bos],
        training_tokens=train.training_tokens,
        train_batch_size_tokens=train.batch_size_tokens,
        n_batches_in_buffer=train.n_batches_in_buffer,
        store_batch_size_prompts=STORE_BATCH_PROMPTS,
        lr=train.lr,
        lr_decay_steps=steps // 5,
        device=device,
        seed=seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(out_dir),
        verbose=False,
        model_from_pretrained_kwargs={},
    )
    torch.manual_seed(seed)  # SAE init and the activation mixing buffer use the global RNG
    sae = TrainingSAE.from_dict(cfg.get_training_sae_cfg_dict())
    with torch.no_grad():
        # sae_lens starts b_dec at 0; the residual mean is far from 0 and Adam moves b_dec by ~lr
        # per step, so short runs stayed worse than predicting the mean (FVU 0.89 vs 0.50 at 100k tokens).
        sae.b_dec.copy_(mean_activation(model, tokens[:32], hook_name, bos).to(sae.b_dec))
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
        # sae_lens draws its bar with tqdm.auto (a widget under papermill, invisible in `make demo`)
        # and moves it every 100 steps only; here it is a console bar that moves every step.
        with console_bars(sae_trainer, unit="tok"), patch.object(sae_trainer.SAETrainer, "_update_pbar", _step_bar):
            LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model, override_sae=sae).run()


def _step_bar(trainer: Any, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
    """Replaces ``SAETrainer._update_pbar``: advance by one step's tokens, show the losses every 10 steps."""
    pbar.update(trainer.cfg.train_batch_size_samples)
    if trainer.n_training_steps % 10 == 0:
        losses = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in step_output.losses.items()}
        pbar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in losses.items()), refresh=False)


@torch.no_grad()
def mean_activation(model: HookedTransformer, tokens: torch.Tensor, hook_name: str, bos: int) -> torch.Tensor:
    """Mean activation [d_model] at ``hook_name`` over ``tokens`` [n, seq], start-token positions excluded."""
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    _, cache = model.run_with_cache(
        tokens,
        names_filter=[hook_name],
        prepend_bos=False,
        stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name),
    )
    return cache[hook_name][tokens != bos].float().mean(0)


def train_or_load_sae(
    run: RunConfig, sae_cfg: SAEConfig, device: str = "cpu", model: HookedTransformer | None = None
) -> SAE:
    """The cached trained SAE for ``(run, sae_cfg)``, training and caching it on first use.

    Loads ``model`` (``run.model``) only when training. Returns an eval-mode inference TopK SAE.
    """
    from sae_lens import SAE

    final = sae_cache_path(run, sae_cfg)
    trained = False
    if not (final / "cfg.json").is_file():
        with assets.asset_lock(final):  # concurrent runs train it once; the others wait, then load it
            if not (final / "cfg.json").is_file():
                model = model if model is not None else loading.load_model(run.model, device)
                _train_into_cache(run, sae_cfg, model, final, device)
                trained = True
    if model is not None and not trained:
        _check_fingerprint(final, model)
    sae = SAE.load_from_disk(final, device=device)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def _train_into_cache(run: RunConfig, sae_cfg: SAEConfig, model: HookedTransformer, final: Path, device: str) -> None:
    from sae_lens import SAE

    from saets_utils.progress import progress

    train = sae_cfg.train
    # Stages on the console (tokenise, train, quality check); training draws its own bar in tokens.
    stages = progress(total=3, desc=f"SAE {sae_cfg.hook_name} (tokenise, train, check)", unit="stage")
    bos = loading.bos_id(model, run.model)
    train_docs, held_docs = split_documents(loading.load_texts(run.text), run.seed)
    # Enough rows for the budget plus what the activation buffer holds back at the end.
    n_rows = (
        math.ceil(train.training_tokens / (train.context_size - 2) * 1.1)
        + 2 * STORE_BATCH_PROMPTS
        + train.n_batches_in_buffer
    )
    tokens = _chunks(model, train_docs, train.context_size, n_rows, bos, run.seed)
    held = _chunks(model, held_docs, train.context_size, QUALITY_CHUNKS, bos, run.seed + 1)[:QUALITY_CHUNKS]
    stages.update(1)

    tmp = assets._atomic_dir(final)
    try:
        t0 = time.perf_counter()
        train_sae(
            model,
            tokens,
            sae_cfg.hook_name,
            train,
            bos=bos,
            seed=run.seed,
            out_dir=tmp,
            device=device,
            model_name=run.model.name,
        )
        train_s = time.perf_counter() - t0
        stages.update(1)
        sae = SAE.load_from_disk(tmp, device=device).eval()
        t0 = time.perf_counter()
        quality = sae_quality(
            model, sae, sae_cfg.hook_name, held.to(device), include_first_position=False, exclude_tokens=[bos]
        )
        quality.update(
            train_seconds=round(train_s, 1),
            quality_seconds=round(time.perf_counter() - t0, 1),
            train_tokens=train.training_tokens,
            train_rows_available=int(tokens.shape[0]),
            heldout_documents=len(held_docs),
            hook_name=sae_cfg.hook_name,
            bos_token_id=bos,
            seed=run.seed,
            train=train.model_dump(),
            model=run.model.model_dump(),
            text=run.text.model_dump(),
            device=device,
            torch_threads=torch.get_num_threads(),
            dead_fraction_train=_dead_in_training(tmp),
            position_policy="start-token positions (0 and separators) excluded from training and metrics",
        )
        (tmp / "quality.json").write_text(json.dumps(quality, indent=2))
        stages.update(1)
        (tmp / "meta.json").write_text(
            json.dumps(
                {"key": final.name, "model_fingerprint": model_fingerprint(model), "recipe": RECIPE_VERSION}, indent=2
            )
        )
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same SAE first; keep theirs
            if not (final / "cfg.json").is_file():
                raise
    finally:
        stages.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dead_in_training(folder: Path) -> float | None:
    """Fraction of features that never fired in sae_lens's last sparsity window (whole short runs)."""
    path = folder / "sparsity.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    log_sparsity = load_file(str(path))["sparsity"]
    return float((log_sparsity <= -9.99).float().mean())


@torch.no_grad()
def sae_quality(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: torch.Tensor,
    *,
    include_first_position: bool = True,
    exclude_tokens: Sequence[int] = (),
    batch_size: int = 8,
) -> dict[str, Any]:
    """Reconstruction and downstream quality of ``sae`` at ``hook_name`` on ``tokens`` [n, seq].

    Scored positions: all, minus position 0 unless ``include_first_position``, minus tokens in
    ``exclude_tokens``; only those are spliced (SAE reconstruction) or zero-ablated. Returns FVU,
    mean L0, dead fraction (never active here), CE clean / spliced / zero-ablated, CE recovered
    (None where undefined, e.g. zero-ablation does not raise the loss).
    """
    sums = {"sq_err": 0.0, "sq": 0.0, "l0": 0.0, "n": 0, "ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "n_pred": 0}
    x_sum = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    excl = torch.tensor(list(exclude_tokens), dtype=torch.long, device=tokens.device)
    for start in range(0, tokens.shape[0], batch_size):
        toks = tokens[start : start + batch_size]
        mask = ~torch.isin(toks, excl)
        if not include_first_position:
            mask[:, 0] = False

        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            feats = sae.encode(act.to(sae.dtype))
            recon = sae.decode(feats).to(act.dtype)
            x, r, f = act[mask].double().cpu(), recon[mask].double().cpu(), feats[mask].cpu()  # noqa: B023 - runs within this batch
            sums["sq_err"] += float((x - r).pow(2).sum())
            sums["sq"] += float(x.pow(2).sum())
            x_sum.add_(x.sum(0))
            sums["l0"] += float((f > 0).sum())
            sums["n"] += int(x.shape[0])
            fired.logical_or_((f > 0).any(0))
            return torch.where(mask[..., None], recon, act)  # noqa: B023 - runs within this batch

        def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.where(mask[..., None], torch.zeros_like(act), act)  # noqa: B023 - runs within this batch

        for name, hooks in (("ce_clean", []), ("ce_sae", [(hook_name, splice)]), ("ce_zero", [(hook_name, zero)])):
            logits = model.run_with_hooks(toks, fwd_hooks=list(hooks), prepend_bos=False)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            sums[name] += float(-logp.gather(-1, toks[:, 1:, None]).sum())
        sums["n_pred"] += toks[:, 1:].numel()
    n = max(sums["n"], 1)
    total_var = sums["sq"] - float(x_sum.pow(2).sum()) / n
    ce = {k: sums[k] / max(sums["n_pred"], 1) for k in ("ce_clean", "ce_sae", "ce_zero")}
    denom = ce["ce_zero"] - ce["ce_clean"]
    return {
        "fvu": sums["sq_err"] / total_var if total_var > 0 else None,
        "mse_per_token": sums["sq_err"] / n,
        "l0": sums["l0"] / n,
        "dead_fraction": float((~fired).float().mean()),
        **ce,
        "ce_recovered": (ce["ce_zero"] - ce["ce_sae"]) / denom if denom > 0 else None,
        "n_tokens_scored": sums["n"],
        "n_sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "include_first_position": include_first_position,
        "exclude_tokens": list(exclude_tokens),
    }


def load_sae_quality(run: RunConfig) -> dict[str, Any] | None:
    """``quality.json`` of the run's trained SAE, or None when it is not trained (or not ``train``)."""
    if run.sae.source != "train":
        return None
    path = sae_cache_path(run) / "quality.json"
    return json.loads(path.read_text()) if path.is_file() else None
