"""Export a run's effects and approximator in the reference's published format, so anyone can load
them back as the reference's files are loaded (``approximator.published``, docs/published.md).

``python -m saets_utils.report.export params/<run>.yaml --out DIR`` after 01 and 02 writes to ``DIR``:

- ``effects_<run>.pt``: ``torch.save``d ``{features [n, d_model] (unit), effects [n, d_sae]}``, the rows
  with usable effects; ``effects_<run>.safetensors``: the same plus ``vector_ids`` and ``scales``;
- ``adapter_<run>_layer_<L>.pt``: ``{W [d_model, d_sae], b [d_sae]}`` (prediction ``x @ W + b``);
  ``adapter_<run>_layer_<L>.safetensors``: ``W``, ``b``, ``correction`` and, if 02 saved it, ``rotation``;
- ``R_dec_<run>_layer_<L>.pt`` (when 02 saved the rotation; applied as ``R @ d``) and
  ``correction_bias_<run>_layer_<L>.pt`` (``norm(W @ b)``);
- ``README.md``: a dataset card with the model, SAE, settings and held-out metrics, and the params
  that load the files back.

Upload with ``huggingface-cli upload <you>/<repo> DIR --repo-type dataset``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator, load_rotation
from saets_utils.config import RunConfig, load_config
from saets_utils.effects.store import Effects, load_effects

METRIC_KEYS = (
    "fit",
    "n_train",
    "n_val",
    "mse",
    "mse_mean",
    "mse_zero",
    "r2",
    "r2_ci_low",
    "r2_ci_high",
    "noise_ceiling",
    "cosine_mean",
)


def export_names(run: RunConfig) -> dict[str, str]:
    """File names of the export, after the reference's (``effects_2b.pt``, ``adapter_2b_layer_12.pt``, ...)."""
    tag, layer = run.name, run.sae.layer
    return {
        "effects": f"effects_{tag}.pt",
        "effects_st": f"effects_{tag}.safetensors",
        "adapter": f"adapter_{tag}_layer_{layer}.pt",
        "adapter_st": f"adapter_{tag}_layer_{layer}.safetensors",
        "rotation": f"R_dec_{tag}_layer_{layer}.pt",
        "correction_bias": f"correction_bias_{tag}_layer_{layer}.pt",
    }


def _c(t: Tensor) -> Tensor:
    return t.detach().float().cpu().contiguous()


def export_artifacts(
    run: RunConfig,
    effects: Effects,
    approx: EffectApproximator,
    rotation: Tensor | None,
    *,
    metrics: dict[str, Any],
    out: str | Path,
) -> list[Path]:
    """Write the files of the module docstring to ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = export_names(run)
    ok = effects.valid
    X, Y = _c(effects.vectors[ok]), _c(effects.effects[ok])
    written: list[Path] = []

    def pt(obj: Any, key: str) -> None:
        torch.save(obj, out / names[key])
        written.append(out / names[key])

    def st(tensors: dict[str, Tensor], key: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / names[key]), metadata={"run": run.name})
        written.append(out / names[key])

    pt({"features": X, "effects": Y}, "effects")
    st(
        {"features": X, "effects": Y, "vector_ids": effects.vector_ids[ok].long(), "scales": _c(effects.scales[ok])},
        "effects_st",
    )
    W, b, corr = _c(approx.W), _c(approx.b), _c(approx.correction)
    pt({"W": W, "b": b}, "adapter")
    st(
        {"W": W, "b": b, "correction": corr, **({"rotation": _c(rotation)} if rotation is not None else {})},
        "adapter_st",
    )
    if rotation is not None:
        pt(_c(rotation), "rotation")
    pt(corr, "correction_bias")
    (out / "README.md").write_text(
        model_card(run, effects, metrics, n_dropped=int((~ok).sum()), has_rotation=rotation is not None)
    )
    written.append(out / "README.md")
    return written


def model_card(run: RunConfig, effects: Effects, metrics: dict[str, Any], *, n_dropped: int, has_rotation: bool) -> str:
    """The README card of an export: what was measured and fitted, how well, and how to load it."""
    names = export_names(run)
    n, d_model = effects.vectors.shape
    d_sae = effects.effects.shape[1]
    rows = "\n".join(f"| {k} | {metrics[k]} |" for k in METRIC_KEYS if metrics.get(k) is not None)
    files = {k: v for k, v in names.items() if k not in ("effects_st", "adapter_st")}
    if not has_rotation:
        files.pop("rotation")
    load = "\n".join(f"    {k}: {{repo_id: <you>/<repo>, repo_type: dataset, filename: {v}}}" for k, v in files.items())
    settings = json.dumps(
        {"effects": run.effects.model_dump(), "approximator": run.approximator.model_dump(exclude={"published"})},
        indent=1,
        default=str,
    )
    return f"""---
tags: [saets, sae-targeted-steering, steering-vectors, sparse-autoencoders]
---
# saets run `{run.name}`: steering-vector effects and effect approximator

Exported by `python -m saets_utils.report.export` in the format of the SAE-TS reference's
`schalnev/sae-ts-effects` (docs/published.md in the saets repository).

- **Model**: `{run.model.name}` ({run.model.source}, {run.model.dtype}); hook `{run.sae.hook_name}`
- **SAE**: `{run.sae.key}` (d_sae {d_sae}; d_model {d_model})
- **Effects**: {int(effects.valid.sum())} of {n} steering vectors ({run.effects.vectors.source}), {n_dropped} without
  usable effects left out; each effect is the mean SAE activation of steered rollouts minus the unsteered
  mean, at a scale calibrated to the loss target.
- **Approximator**: `effect = x @ W + b`, `x` a unit steering vector; fit `{run.approximator.fit}`.

## Files

| file | content |
|---|---|
| `{names["effects"]}` | `torch.save`d dict: `features` [n, d_model] (unit), `effects` [n, d_sae] |
| `{names["effects_st"]}` | the same, plus `vector_ids` and `scales` (safetensors) |
| `{names["adapter"]}` | state dict `W` [d_model, d_sae], `b` [d_sae] |
| `{names["adapter_st"]}` | `W`, `b`, `correction`{", `rotation`" if has_rotation else ""} (safetensors) |
{f"| `{names['rotation']}` | rotation `R` [d_model, d_model], applied as `R @ d` to a decoder direction `d` |" + chr(10) if has_rotation else ""}| `{names["correction_bias"]}` | `norm(W @ b)` [d_model] |

## Held-out metrics (notebook 02)

| metric | value |
|---|---|
{rows}

## Load it back

In a saets params file:

```yaml
approximator:
  effects_source: published   # 02 trains on these effects
  adapter_source: published   # 03 uses this adapter
  published:
{load}
```

Read `.pt` files with `torch.load(path, weights_only=True)`.

## Settings

```json
{settings}
```
"""


def export_run(run: RunConfig, out: str | Path) -> list[Path]:
    """Export ``results/<run>/`` (01's effects, 02's approximator and metrics) to ``out``."""
    d = run.paths
    path = d.approximator
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run notebooks/02_train.ipynb first")
    metrics_file = d.approximator_metrics
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return export_artifacts(
        run, load_effects(d.root), EffectApproximator.load(path), load_rotation(path), metrics=metrics, out=out
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params_file")
    ap.add_argument("--out", required=True, help="folder to write the files and README.md to")
    a = ap.parse_args(argv)
    for p in export_run(load_config(a.params_file), a.out):
        print(p)


if __name__ == "__main__":
    main()
