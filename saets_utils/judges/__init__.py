"""Judges of generated text: an OpenAI-compatible LLM or the offline judge, with a shared cache."""
