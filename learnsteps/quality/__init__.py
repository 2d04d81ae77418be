"""What the methods and eval.py share to judge samples: the digits feature networks (features.py), FID, KID,
precision and recall through torch-fidelity (metrics.py), and the per-sample distances LD3 and DSNO train with
(losses.py)."""
