"""Inference engines behind the `Engine` protocol (see base.py)."""
