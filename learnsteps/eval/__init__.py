"""Evaluation: feature extractors registered with torch-fidelity, FID/KID, and the eval.py grid of runs."""
