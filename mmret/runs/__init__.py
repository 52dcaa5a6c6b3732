"""What a run is on disk: its configuration (`config`), its folder under the runs root and the
`runs/latest` link (`folders`), and its safetensors checkpoints (`checkpoint`). Training writes
these; evaluation, search and memory probing read them."""

from mmret.runs.config import RunConfig, with_overrides
from mmret.runs.folders import checkpoint_path, create_run_dir, load_run_config, point_latest, resolve_run

__all__ = ["RunConfig", "checkpoint_path", "create_run_dir", "load_run_config", "point_latest", "resolve_run",
           "with_overrides"]
