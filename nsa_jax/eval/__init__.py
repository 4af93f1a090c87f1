"""Benchmark evaluation: the tasks VideoNSA reports (lmms-eval formats), a runner, scores."""

from nsa_jax.eval.runner import Predict, VideoError, run_eval
from nsa_jax.eval.tasks import TASK_NAMES, Sample, Scored, Scores, Task, get_task, load_samples

__all__ = [
    "TASK_NAMES",
    "Predict",
    "Sample",
    "Scored",
    "Scores",
    "Task",
    "VideoError",
    "get_task",
    "load_samples",
    "run_eval",
]
