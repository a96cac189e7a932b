"""Load the SAE named by a :class:`RunConfig` (or by ``effects.vectors.sae``), and check it fits the model.

SAE paths: trained by the project (cached, :mod:`saets_utils.models.sae_training`), ``sae_lens``
pretrained (hub), a Gemma Scope ``params.npz`` (hub via huggingface_hub, or a local file), a local
sae_lens folder, or a seeded tiny SAE for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saets_utils.config import ConfigError, RunConfig, SAEConfig
from saets_utils.models.sae_training import train_or_load_sae
from saets_utils.models.tiny import tiny_sae

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def validate_sae(run: RunConfig, model: HookedTransformer, sae: SAE) -> None:
    """Fail early if the SAE width does not match the model's residual width."""
    if sae.cfg.d_in != model.cfg.d_model:
        raise ConfigError(
            f"SAE {run.sae.key!r} has d_in {sae.cfg.d_in} but {model.cfg.model_name} has d_model "
            f"{model.cfg.d_model}; pick an SAE trained on this model"
        )


def sae_from_gemma_scope_npz(path: str | Path, device: str = "cpu", hook_name: str | None = None) -> SAE:
    """A sae_lens JumpReLU SAE from a Gemma Scope ``params.npz`` (W_enc, W_dec, b_enc, b_dec, threshold)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    with np.load(path) as npz:
        missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(npz.files)
        if missing:
            raise ConfigError(f"{path} is not a Gemma Scope params.npz: missing {sorted(missing)}")
        params = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    d_in, d_sae = params["W_enc"].shape
    # Gemma Scope encodes ``x @ W_enc + b_enc`` (no ``x - b_dec``), as sae_lens's own Gemma Scope loader.
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, device=device, apply_b_dec_to_input=False))
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    sae.load_state_dict({k: v for k, v in params.items()}, strict=True)
    return sae.to(device)


def sae_source_path(sae_cfg: SAEConfig) -> Path | None:
    """The folder (``local``) or ``params.npz`` (``gemma_scope_npz``) an SAE is read from, resolved as
    :func:`load_sae_from` resolves it; None for SAEs not read from a path of the params (trained,
    tiny, Hub)."""
    if sae_cfg.path is None:
        return None
    if sae_cfg.source == "local":
        return Path(sae_cfg.path)
    if sae_cfg.source == "gemma_scope_npz":
        from saets_utils.config import REPO_ROOT

        path = Path(sae_cfg.path)
        return path if path.is_absolute() else REPO_ROOT / path  # params paths: from the repo root
    return None


def load_sae(run: RunConfig, device: str = "cpu", model: HookedTransformer | None = None) -> SAE:
    """The run's SAE (sae_lens object, eval mode, no grads) on ``device``; ``model`` (already loaded)
    is reused if the SAE must first be trained."""
    return load_sae_from(run.sae, run, device, model)


def load_sae_from(
    sae_cfg: SAEConfig, run: RunConfig, device: str = "cpu", model: HookedTransformer | None = None
) -> SAE:
    """Load any configured SAE (the run's, or another one named in ``effects.vectors.sae``)."""
    from sae_lens import SAE

    if sae_cfg.source == "train":
        sae = train_or_load_sae(run, sae_cfg, device=device, model=model)
    elif sae_cfg.source == "tiny":
        sae = tiny_sae(d_sae=sae_cfg.train.d_sae, k=sae_cfg.train.k, hook_name=sae_cfg.hook_name).to(device)
    elif sae_cfg.source == "local":
        folder = sae_source_path(sae_cfg)
        if folder is None or not folder.is_dir():
            raise ConfigError(f"sae.path {sae_cfg.path!r} is not a folder saved by sae_lens")
        sae = SAE.load_from_disk(str(folder), device=device)
    elif sae_cfg.source == "gemma_scope_npz":
        npz = sae_source_path(sae_cfg)
        if npz is None:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(sae_cfg.repo_id or "", f"{sae_cfg.sae_id}/params.npz")
        elif not npz.is_file():
            raise ConfigError(f"sae.path {sae_cfg.path!r} does not exist; point it at a Gemma Scope params.npz")
        else:
            path = str(npz)
        sae = sae_from_gemma_scope_npz(path, device=device, hook_name=sae_cfg.hook_name)
    else:
        sae = SAE.from_pretrained(sae_cfg.release or "", sae_cfg.sae_id or "", device=device)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae
