"""The tables of tower builders, each name taken once: a modality's family (`register_family`), the
transformers model types only it takes, and the wrappers that build a tower around another
(`register_wrapper`, `spectrogram:NAME`).

Only the tables live here: each family's module registers its builder when imported, and
`mmret.encoders.load` (above them all) names the built-in families and imports them on first use.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from mmret.common.registry import Registry, place_of

FAMILIES: Registry = Registry("encoder family")  # modality -> build(source, weights, **options)
MODEL_TYPES: Registry = Registry("transformers model type")  # model_type -> the item modality its family takes


class Wrapper(NamedTuple):
    modality: str  # the modality of the towers it builds
    inner: str  # the modality of the tower it wraps
    build: Callable[[Any], Any]  # inner tower -> tower


WRAPPERS: Registry = Registry("encoder wrapper")  # name prefix -> Wrapper


def register_family(modality: str, build: Callable[..., Any], model_types: tuple[str, ...] = ()) -> None:
    """`build(source, weights, **options)` makes the `modality` towers; `model_types` are the
    transformers model types that only it takes (so a folder's config says what its items are)."""
    FAMILIES.add(modality, build, place_of(build))
    for kind in model_types:
        MODEL_TYPES.add(kind, modality, place_of(build))


def register_wrapper(prefix: str, modality: str, build: Callable[[Any], Any], inner: str = "image") -> None:
    """Names `PREFIX<name>` are `modality` towers built by `build(tower)` around the `inner` tower
    `<name>` (`spectrogram:NAME`: an image tower over log-mel pictures of sounds)."""
    WRAPPERS.add(prefix, Wrapper(modality, inner, build), place_of(build))
