"""Notebooks 04 and 05: figures, the effect explorer, widgets, and the papermill pipeline."""
