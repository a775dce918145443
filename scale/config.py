"""Experiment configuration: kw-only dataclasses, YAML files and dotted CLI overrides.

A run is described by one `PretrainConfig` tree. It is loaded from a YAML file under
`configs/pretrain/`, then `section.key=value` words from the command line are laid over it.
Every value is type-checked and every section validates itself in `__post_init__`, so a
typo or an impossible shape fails in one line *before* DeepSpeed or the model is touched.
The resolved tree is written to `<output_dir>/config.yaml` so a run can be reproduced.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "pretrain" / "demo.yaml"


class ConfigError(ValueError):
    """A configuration mistake; its message is one line that names the key to fix."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which SwinV2 to pretrain. `None` means "the registered default for `name`"."""
    name: str = "swinv2_tiny"
    img_size: int = 192
    patch_size: int = 4
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: int = 12
    drop_path_rate: float = 0.0
    norm_target_patch_size: int | None = 47  # SimMIM target normalisation window (SwinV2 recipe: on)
    grad_checkpointing: bool = False  # recompute blocks in backward: trades ~1/3 more compute for memory

    def __post_init__(self) -> None:
        for key in ("img_size", "patch_size", "window_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.depths is not None and self.num_heads is not None and len(self.depths) != len(self.num_heads):
            raise ConfigError(f"model.depths has {len(self.depths)} stages but model.num_heads has "
                              f"{len(self.num_heads)}; give one entry per stage in both")
        if self.norm_target_patch_size is not None and self.norm_target_patch_size % 2 == 0:
            raise ConfigError(f"model.norm_target_patch_size must be odd (centred window), "
                              f"got {self.norm_target_patch_size}")
        stages = len(self.depths) if self.depths is not None else 4
        reduction = self.patch_size * 2 ** (stages - 1)
        if self.img_size % reduction:
            raise ConfigError(f"model.img_size={self.img_size} must be divisible by patch_size*2^(stages-1)"
                              f"={reduction} so every patch-merging stage sees an even grid")
        if self.embed_dim is not None and self.num_heads is not None:
            for i, heads in enumerate(self.num_heads):
                if (self.embed_dim * 2 ** i) % heads:
                    raise ConfigError(f"model.num_heads[{i}]={heads} does not divide stage width "
                                      f"{self.embed_dim * 2 ** i} (embed_dim * 2^{i})")

    def build_args(self) -> dict[str, Any]:
        """Keyword arguments for `models.build_simmim`, leaving registry defaults alone."""
        args: dict[str, Any] = {"img_size": self.img_size, "patch_size": self.patch_size,
                                "window_size": self.window_size, "drop_path_rate": self.drop_path_rate}
        for key in ("embed_dim", "depths", "num_heads"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        return args


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the shards are and how SimMIM masks are drawn."""
    path: str = ""  # folder with train-*.tar, or a shard URL pattern; "" = the demo shards
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    num_workers: int = 2
    resampled: bool = False  # sample shards with replacement (infinite stream, for many nodes)

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"data.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size < 1 or self.num_workers < 0:
            raise ConfigError("data.mask_patch_size must be >= 1 and data.num_workers >= 0")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Length, batch and precision of the run."""
    micro_batch_size: int = 128  # images per rank per forward pass
    grad_accum_steps: int = 1
    epochs: float = 100.0
    max_steps: int = 0  # > 0: train this many optimizer steps; the schedule is compressed to fit
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU (bf16 is emulated and ~20x slower there)
    max_nonfinite_in_row: int = 5  # stop after this many consecutive non-finite losses

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum_steps must be >= 1")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError(f"train.max_steps must be >= 0 and train.epochs > 0, "
                              f"got {self.max_steps} and {self.epochs}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.max_nonfinite_in_row < 1:
            raise ConfigError("train.max_nonfinite_in_row must be >= 1")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW hyper-parameters. `lr` is per 512 images and scaled linearly by the global batch."""
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = None  # None: use the ds_config's gradient_clipping (which must be set)
    lr_batch_base: int = 512

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """LR schedule in epochs of `train.epochs`; compressed proportionally when `train.max_steps` is set."""
    name: str = "cosine"  # cosine | step
    warmup_epochs: float = 10.0
    warmup_lr: float = 5e-7  # per 512 images, like optim.lr
    min_lr: float = 5e-6  # per 512 images; cosine floor
    milestones: list[float] = field(default_factory=list)  # step: epochs at which LR *= gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in ("cosine", "step"):
            raise ConfigError(f"schedule.name must be cosine or step, got {self.name!r}")
        if self.warmup_epochs < 0 or self.warmup_lr < 0 or self.min_lr < 0:
            raise ConfigError("schedule.warmup_epochs, schedule.warmup_lr and schedule.min_lr must be >= 0")
        if self.name == "step" and not self.milestones:
            raise ConfigError("schedule.name=step needs schedule.milestones (epochs), e.g. [700]")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"schedule.gamma must be in (0, 1], got {self.gamma}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When to save and how many to keep."""
    every_steps: int = 1000  # 0 = only at the end
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """Console/TensorBoard cadence (rank 0 only)."""
    every_steps: int = 10
    image_every_steps: int = 1000  # reconstruction grid; also written at the end of every run
    num_images: int = 4
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.image_every_steps < 1 or self.num_images < 1:
            raise ConfigError("log.every_steps, log.image_every_steps and log.num_images must be >= 1")


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """The whole run. `name` comes from the YAML file name and sets the default output dir."""
    name: str = "pretrain"
    output_dir: str = ""  # "" = output/<name>
    seed: int = 0
    resume: str = "auto"  # auto | none | path to a checkpoint dir (or a tag inside it)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = str(Path("output") / self.name)
        if not self.resume:
            raise ConfigError("resume must be auto, none or a checkpoint path")
        m, d = self.model, self.data
        if d.mask_patch_size % m.patch_size or m.img_size % d.mask_patch_size:
            raise ConfigError(f"data.mask_patch_size={d.mask_patch_size} must be a multiple of model.patch_size="
                              f"{m.patch_size} and divide model.img_size={m.img_size}")
        if m.norm_target_patch_size is not None and m.norm_target_patch_size > m.img_size:
            raise ConfigError(f"model.norm_target_patch_size={m.norm_target_patch_size} exceeds "
                              f"model.img_size={m.img_size}")
        if self.schedule.warmup_epochs > self.train.epochs:
            raise ConfigError(f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds "
                              f"train.epochs={self.train.epochs}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), e.g. for the resolved config and checkpoints."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML; reloading it with `load_config` gives the same tree."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> type-checked dataclasses.

def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint`, or raise a one-line ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} cannot be {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {item.__name__}, got {value!r}")
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!s}; valid keys here: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # e.g. a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted='a.b', creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(words: list[str]) -> list[tuple[str, Any]]:
    """`['train.max_steps=100', 'resume=none']` -> [(key, YAML-parsed value), ...]."""
    pairs = []
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {word!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load YAML `path` (the demo when None), apply dotted overrides, validate everything.

    Raises ConfigError with a one-line message on any mistake.
    """
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    tree.setdefault("name", path.stem)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return _build(PretrainConfig, tree, "")


def check_model_name(cfg: PretrainConfig) -> None:
    """Fail early, before DeepSpeed starts, on a model the registry cannot build.

    Checks `model.name` and dry-builds the SimMIM model on the meta device (no memory, ~1 s
    for SwinV2-G), so every shape rule the model enforces is reported here in one line.
    """
    import models  # local: config parsing itself must not need torch-heavy imports

    names = list(models.list_models())
    if cfg.model.name not in names:
        raise ConfigError(f"model.name={cfg.model.name!r} is not registered; choose one of {', '.join(names)}")
    try:
        models.build_simmim(cfg.model.name, norm_target_patch_size=cfg.model.norm_target_patch_size,
                            device="meta", **cfg.model.build_args())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from None


def check_data_path(cfg: PretrainConfig) -> None:
    """A local `data.path` must exist (URLs, `pipe:` commands and brace patterns are checked by the loader)."""
    path = cfg.data.path
    if not path or "{" in path or path.startswith("pipe:") or ":" in path.split("/")[0]:
        return
    if not Path(path.removeprefix("file:")).exists():
        raise ConfigError(f"data.path={path} does not exist")
