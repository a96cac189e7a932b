"""The steering methods, defined once: name, colour, whether the vector needs the effect
approximator, which target features it is built from, and the paper's name for it.

Everything that lists methods reads this table: the config (which methods a run may evaluate),
the vector builders, the evaluation (which methods need 02's approximator), targeting, the plots
(order and colours) and the published numbers (the paper's column names). Each method with a
vector has exactly one builder, registered in :mod:`saets_utils.evaluation.task_vectors` with
``@builds("<name>")``; this module imports nothing of the package, so every layer may read it.

Adding a method: one entry here, and its builder (a pure vector function in
``evaluation/methods.py``, registered in ``evaluation/task_vectors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    """One steering method.

    ``targets``: what its vector is built from. ``None``: no SAE features (CAA: the task's
    contrastive examples; prompt: the task's instruction). ``"task"``: the task's target features,
    listed in its file for this SAE or discovered from its examples. ``"contrast"``: its own
    target, the top features of the examples' SAE contrast (FGAA's target).
    ``vector``: False for a method that steers without a vector, by prepending the task's
    instruction to the prompt; it is evaluated once, at scale 0 (the ``prompt`` baseline).
    ``paper_name``: the method's column in the paper's results table, None if the paper did not run it.
    ``default``: evaluated when a run's ``eval.methods`` is not given (controls are opt-in).
    """

    name: str
    color: str
    needs_approximator: bool = False
    targets: Literal["task", "contrast"] | None = None
    vector: bool = True
    paper_name: str | None = None
    default: bool = True

    @property
    def from_targets(self) -> bool:
        """Built from target SAE features (any list of ``(feature id, weight)``, e.g. custom ones)."""
        return self.targets is not None


# Project order (tables, plots, legends); matplotlib tab10 colours.
REGISTRY: tuple[Method, ...] = (
    Method("CAA", "#1f77b4", paper_name="CAA"),
    Method("SAE", "#ff7f0e", targets="task", paper_name="SAE"),
    Method("SAE-TS", "#d62728", needs_approximator=True, targets="task", paper_name="SAE-TS"),
    Method("pinverse", "#9467bd", needs_approximator=True, targets="task", paper_name="Pinv"),
    Method("rotation", "#2ca02c", needs_approximator=True, targets="task", paper_name="Rotation"),
    Method("FGAA", "#8c564b", needs_approximator=True, targets="contrast"),
    Method("prompt", "#7f7f7f", vector=False),
    # Control: a seeded isotropic unit vector per task (no SAE, no approximator): what any method
    # must beat to claim it steers toward its target rather than merely steering.
    Method("random", "#bcbd22", default=False),
    # SAE-TS without the bias correction (lambda = 0 whatever approximator.sae_ts_lambda says): the
    # variant the diagnosis (docs/science.md) found to lose least to the decoder row; opt-in.
    Method("SAE-TS-nobias", "#e377c2", needs_approximator=True, targets="task", default=False),
)

METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
DEFAULT_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.default)
METHOD_COLORS: dict[str, str] = {m.name: m.color for m in REGISTRY}
_BY_NAME: dict[str, Method] = {m.name: m for m in REGISTRY}


def get_method(name: str) -> Method:
    """The registry entry of ``name``; ValueError naming the known methods for any other name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of {list(METHODS)}") from None
