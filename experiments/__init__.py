"""Experiments: configs (experiments/configs/*.py) and the drivers that sweep, fit and plot."""
