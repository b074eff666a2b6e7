"""Grading responses against a dataset's reference answers: graders, the worker pool, pass@k."""
