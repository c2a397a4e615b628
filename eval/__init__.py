"""GSM8K and MATH evaluation: tasks (data + prompt + extract + score), generation backends, reports.

The command line is `python -m pipeline eval` (pipeline/evaluate.py); everything here is importable without torch.
"""
