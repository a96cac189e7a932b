"""Notebook 03: steering vectors per task and method, the scale sweep, judging, scoring, targeting."""
