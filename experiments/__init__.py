"""Experiments across runs: ablations of model variants trained on the same data (launch/ablate.py)."""
