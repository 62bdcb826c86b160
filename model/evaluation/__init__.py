"""Evaluation: `predict` runs the engine over cases; everything else is pure and runs on CPU."""
