"""Notebook 02: the effect approximator, its fits, held-out metrics, training and the design study."""
