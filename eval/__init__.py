"""Evaluation and sampling of a trained run: `python -m eval`, `python -m eval.sample`."""
