"""Held-out evaluation: generate, grade, report."""
