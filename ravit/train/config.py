"""Training configuration: one flat dataclass, filled from defaults < a YAML file < command-line flags.

Every field is also a ``--flag`` of ``ravit train`` (underscores become dashes; ``dataset`` is ``--data``). A YAML key
or a flag that names no field is an error that names it. Defaults follow the FAN recipe (Zhou et al. 2022, Sec. 4:
AdamW, cosine schedule with warm-up, weight decay 0.05, label smoothing 0.1), scaled down for small data.

A config file is a path, or the name of one shipped in ``ravit/configs/`` (``fmnist_fan_p4``, with or without
``.yaml``), so ``-c`` works from any folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ravit.data import data_name, data_names
from ravit.errors import DataError, InvalidArgumentError, MissingFileError

__all__ = [
    "CONFIG_DIR",
    "RESUME_SAFE_KEYS",
    "TrainConfig",
    "config_fields",
    "find_config",
    "load_config",
    "packaged_configs",
    "parse_value",
    "resolve_config",
    "resume_conflicts",
]

# The configs shipped with ravit (the zoo models' recipes): ``-c NAME`` finds them from any folder.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # model: any ravit or timm model name, with constructor kwargs
    model: str = "deit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    img_size: int | None = None  # None: the dataset's native size
    in_chans: int | None = None  # None: the dataset's native channels
    num_classes: int | None = None  # None: the dataset's number of classes
    drop_path_rate: float | None = None  # None: the model's default
    pretrained: bool = False
    init_checkpoint: str | None = None  # weights to fine-tune from (head re-initialised if num_classes differs)
    # data
    dataset: str = "fashion_mnist"  # a registered name (fashion-mnist = fashion_mnist) or a folder (an ImageFolder)
    data_dir: str | None = None  # where the dataset's files are (Fashion-MNIST: default the Debian package's)
    train_split: str = "train"
    val_split: str = "test"
    train_subset: int | None = None  # a fixed random subset (seeded) of this many training images
    val_subset: int | None = None  # the first this-many validation images
    workers: int = 0
    # augmentation (timm transforms)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None
    reprob: float = 0.0
    crop_pct: float | None = None  # eval resize-then-crop; None: the dataset's default
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    # optimisation
    epochs: int = 10  # the cosine schedule spans them; --resume may change them (not below the finished ones)
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    opt: str = "adamw"
    lr: float = 1e-3  # for the global batch (batch_size * world size)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    amp: bool = False
    amp_dtype: str = "bfloat16"
    ema: bool = False
    ema_decay: float = 0.9998
    # ATS in the loop (needs ravit.apply_ats)
    ats_blocks: list[int] | None = None
    ats_budget: int | float | None = None  # per ATS block: an integer token count >= 1, or a ratio in (0, 1]
    ats_sampler: str = "inverse_transform"
    # run
    seed: int = 0
    output: str | None = None  # None: runs/train/<model>
    resume: bool = False  # continue from <output>/last.pth when it exists
    max_steps: int | None = None  # stop once the run has made this many optimizer steps (the schedule stays epochs')
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    threads: int | None = None  # torch intra-op threads per process (None: torch's default)
    progress: bool = True


# Keys that may differ between a run and its resumption without changing its result. ``epochs`` may differ too, but
# it changes the result: the schedule becomes that of the new length (see ravit.train.loop).
RESUME_SAFE_KEYS = frozenset({"data_dir", "workers", "output", "resume", "device", "threads", "progress", "max_steps"})


def config_fields() -> dict[str, str]:
    """Field name -> annotation string, in declaration order."""
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _unknown(key: str, where: str) -> InvalidArgumentError:
    close = difflib.get_close_matches(key, config_fields(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InvalidArgumentError(f"unknown config key {key!r} in {where}{hint}")


_LIST_ITEMS = {"list[int]": int, "list[float]": float}


def parse_value(name: str, value):
    """Coerce ``value`` (from YAML or a command-line string) to the type of field ``name``; ValueError if it can't."""
    annotation = config_fields()[name]
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if isinstance(value, str) and base != "str":
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise InvalidArgumentError(f"config key {name!r} expects {annotation}, got {value!r}") from None
    if value is None:
        if optional:
            return None
        raise InvalidArgumentError(f"config key {name!r} may not be null")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError
        if base == "int | float":  # an int and a float mean different things (e.g. a token count and a ratio)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            raise TypeError
        if base in ("int", "float", "str"):
            if base == "int" and (isinstance(value, bool) or float(value) != int(float(value))):
                raise TypeError
            return {"int": lambda v: int(float(v)), "float": float, "str": str}[base](value)
        if base in _LIST_ITEMS:
            item = _LIST_ITEMS[base]
            items = value if isinstance(value, (list, tuple)) else [value]
            return [item(v) for v in items]
        if base == "dict":
            if isinstance(value, dict):
                return dict(value)
            raise TypeError
    except (TypeError, ValueError):
        pass
    raise InvalidArgumentError(f"config key {name!r} expects {annotation}, got {value!r}")


