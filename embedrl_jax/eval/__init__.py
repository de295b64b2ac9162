"""MMEB-V2 and UVRB evaluation on local copies of the data (see `embedrl eval --help`)."""
from .metrics import KS, SCORE_KEYS, query_metrics, task_scores  # noqa: F401
from .tasks import TASKS, tasks_for  # noqa: F401
