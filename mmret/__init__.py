"""mmret: image-text and audio-text retrieval you can train on one consumer GPU or a laptop CPU.

The Python API (`mmret.api`): `mmret.load(run)` gives a trained run as a model to embed with and search
with, `mmret.load_zero_shot(preset)` a pretrained CLIP or CLAP; both are imported on first use, so
`import mmret` (and `mmret --help`) stay cheap.
"""

from mmret.common.lazy import lazy_names
from mmret.common.version import __version__

__getattr__ = lazy_names(globals(), {"load": "mmret.api", "load_zero_shot": "mmret.api", "Model": "mmret.api",
                                     "MmretError": "mmret.errors"})
__all__ = ["Model", "MmretError", "__version__", "load", "load_zero_shot"]
