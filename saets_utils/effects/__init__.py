"""Notebook 01: calibrate a scale per vector, measure its effect on SAE features, run and store it."""
