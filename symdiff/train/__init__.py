"""Training: DeepSpeed engine set-up, EMA, checkpoints, the loop and process launch.

Exit codes of `symdiff train`: 0 done, 75 stopped by SIGUSR1/SIGTERM after a complete checkpoint (requeue),
3 too many non-finite steps in a row, 1 a user error (bad config/checkpoint).
"""
from symdiff.train.launch import EXIT_NONFINITE, EXIT_REQUEUE

__all__ = ["EXIT_NONFINITE", "EXIT_REQUEUE"]
