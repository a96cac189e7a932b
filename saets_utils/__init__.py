"""saets: SAE-Targeted Steering of language models, as a notebook-driven research repo.

Importing the package does no work and opens no network client; each step lives in a module:
``config`` (params), ``assets`` (embedded model and corpus), ``loading`` (model, SAE, text),
``steering`` (hooks, generation), ``calibration`` (scale per vector), ``effects`` (+ ``workers``),
``approximator``, ``methods``, ``judges``, ``evaluate``, ``plots``, ``widgets``, ``manifest``.
"""

__version__ = "0.1.0"
