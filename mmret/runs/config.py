"""A training run's configuration: one dataclass per concern, validated on creation and saved as
`runs/<run>/config.json`, enough to rebuild the run's model.

The `method` section is the method's own config class (`mmret.methods`): the settings every
method shares plus its own. A config.json written before methods had configs of their own (every
method's settings in one section) still loads: the settings of other methods are left out. So
does one written before the item side had its own name (`encoders.vision`, `mine_by: image`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.common.io import config_dict
from mmret.common.options import coerce, option, settings_of
from mmret.common.paths import DATA_DIR_ENV, RUNS_DIR_ENV, check_name, data_root, runs_root
from mmret.errors import MmretError
from mmret.methods import MethodConfig, config_class, config_for, method_settings, owners
from mmret.methods.config import check_positive

_logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    dataset: str = option("example", "Prepared dataset to train on")
    folds: int = option(0, "k-fold cross-validation: re-split all items into k folds; 0 keeps the dataset's splits")
    fold: int = option(0, "With --folds: the fold used as test split")
    data_dir: Path | None = option(None, "Folder holding the prepared datasets", shown="./data", envvar=DATA_DIR_ENV)
    modality: str = option("image", "What the dataset's items are", cli=False)  # set from the dataset in training

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise MmretError(f"--folds must be 0 (off) or at least 2, got {self.folds}")
        if self.folds and not 0 <= self.fold < self.folds:
            raise MmretError(f"--fold must be in [0, {self.folds}), got {self.fold}")
        self.data_dir = data_root(self.data_dir)


@dataclass
class EncoderConfig:
    # the item tower is one setting, spelled the way a dataset's items are named: --vision for pictures,
    # --audio for sounds, or --item-tower for either
    item: str = option("dino-vits16", "Frozen item tower (pictures: --vision, sounds: --audio): preset, hub id or "
                                      "folder (sounds: ast-audioset, clap-htsat, spectrogram:IMAGE-TOWER)",
                       flags=("--item-tower", "--vision", "--audio"))
    text: str = option("distilbert", "Frozen text tower: preset, hub id or folder")
    model: str | None = option(None, "A CLIP (preset clip-b32/clip-b16, hub id or folder) whose two towers "
                                     "lora/prefix/adapter/full adapt, in place of --vision and --text")
    max_length: int = option(64, "Text tokens per caption")


ITEM_FLAGS = {"image": "--vision", "audio": "--audio"}  # modality -> how a command line names the item tower


@dataclass
class TrainConfig:
    epochs: int = option(20, "Passes over the training items")
    batch_size: int = option(128, "Pairs in one contrastive loss")
    micro_batch: int | None = option(None, "Pairs per forward pass; smaller than --batch-size uses gradient "
                                           "caching, so every pair still sees the whole batch's negatives",
                                     shown="the whole batch")
    accumulation: str = option("cache", "With --micro-batch: cache (exact) or plain accumulation (each "
                                        "micro-batch sees only its own negatives)")
    lr: float | None = option(None, "Peak learning rate", shown="the method's")
    weight_decay: float = option(0.05, "AdamW weight decay (never on norms, biases or the temperature)")
    warmup: float = option(0.05, "Fraction of all steps spent warming up linearly")
    grad_clip: float = option(1.0, "Clip the global gradient norm; 0 turns it off")
    precision: str = option("auto", "auto, fp32, bf16 or fp16 (CUDA only, with loss scaling)")
    patience: int = option(5, "Stop after this many epochs without a better val mean recall; 0 never stops early")
    seed: int = option(0, "Seed of data order, initialisation and dropout")
    workers: int | None = option(None, "Item decoding workers of the methods that read files",
                                 shown="CPU count - 1, from 1 to 4")
    grad_checkpointing: bool = option(False, "Recompute tower activations in backward to save memory")
    hflip: bool | None = option(None, "Random horizontal flips of training pictures",
                                shown="on unless captions say left or right")
    sam: bool = option(False, "Sharpness-aware minimisation (two passes a step)")
    sam_rho: float = option(0.05, "SAM neighbourhood size rho")
    save_every: int = option(0, "Also keep a checkpoint every N epochs; 0 keeps only the best and the last")
    max_steps: int | None = option(None, "Stop after this many optimizer steps")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    same_caption: str = option("positive", "Items whose captions have the same text: positive (never each other's "
                                           "negatives) or negative (as CLIP)")
    hard_negatives: int = option(0, "Batches of groups of this many near neighbours mined from cached features; "
                                    "0 is random batches")
    mine_by: str = option("both", "Hard negatives are neighbours by cached item, text or both features")
    hn_beta: float = option(0.0, "HN-NCE: weight negatives by softmax(beta x logit); 0 is plain InfoNCE")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch", "lr", "max_steps"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        if self.micro_batch is not None and self.micro_batch > self.batch_size:
            raise MmretError(f"--micro-batch {self.micro_batch} cannot exceed --batch-size {self.batch_size}")
        if self.accumulation not in ("cache", "plain"):
            raise MmretError(f"--accumulation must be cache or plain, got {self.accumulation!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MmretError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 <= self.warmup < 1:
            raise MmretError(f"--warmup is a fraction of all steps in [0, 1), got {self.warmup}")
        if self.patience < 0 or self.save_every < 0 or self.grad_clip < 0:
            raise MmretError("--patience, --save-every and --grad-clip cannot be negative")
        if self.workers is not None and self.workers < 0:
            raise MmretError(f"--workers cannot be negative, got {self.workers}")
        if self.same_caption not in ("positive", "negative"):
            raise MmretError(f"--same-caption must be positive or negative, got {self.same_caption!r}")
        if self.hard_negatives == 1 or self.hard_negatives < 0:
            raise MmretError(f"--hard-negatives is a group size: 0 (off) or at least 2, got {self.hard_negatives}")
        if self.mine_by in ("image", "audio"):  # the modality's word, as config.json said before items had a name
            self.mine_by = "item"
        if self.mine_by not in ("item", "text", "both"):
            raise MmretError(f"--mine-by must be item, text or both, got {self.mine_by!r}")
        if self.hn_beta < 0:
            raise MmretError(f"--hn-beta must be 0 (off) or positive, got {self.hn_beta}")


@dataclass
class RunConfig:
    """Everything a training run needs, saved as `runs/<run>/config.json` to rebuild its model."""

    name: str | None = option(None, "Run name", shown="date-method-dataset")
    runs_dir: Path | None = option(None, "Folder holding the runs", shown="./runs", envvar=RUNS_DIR_ENV)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=lambda: config_for(MethodConfig.method))
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.runs_dir = runs_root(self.runs_dir)
        if self.name is not None:
            check_name("--name", self.name, reserved=("latest",))

    def to_dict(self) -> dict:
        out = {"name": self.name, "runs_dir": str(self.runs_dir)}
        for part in SECTIONS:
            out[part] = config_dict(getattr(self, part))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        unknown = set(data) - set(SECTIONS) - {"name", "runs_dir"}
        if unknown:
            raise MmretError(f"unknown config sections: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {"name": data.get("name"), "runs_dir": data.get("runs_dir")}
        for key, kind in SECTIONS.items():
            section = dict(data.get(key, {}))
            if key == "method":
                name = section.pop("method", LEGACY_METHOD)
                section = {**getattr(config_class(name), "SAVED_BEFORE", {}), **section}
                kwargs[key] = config_for(name, **_typed(config_class(name), section, key))
                continue
            section = {RENAMED.get((key, k), k): v for k, v in section.items() if (key, k) not in RETIRED}
            if section:  # a saved section: settings added since it was written keep their old meaning
                section = {**{k: v for (s, k), v in SAVED_BEFORE.items() if s == key}, **section}
            names = {f.name for f in dataclasses.fields(kind)}
            bad = set(section) - names
            if bad:
                raise MmretError(f"unknown {key} settings in config: {', '.join(sorted(bad))}")
            kwargs[key] = kind(**_typed(kind, section, key))
        return cls(**kwargs)


def _typed(kind: type, section: dict[str, Any], key: str) -> dict[str, Any]:
    """A section read from a file with each setting checked against its type (one line for
    `embed_dim: "abc"`, not a TypeError deep in a model)."""
    settings = {st.name: st for st in settings_of(kind)}
    return {k: coerce(settings[k], v, f"config.json {key}") if k in settings else v for k, v in section.items()}


SECTIONS = {"data": DataConfig, "encoders": EncoderConfig, "method": MethodConfig, "train": TrainConfig}
RETIRED = {("encoders", "tokens")}  # settings old config.json files hold that nothing reads any more
RENAMED = {("encoders", "vision"): "item"}  # settings old config.json files hold under an earlier name
# settings added later, and what a config.json written before them meant (a method's own are its
# config class's SAVED_BEFORE)
SAVED_BEFORE = {("train", "same_caption"): "negative"}
LEGACY_METHOD = "bridge"  # the default when a method section without a name was written


def settle_modality(cfg: RunConfig) -> str:
    """Set `cfg.data.modality` to what the run's items are and return it: the dataset's modality
    when the dataset is prepared, else what the item tower takes (a preset, `spectrogram:NAME`, or
    a folder's model type), else the default. For commands that may run without the dataset
    (`--dry-run`, `probe-memory`); training reads it from the dataset."""
    from mmret.data.prepared import load_dataset
    from mmret.encoders import tower_modality

    try:
        cfg.data.modality = load_dataset(cfg.data.dataset, cfg.data.data_dir).modality.name
    except MmretError:
        tower = cfg.encoders.model or cfg.encoders.item
        cfg.data.modality = (tower_modality(tower) if tower else None) or cfg.data.modality
    return cfg.data.modality


def section_of(option: str) -> str:
    """The config section a flat option name (e.g. `rank`, `epochs`) belongs to."""
    if option in method_settings():
        return "method"
    for section, kind in SECTIONS.items():
        if option in {f.name for f in dataclasses.fields(kind)}:
            return section
    raise MmretError(f"unknown setting {option!r}")


def _method_section(current: MethodConfig, changes: dict[str, Any]) -> MethodConfig:
    """The method section with `changes`; a new method keeps only the settings every method shares.
    A setting the chosen method does not have is left out, with a warning naming the methods that
    have it."""
    name = changes.pop("method", current.method)
    base = dataclasses.asdict(current) if name == current.method else {
        f.name: getattr(current, f.name) for f in dataclasses.fields(MethodConfig)}
    for setting in settings_of(config_class(name)):  # a setting worked out from another is worked out again
        if setting.follows in changes and setting.name not in changes:
            changes[setting.name] = None
    cfg = config_for(name, **{**base, **changes})
    for key in sorted(k for k in changes if not hasattr(cfg, k)):
        _logger.warning("--%s is a setting of %s; --method %s has no use for it", key.replace("_", "-"),
                        ", ".join(owners(key)), name)
    return cfg


def with_overrides(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with flat option values (None: not given) applied, validated again."""
    given = {k: v for k, v in values.items() if v is not None}
    top = {k: given.pop(k) for k in ("name", "runs_dir") if k in given}
    parts = {}
    for section in SECTIONS:
        current = getattr(cfg, section)
        changes = {k: v for k, v in given.items() if section_of(k) == section}
        if section == "method":
            parts[section] = _method_section(current, changes)
        else:
            parts[section] = dataclasses.replace(current, **changes)
    return RunConfig(name=top.get("name", cfg.name), runs_dir=top.get("runs_dir", cfg.runs_dir), **parts)