def packaged_configs() -> list[str]:
    """The names of the configs shipped in ``ravit/configs/``."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def find_config(name: str | os.PathLike) -> Path:
    """A config file: ``name`` as a path when it is a file, else the packaged config of that name (``fmnist_fan_p4``,
    ``fmnist_fan_p4.yaml``, or ``ravit/configs/fmnist_fan_p4.yaml`` from outside the source tree); else a
    MissingFileError listing the packaged ones."""
    path = Path(name)
    if path.is_file():
        return path
    in_package = len(path.parts) == 1 or path.parent.parts[-2:] == ("ravit", "configs")
    packaged = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if in_package and packaged.is_file():
        return packaged
    raise MissingFileError(f"config {str(name)!r} not found: no such file, and no packaged config of that name "
                           f"({', '.join(packaged_configs())})")


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the YAML file ``path`` (a path or a packaged config's name, see ``find_config``), then
    ``overrides`` (already-parsed command-line values); resolved by ``resolve_config``."""
    values: dict = {}
    if path is not None:
        path = find_config(path)
        try:
            with open(path, "rb") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise InvalidArgumentError(f"{path}: a config file must be a mapping of keys to values")
        for key, value in loaded.items():
            if key not in config_fields():
                raise _unknown(key, str(path))
            values[key] = parse_value(key, value)
    for key, value in (overrides or {}).items():
        if key not in config_fields():
            raise _unknown(key, "the overrides")
        values[key] = parse_value(key, value)
    return resolve_config(TrainConfig(**values))


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked, its dataset under its registered name (a folder becomes ``imagefolder`` with that
    ``data_dir``) and its output folder filled in (``runs/train/<model>``). Resolving twice changes nothing."""
    dataset, data_dir = _resolve_data(cfg.dataset, cfg.data_dir)
    default_output = Path("runs", "train", cfg.model.replace("/", "_").replace(":", "_"))  # as other commands name it
    output = cfg.output if cfg.output is not None else str(default_output)
    cfg = dataclasses.replace(cfg, dataset=dataset, data_dir=data_dir, output=output)
    _validate(cfg)
    return cfg


def _dataset_name(name: str) -> str | None:
    """The registered name ``name`` means (``fashion-mnist`` is ``fashion_mnist``), or None."""
    return "imagefolder" if name == "imagefolder" else data_name(name)


def _resolve_data(dataset: str, data_dir: str | None) -> tuple[str, str | None]:
    name = _dataset_name(dataset)
    if name is not None:
        return name, data_dir
    if Path(dataset).is_dir():
        if data_dir is not None and Path(data_dir).resolve() != Path(dataset).resolve():
            raise InvalidArgumentError(f"the data is the folder {dataset} but data_dir says {data_dir}; give one")
        return "imagefolder", dataset
    raise InvalidArgumentError(
        f"unknown dataset {dataset!r}: neither a dataset name ({', '.join(data_names())}) nor a folder")


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """The config keys whose values in ``cfg`` differ from ``saved`` (a checkpoint's config) in a way that forbids
    resuming: all but RESUME_SAFE_KEYS and ``epochs``, whose checks are the training loop's."""
    current = asdict(cfg)
    if isinstance(saved.get("dataset"), str):  # a name may be spelt either way (fashion-mnist, fashion_mnist)
        saved = {**saved, "dataset": _dataset_name(saved["dataset"]) or saved["dataset"]}
    keys = (set(saved) | set(current)) - RESUME_SAFE_KEYS - {"epochs"}
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise InvalidArgumentError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise InvalidArgumentError("batch sizes must be >= 1")
    if len(cfg.scale) != 2 or len(cfg.ratio) != 2:
        raise InvalidArgumentError("scale and ratio take two numbers each (min max)")
    if cfg.amp_dtype not in ("bfloat16", "float16"):
        raise InvalidArgumentError(f"amp_dtype must be bfloat16 or float16, got {cfg.amp_dtype!r}")
    if cfg.ats_budget is not None and cfg.ats_blocks is None:
        raise InvalidArgumentError("ats_budget needs ats_blocks")
    budget = cfg.ats_budget
    if isinstance(budget, int) and budget < 1:
        raise InvalidArgumentError(f"ats_budget {budget}: a token count must be >= 1")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise InvalidArgumentError(
            f"ats_budget {budget}: write an integer token count (e.g. {max(1, round(budget))}) or a ratio in (0, 1]")
    for name in ("train_subset", "val_subset", "max_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
