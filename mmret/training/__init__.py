"""Training a run: `session` (everything a run needs, and resuming it), `step` (one optimizer step,
the schedule, the precision), `loop` (epochs, validation, checkpoints, early stopping), the loss
on one process or many and its large-batch and sharpness-aware forms (`losses`, `gradcache`,
`sam`), the processes a run trains in (`world`, and `distributed` to run and launch them), the
learning curve (`plots`) and `--dry-run` (`dry_run`)."""

from mmret.training.distributed import train_on_processes
from mmret.training.dry_run import DryRun, dry_run
from mmret.training.loop import SELECT_METRIC, RunResult, TrainingInterrupted, resume, train
from mmret.training.session import LoopState, Session, init_heads, setup
from mmret.training.world import World

__all__ = ["DryRun", "LoopState", "RunResult", "SELECT_METRIC", "Session", "TrainingInterrupted", "World",
           "dry_run", "init_heads", "resume", "setup", "train", "train_on_processes"]
