"""Runnable examples: ``python -m examples.askd_toy``."""
