"""Steering through a hook, seeded generation, and the steering goals (task files)."""
