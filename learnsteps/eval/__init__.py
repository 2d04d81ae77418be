"""Evaluation: the eval.py grid of runs (teacher x solver x grid x NFE, schedules, students) and its reports."""
