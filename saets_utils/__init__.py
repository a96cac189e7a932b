"""saets: SAE-Targeted Steering of language models, as a notebook-driven research repo.

The package mirrors the pipeline, one subpackage per stage (lower layers never import higher ones):
``models`` (LM, SAE, SAE training, assets), ``steering`` (hooks, generation, task files),
``effects`` (notebook 01), ``approximator`` (02), ``judges`` and ``evaluation`` (03), ``report``
(04, 05 and the papermill pipeline); ``config``, ``registry`` (the steering methods), ``session``
and ``manifest`` at the top.

The names the notebooks use are exported here. Importing the package does no work and opens no
network client: each name's module is imported on first access.

Example:
    >>> from saets_utils import start_run, load_model_and_sae
    >>> run, device = start_run("params/demo.yaml")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Exported name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "load_config": "saets_utils.config",
    "RunConfig": "saets_utils.config",
    "METHODS": "saets_utils.registry",
    "start_run": "saets_utils.session",
    "load_model_and_sae": "saets_utils.session",
    "begin_step": "saets_utils.manifest",
    "record_step": "saets_utils.manifest",
    "load_sae": "saets_utils.models.sae_loading",
    "load_sae_quality": "saets_utils.models.sae_training",
    "run_effects": "saets_utils.effects.runner",
    "load_effects": "saets_utils.effects.store",
    "training_effects": "saets_utils.approximator.published",
    "train_approximator": "saets_utils.approximator.training",
    "metrics_table": "saets_utils.approximator.training",
    "verdict": "saets_utils.approximator.training",
    "run_study": "saets_utils.approximator.design_study",
    "evaluate_run": "saets_utils.evaluation.evaluate",
    "run_battles": "saets_utils.evaluation.battles",
    "load_context": "saets_utils.evaluation.task_vectors",
    "paper_style_table": "saets_utils.evaluation.scoring",
    "compare_with_published": "saets_utils.evaluation.scoring",
    "effects_overview": "saets_utils.report.explore",
    "load_run_effects": "saets_utils.report.explore",
    "make_all_figures": "saets_utils.report.figures",
    "feature_stats": "saets_utils.report.features",
    "plot_training_curve": "saets_utils.report.plots",
    "plot_approximator_diagnostics": "saets_utils.report.plots",
    "plot_learning_curve": "saets_utils.report.plots",
    "EffectExplorer": "saets_utils.report.widgets",
    "SteeringPlayground": "saets_utils.report.widgets",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from saets_utils.approximator.design_study import run_study
    from saets_utils.approximator.published import training_effects
    from saets_utils.approximator.training import metrics_table, train_approximator, verdict
    from saets_utils.config import RunConfig, load_config
    from saets_utils.effects.runner import run_effects
    from saets_utils.effects.store import load_effects
    from saets_utils.evaluation.battles import run_battles
    from saets_utils.evaluation.evaluate import evaluate_run
    from saets_utils.evaluation.scoring import compare_with_published, paper_style_table
    from saets_utils.evaluation.task_vectors import load_context
    from saets_utils.manifest import begin_step, record_step
    from saets_utils.models.sae_loading import load_sae
    from saets_utils.models.sae_training import load_sae_quality
    from saets_utils.registry import METHODS
    from saets_utils.report.explore import effects_overview, load_run_effects
    from saets_utils.report.features import feature_stats
    from saets_utils.report.figures import make_all_figures
    from saets_utils.report.plots import plot_approximator_diagnostics, plot_learning_curve, plot_training_curve
    from saets_utils.report.widgets import EffectExplorer, SteeringPlayground
    from saets_utils.session import load_model_and_sae, start_run


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
