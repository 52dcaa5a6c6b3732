"""Training methods, one object each, registered by name for `mmret train --method`.

`base` defines what a method is (`Method`, `MethodConfig`, the registry); `features` is what the
methods over cached frozen-tower outputs share (`heads`, `bridge`, `zeroshot`), `towers` the
methods that adapt the pretrained towers and run them every step (lora, prefix, adapter, full),
`scratch` a whole small CLIP trained from nothing. Importing this package registers them, in
the order `--help` lists them.
"""

from mmret.methods.base import (
    METHODS, SIDES, FeatureDims, FrozenPart, Inputs, Method, MethodConfig, config_for, get_method, method_help,
    method_settings, owners, register_method,
)
from mmret.methods import heads  # noqa: F401, I001
from mmret.methods import bridge  # noqa: F401
from mmret.methods import towers  # noqa: F401
from mmret.methods import scratch  # noqa: F401
from mmret.methods import zeroshot  # noqa: F401

__all__ = ["METHODS", "SIDES", "FeatureDims", "FrozenPart", "Inputs", "Method", "MethodConfig", "config_for",
           "get_method", "method_help", "method_settings", "owners", "register_method"]
