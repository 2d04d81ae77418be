"""DSNO: a one-pass student that maps noise to the teacher's whole trajectory (Zheng et al., ICML 2023), on the
teacher's own network. `load_student(dir)` gives it back; `student.sample(noise, cond)` is one pass."""
from .student import DSNOStudent, StudentError, load_student

__all__ = ["DSNOStudent", "StudentError", "load_student"]
