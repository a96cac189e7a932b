"""The method names and their colours: one name and one colour per method in code, files and plots."""

METHODS: tuple[str, ...] = ("CAA", "SAE", "SAE-TS", "pinverse", "rotation", "FGAA", "prompt")
# Matplotlib tab10 colours.
METHOD_COLORS: dict[str, str] = {
    "CAA": "#1f77b4", "SAE": "#ff7f0e", "SAE-TS": "#d62728", "pinverse": "#9467bd",
    "rotation": "#2ca02c", "FGAA": "#8c564b", "prompt": "#7f7f7f",
}
