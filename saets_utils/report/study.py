"""The design study with its figure, in one command:
``python -m saets_utils.report.study params/<run>.yaml`` takes the arguments of
``python -m saets_utils.approximator.design_study`` (which writes ``study/reliability.json`` and
``study/learning_curve.csv``), runs it, then draws ``study/learning_curve.png``. The approximator
layer computes the study; drawing it belongs here, so that layer never imports the report.
"""

from __future__ import annotations

from saets_utils.approximator import design_study
from saets_utils.config import load_config
from saets_utils.report.figures import study_figure


def main(argv: list[str] | None = None) -> None:
    args = design_study.parse_args(argv)
    design_study.main(argv)
    if not args.compare:
        for params in args.params:
            print(f"figure: {study_figure(load_config(params))}")


if __name__ == "__main__":
    main()
