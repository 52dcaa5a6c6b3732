"""Training methods, one object each, registered by name for `mmret train --method`.

`base` defines what a method is (`Method`, `MethodConfig`, the registry); `features` is what the
methods over cached frozen-tower outputs share (`heads`, `bridge`, `zeroshot`), `towers` the
methods that adapt the pretrained towers and run them every step (lora, prefix, adapter, full),
`scratch` a whole small CLIP trained from nothing; `catalog` names the built-in ones, which are
imported when a method is first asked for (`get_method`), in the order `--help` lists them.
"""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "FeatureDims": "mmret.methods.base",
    "FrozenPart": "mmret.methods.base",
    "Inputs": "mmret.methods.base",
    "METHODS": "mmret.methods.base",
    "Method": "mmret.methods.base",
    "MethodConfig": "mmret.methods.config",
    "SIDES": "mmret.methods.base",
    "config_for": "mmret.methods.base",
    "get_method": "mmret.methods.base",
    "method_help": "mmret.methods.catalog",
    "method_settings": "mmret.methods.base",
    "owners": "mmret.methods.base",
    "registry": "mmret.methods.base",
    "register_method": "mmret.methods.base",
})
__all__ = sorted(["FeatureDims", "FrozenPart", "Inputs", "METHODS", "Method", "MethodConfig", "SIDES", "config_for", "get_method", "method_help", "method_settings", "owners", "register_method", "registry"])
