"""Training methods, one object each, registered by name for `mmret train --method`.

`config` holds each built-in method's config dataclass (the settings it shares with every method,
its own, and their help: the command line's options come from them) and the LoRA recipes; `base`
defines what a method is (`Method`); `registry` is the one table of methods (`register_method`
refuses a taken name); `features` is what the methods over cached frozen-tower outputs share
(`heads`, `bridge`, `zeroshot`), `towers` the methods that adapt the pretrained towers and run them
every step (lora, prefix, adapter, full), `scratch` a whole small CLIP trained from nothing;
`catalog`, above them all, names the built-in ones, which are imported when a method is first asked
for (`get_method`), in the order `--help` lists them.
"""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "FeatureDims": "mmret.methods.base",
    "FrozenPart": "mmret.methods.base",
    "Inputs": "mmret.methods.base",
    "METHODS": "mmret.methods.registry",
    "Method": "mmret.methods.base",
    "MethodConfig": "mmret.methods.config",
    "RECIPES": "mmret.methods.config",
    "SIDES": "mmret.methods.base",
    "config_class": "mmret.methods.catalog",
    "config_for": "mmret.methods.catalog",
    "get_method": "mmret.methods.catalog",
    "method_configs": "mmret.methods.catalog",
    "method_help": "mmret.methods.catalog",
    "method_names": "mmret.methods.catalog",
    "method_settings": "mmret.methods.catalog",
    "owners": "mmret.methods.catalog",
    "recipe_help": "mmret.methods.config",
    "recipe_values": "mmret.methods.config",
    "register_method": "mmret.methods.registry",
    "registry": "mmret.methods.catalog",
})
__all__ = sorted(["FeatureDims", "FrozenPart", "Inputs", "METHODS", "Method", "MethodConfig", "RECIPES", "SIDES",
                  "config_class", "config_for", "get_method", "method_configs", "method_help", "method_names",
                  "method_settings", "owners", "recipe_help", "recipe_values", "register_method", "registry"])
