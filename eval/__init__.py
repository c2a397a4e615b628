"""GSM8K and MATH evaluation: tasks (data + prompt + extract + score), generation backends, reports.

The command line is `python -m pipeline eval` (pipeline/evaluate.py); everything here is importable without torch.
"""

# Load the task registry first: tasks.py adds the suite's tasks from math_tasks.py, which builds on tasks.py.
from eval import tasks as _tasks  # noqa: E402,F401
