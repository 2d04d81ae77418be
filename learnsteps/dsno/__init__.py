"""DSNO: a one-pass student that maps noise to the teacher's whole trajectory (Zheng et al., ICML 2023)."""
