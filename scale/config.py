"""Experiment configuration: kw-only dataclasses, YAML files and dotted CLI overrides.

A run is described by one tree: `RunConfig` holds what every task shares (model, data, optim,
schedule, checkpoint, log); `PretrainConfig` adds the method and its section (`simmim:`),
`FinetuneConfig` the resolution stages and the classification recipe (`finetune:`). A tree is
loaded from a YAML file under `configs/pretrain/` or `configs/finetune/`, then
`section.key=value` words from the command line are laid over it.
Every value is type-checked and every section validates itself in `__post_init__`, so a
typo or an impossible shape fails in one line *before* DeepSpeed or the model is touched.
The resolved tree is written to `<output_dir>/config.yaml` so a run can be reproduced.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "pretrain" / "demo.yaml"
FINETUNE_DEMO_CONFIG = REPO_ROOT / "configs" / "finetune" / "demo_progressive.yaml"


class ConfigError(ValueError):
    """A configuration mistake; its message is one line that names the key to fix."""


# models.attention.ATTN_BACKENDS, spelled out so that parsing a config needs no torch (a test keeps them equal)
ATTN_BACKENDS = ("auto", "fused", "sequential", "plain", "flex")


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
    grad_checkpointing: bool = False  # recompute blocks in backward: trades ~1/3 more compute for memory
    attn_backend: str = "auto"  # auto | fused | sequential | plain | flex (models/attention.py; same numerics)
    compile: bool = False  # torch.compile each block (for GPUs: compiling takes minutes on a CPU)
    # windows the log-CPB MLP learned at, per stage; null = none (pretraining) or, when fine-tuning, the
    # pretrained run's (e.g. [12, 12, 12, 6] after 192/w12)
    pretrained_window_sizes: list[int] | None = None

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
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"model.attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {self.attn_backend!r}")
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
        """Keyword arguments for `models.build_model` / `build_simmim`, leaving registry defaults alone."""
        args: dict[str, Any] = {"img_size": self.img_size, "patch_size": self.patch_size,
                                "window_size": self.window_size, "drop_path_rate": self.drop_path_rate}
        for key in ("embed_dim", "depths", "num_heads", "pretrained_window_sizes"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        if self.attn_backend != "auto":
            args["attn_backend"] = self.attn_backend
        return args

    def backbone_args(self) -> dict[str, Any]:
        """Keyword arguments for `models.build_backbone`: `build_args`, or for a timm ViT the keys it takes."""
        if self.name.startswith(("vit_", "deit_")):  # models.backbones.TIMM_PREFIXES
            args: dict[str, Any] = {"img_size": self.img_size, "drop_path_rate": self.drop_path_rate}
            return args if self.embed_dim is None else {**args, "embed_dim": self.embed_dim}
        return self.build_args()


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the shards are and how they are read."""
    path: str = ""  # folder with train-*.tar, or a shard URL pattern; "" = the demo shards
    num_workers: int = 2
    resampled: bool = False  # sample shards with replacement (infinite stream, for many nodes)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


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
            raise ConfigError(f"optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0, got lr={self.lr}, "
                              f"eps={self.eps}, weight_decay={self.weight_decay}: set them in the config or as "
                              f"optim.lr=... overrides")
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
    weight_decay_end: float | None = None  # decaying groups' weight decay goes from optim.weight_decay to this
    # on a cosine over the run (DINO/EsViT: 0.04 -> 0.4); null = constant

    def __post_init__(self) -> None:
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise ConfigError(f"schedule.weight_decay_end must be >= 0 (or null), got {self.weight_decay_end}")
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
class RunConfig:
    """What every run has, whatever its task. `name` comes from the YAML file name and sets the default output dir."""
    name: str = "run"
    output_dir: str = ""  # "" = output/<name>
    seed: int = 0
    resume: str = "auto"  # auto | none | path to a checkpoint dir (or a tag inside it)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = str(Path("output") / self.name)
        if not self.resume:
            raise ConfigError("resume must be auto, none or a checkpoint path")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), e.g. for the resolved config and checkpoints."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML; reloading it with `load_config` gives the same tree."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Pretraining: the method and its section.

PRETRAIN_METHODS = ("simmim", "moby", "esvit", "sit")


@dataclass(kw_only=True, slots=True)
class MethodConfig:
    """Which self-supervised method pretrains the encoder (its settings live in the section of that name)."""
    name: str = "simmim"

    def __post_init__(self) -> None:
        if self.name not in PRETRAIN_METHODS:
            raise ConfigError(f"method.name={self.name!r} is not a pretraining method; choose one of "
                              f"{', '.join(PRETRAIN_METHODS)}")


@dataclass(kw_only=True, slots=True)
class SimMIMConfig:
    """SimMIM: which patches are masked and how the pixel target is normalised."""
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target_patch_size: int | None = 47  # per-pixel target normalisation window (SwinV2 recipe: on)

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"simmim.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size < 1:
            raise ConfigError(f"simmim.mask_patch_size must be >= 1, got {self.mask_patch_size}")
        if self.norm_target_patch_size is not None and self.norm_target_patch_size % 2 == 0:
            raise ConfigError(f"simmim.norm_target_patch_size must be odd (centred window), "
                              f"got {self.norm_target_patch_size}")


def _check_range(section: str, values: dict[str, tuple[float, float, float]]) -> None:
    """Raise a one-line ConfigError for the first `key: (value, low, high)` outside [low, high]."""
    for key, (value, low, high) in values.items():
        if not low <= value <= high:
            raise ConfigError(f"{section}.{key} must be in [{low}, {high}], got {value}")


def _check_crop_scale(key: str, scale: list[float]) -> None:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"{key} must be [low, high] with 0 < low <= high <= 1, got {scale}")


@dataclass(kw_only=True, slots=True)
class MoBYConfig:
    """MoBY (Xie et al., arXiv:2105.04553): MoCo v2 + BYOL, two queues, an EMA target encoder."""
    proj_dim: int = 256  # output of projector and predictor
    hidden_dim: int = 4096  # hidden width of projector and predictor
    queue_size: int = 4096  # keys per queue (one queue per view); a multiple of the global batch
    temperature: float = 0.2
    momentum: float = 0.99  # target momentum at step 0, rising to 1 on a cosine over the run
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    grayscale_prob: float = 0.2  # share of views turned gray (1: colour never tells two images apart)

    def __post_init__(self) -> None:
        if min(self.proj_dim, self.hidden_dim, self.queue_size) < 1:
            raise ConfigError("moby.proj_dim, moby.hidden_dim and moby.queue_size must be >= 1")
        _check_range("moby", {"temperature": (self.temperature, 1e-3, 10.0), "momentum": (self.momentum, 0.0, 1.0),
                              "grayscale_prob": (self.grayscale_prob, 0.0, 1.0)})
        _check_crop_scale("moby.crop_scale", self.crop_scale)


@dataclass(kw_only=True, slots=True)
class EsViTConfig:
    """EsViT (Li et al., arXiv:2106.09785): DINO view loss plus region matching, multi-crop, EMA teacher."""
    out_dim: int = 65536  # prototypes of the view head
    dense_out_dim: int = 65536  # prototypes of the region head
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False
    region_loss: bool = True  # false: the view loss only (plain DINO)
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops: int = 8
    local_crops_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    grayscale_prob: float = 0.2  # share of crops turned gray (1: colour never tells two images apart)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04  # teacher temperature rises linearly from this ...
    warmup_teacher_temp_epochs: float = 30.0  # ... over this many epochs (of train.epochs)
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher momentum at step 0, rising to 1 on a cosine
    freeze_last_layer_epochs: float = 1.0  # the prototype layers train at LR 0 this long

    def __post_init__(self) -> None:
        if min(self.out_dim, self.dense_out_dim, self.hidden_dim, self.bottleneck_dim, self.local_crops_size) < 1 \
                or self.local_crops < 0:
            raise ConfigError("esvit.out_dim, dense_out_dim, hidden_dim, bottleneck_dim and local_crops_size must be "
                              ">= 1, esvit.local_crops >= 0")
        _check_range("esvit", {"student_temp": (self.student_temp, 1e-3, 10.0),
                               "teacher_temp": (self.teacher_temp, 1e-3, 10.0),
                               "warmup_teacher_temp": (self.warmup_teacher_temp, 1e-3, 10.0),
                               "center_momentum": (self.center_momentum, 0.0, 1.0),
                               "momentum": (self.momentum, 0.0, 1.0),
                               "grayscale_prob": (self.grayscale_prob, 0.0, 1.0)})
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer_epochs < 0:
            raise ConfigError("esvit.warmup_teacher_temp_epochs and esvit.freeze_last_layer_epochs must be >= 0")
        _check_crop_scale("esvit.global_crops_scale", self.global_crops_scale)
        _check_crop_scale("esvit.local_crops_scale", self.local_crops_scale)


@dataclass(kw_only=True, slots=True)
class SiTConfig:
    """SiT v3 (Atito et al., arXiv:2104.03602v3): GMML corruption, reconstruction + contrastive, EMA teacher."""
    hidden_dim: int = 4096  # CLS head hidden width
    proj_dim: int = 256
    temperature: float = 0.2
    recon_weight: float = 1.0  # lambda of the reconstruction loss (the README: raise it, e.g. 5, on small data)
    decoder_depth: int = 3  # Linear+GELU layers on the tokens before the pixel decoder (SiT's RECHead: 3)
    momentum: float = 0.996
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    grayscale_prob: float = 0.2  # share of views turned gray (1: colour never tells two images apart)
    drop_perc: float = 0.5  # share of pixels the block corruption covers at least
    drop_max_block: float = 0.3  # largest block side, as a share of the image side
    drop_align: int = 32  # block edges on this pixel grid (the SwinV2 token stride)
    replace_prob: float = 0.5  # share of images corrupted by pasting from another image instead
    replace_perc: float = 0.3  # share of pixels pasted then

    def __post_init__(self) -> None:
        if min(self.hidden_dim, self.proj_dim, self.drop_align) < 1:
            raise ConfigError("sit.hidden_dim, sit.proj_dim and sit.drop_align must be >= 1")
        if self.decoder_depth < 0:
            raise ConfigError(f"sit.decoder_depth must be >= 0 (0 = SimMIM's linear decoder), got {self.decoder_depth}")
        _check_range("sit", {"temperature": (self.temperature, 1e-3, 10.0),
                             "recon_weight": (self.recon_weight, 0.0, 1e3), "momentum": (self.momentum, 0.0, 1.0),
                             "drop_perc": (self.drop_perc, 0.0, 0.95), "drop_max_block": (self.drop_max_block, 0.01, 1.0),
                             "replace_prob": (self.replace_prob, 0.0, 1.0), "replace_perc": (self.replace_perc, 0.0, 0.95),
                             "grayscale_prob": (self.grayscale_prob, 0.0, 1.0)})
        _check_crop_scale("sit.crop_scale", self.crop_scale)


@dataclass(kw_only=True, slots=True)
class PretrainConfig(RunConfig):
    """A pretraining run (`run_pretrain.py`)."""
    name: str = "pretrain"
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    moby: MoBYConfig = field(default_factory=MoBYConfig)
    esvit: EsViTConfig = field(default_factory=EsViTConfig)
    sit: SiTConfig = field(default_factory=SiTConfig)

    # keys of the SimMIM settings before they had a section of their own; old YAMLs and overrides keep working
    MOVED_KEYS: ClassVar[dict[str, str]] = {"data.mask_patch_size": "simmim.mask_patch_size",
                                            "data.mask_ratio": "simmim.mask_ratio",
                                            "model.norm_target_patch_size": "simmim.norm_target_patch_size"}

    def __post_init__(self) -> None:
        RunConfig.__post_init__(self)
        m, sm = self.model, self.simmim
        simmim = self.method.name == "simmim"  # the mask shapes matter only to SimMIM
        if simmim and (sm.mask_patch_size % m.patch_size or m.img_size % sm.mask_patch_size):
            raise ConfigError(f"simmim.mask_patch_size={sm.mask_patch_size} (data.mask_patch_size) must be a "
                              f"multiple of model.patch_size={m.patch_size} and divide model.img_size={m.img_size}")
        if simmim and sm.norm_target_patch_size is not None and sm.norm_target_patch_size > m.img_size:
            raise ConfigError(f"simmim.norm_target_patch_size={sm.norm_target_patch_size} exceeds "
                              f"model.img_size={m.img_size}")
        if self.schedule.warmup_epochs > self.train.epochs:
            raise ConfigError(f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds "
                              f"train.epochs={self.train.epochs}")


# --------------------------------------------------------------------------------------------
# Fine-tuning: resolution stages and the classification recipe.

@dataclass(kw_only=True, slots=True)
class StageConfig:
    """One resolution of a progressive fine-tune. Length in `epochs` of the train split, or `steps`."""
    img_size: int
    window_size: int
    epochs: float = 0.0
    steps: int = 0  # > 0: optimizer steps instead of epochs
    micro_batch: int | str = "auto"  # images per rank per forward; auto = the largest the memory plan allows
    lr: float | None = None  # peak LR per 512 images for this stage (the schedule's shape continues); null = optim.lr

    def __post_init__(self) -> None:
        if (self.epochs > 0) == (self.steps > 0) or self.epochs < 0 or self.steps < 0:
            raise ConfigError(f"a stage needs exactly one of epochs > 0 or steps > 0, got epochs={self.epochs} "
                              f"steps={self.steps}")
        if isinstance(self.micro_batch, str) and self.micro_batch != "auto":
            raise ConfigError(f"micro_batch must be an integer >= 1 or auto, got {self.micro_batch!r}")
        if isinstance(self.micro_batch, int) and self.micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1 or auto, got {self.micro_batch}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0 (or null for optim.lr), got {self.lr}")


@dataclass(kw_only=True, slots=True)
class FinetuneTrainConfig:
    """Batch, length cap and precision of a fine-tune; the micro-batch is set per stage."""
    global_batch_size: int = 1024  # images per optimizer step over all ranks, kept through every stage
    max_steps: int = 0  # > 0: train this many optimizer steps in all, every stage shortened in proportion
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    max_nonfinite_in_row: int = 5

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.max_steps < 0 or self.max_nonfinite_in_row < 1:
            raise ConfigError("train.global_batch_size and train.max_nonfinite_in_row must be >= 1, "
                              "train.max_steps >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")


@dataclass(kw_only=True, slots=True)
class FinetuneSection:
    """The classification recipe: labels, augmentation, layer decay, weight EMA, evaluation."""
    num_classes: int = 0  # 0 = the data set's (index.json)
    label_smoothing: float = 0.1
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = off
    re_prob: float = 0.25  # random erasing
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    color_jitter: float = 0.4
    layer_decay: float = 1.0  # LR x decay^(num_layers - 1 - layer id) (Microsoft's rule); 1 = off
    ema_decay: float = 0.0  # EMA of the weights, kept in fp32; 0 = off, e.g. 0.9999
    val_path: str = ""  # "" = the val split of data.path
    eval_crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ConfigError(f"finetune.num_classes must be >= 0 (0 = from the data set), got {self.num_classes}")
        if not 0.0 <= self.label_smoothing < 1.0 or self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("finetune.label_smoothing must be in [0, 1), finetune.mixup and finetune.cutmix >= 0")
        if not 0.0 <= self.re_prob <= 1.0:
            raise ConfigError(f"finetune.re_prob must be in [0, 1], got {self.re_prob}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"finetune.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                              f"got {self.crop_scale}")
        if self.color_jitter < 0:
            raise ConfigError(f"finetune.color_jitter must be >= 0, got {self.color_jitter}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"finetune.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"finetune.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            raise ConfigError(f"finetune.eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")


@dataclass(kw_only=True, slots=True)
class FinetuneConfig(RunConfig):
    """A progressive-resolution fine-tune (`run_finetune.py`). `model.img_size`/`window_size` follow stage 1."""
    name: str = "finetune"
    pretrained: str = ""  # what to start from (also --pretrained); "" = random init
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def __post_init__(self) -> None:
        RunConfig.__post_init__(self)
        if not self.stages:
            raise ConfigError("stages is empty: give at least one {img_size, window_size, epochs or steps}")
        self.model.img_size, self.model.window_size = self.stages[0].img_size, self.stages[0].window_size
        for i, stage in enumerate(self.stages):
            try:  # every stage's shape must pass the model's rules
                dataclasses.replace(self.model, img_size=stage.img_size, window_size=stage.window_size)
            except ConfigError as e:
                raise ConfigError(f"stages[{i}]: {e}") from None
        warmup_budget = sum(s.epochs for s in self.stages)
        if warmup_budget and self.schedule.warmup_epochs > warmup_budget:
            raise ConfigError(f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds the stages' "
                              f"{warmup_budget} epochs")


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
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
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


def _move_keys(tree: dict[str, Any], moved: dict[str, str]) -> None:
    """Rewrite old dotted keys of `tree` to their new place (`moved`: old -> new)."""
    for old, new in moved.items():
        *parents, leaf = old.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            _set_dotted(tree, new, node.pop(leaf))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[RunConfig] = PretrainConfig, default: Path = DEMO_CONFIG) -> Any:
    """Load YAML `path` (`default`, the demo, when None), apply dotted overrides, validate into `schema`.

    Raises ConfigError with a one-line message on any mistake.
    """
    path = Path(path) if path is not None else default
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder: give a YAML file, e.g. {default}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give an existing YAML file, e.g. {default}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    tree.setdefault("name", path.stem)
    moved = getattr(schema, "MOVED_KEYS", {})
    _move_keys(tree, moved)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, moved.get(key, key), value)
    return _build(schema, tree, "")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """`load_config` for `run_finetune.py`: the fine-tuning schema, the progressive demo by default."""
    return load_config(path, overrides, schema=FinetuneConfig, default=FINETUNE_DEMO_CONFIG)


def check_model_name(cfg: RunConfig, cuda: bool = True) -> None:
    """Fail early, before DeepSpeed starts, on a model the registry cannot build (or this device cannot train).

    Checks `model.name` and dry-builds the encoder on the meta device (no memory, ~1 s for
    SwinV2-G), so every shape rule the model enforces is reported here in one line.
    """
    if cfg.model.attn_backend == "flex" and not cuda:
        raise ConfigError("model.attn_backend=flex trains only on GPUs (torch's flex_attention has no CPU backward): "
                          "use model.attn_backend=auto on the CPU")
    import models  # local: config parsing itself must not need torch-heavy imports

    from models.backbones import build_backbone, is_timm_backbone

    names = list(models.list_models())
    method = getattr(getattr(cfg, "method", None), "name", None)
    timm_vit = is_timm_backbone(cfg.model.name)
    if timm_vit and method not in ("moby", "sit"):
        raise ConfigError(f"model.name={cfg.model.name} (a timm ViT) trains only with method.name=moby or sit; "
                          f"use one of {', '.join(names)} here")
    if cfg.model.name not in names and not timm_vit:
        vit = " or, for method.name=moby/sit, a timm ViT/DeiT such as vit_small_patch16_224" if method else ""
        raise ConfigError(f"model.name={cfg.model.name!r} is not registered; choose one of {', '.join(names)}{vit}")
    try:
        build_backbone(cfg.model.name, device="meta", **cfg.model.backbone_args())
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from None


def check_data_path(cfg: RunConfig) -> None:
    """A local `data.path` must exist (URLs, `pipe:` commands and brace patterns are checked by the loader)."""
    path = cfg.data.path
    if not path or "{" in path or path.startswith("pipe:") or ":" in path.split("/")[0]:
        return
    if not Path(path.removeprefix("file:")).exists():
        raise ConfigError(f"data.path={path} does not exist: point data.path at a shard folder, a brace pattern or "
                          f"a list file (leave it empty for the demo shards)")
    import tarfile

    from data.index import expand_urls

    fix = "point data.path at a folder of shards written by `python -m data.write_shards`"
    try:
        shards = [u.removeprefix("file:") for u in expand_urls(path)]
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path={path}: {e}; {fix}") from None
    local = [s for s in shards if ":" not in s.split("/")[0]]
    if not shards or (local and not any(os.path.isfile(s) and tarfile.is_tarfile(s) for s in local)):
        # one readable shard is enough here: the loader skips and counts damaged ones later
        raise ConfigError(f"data.path={path} holds no readable tar shard; {fix}")


def check_method(cfg: PretrainConfig, world_size: int) -> None:
    """The pretraining method's rules that depend on the backbone or the number of ranks, before DeepSpeed starts."""
    from models.backbones import is_timm_backbone

    method, m = cfg.method.name, cfg.model
    if method == "moby":
        batch = cfg.train.micro_batch_size * world_size
        if cfg.moby.queue_size % batch:
            raise ConfigError(f"moby.queue_size={cfg.moby.queue_size} is not a multiple of the batch of one forward "
                              f"over all {world_size} rank(s) ({batch}): the queues take every rank's keys at once; "
                              f"choose e.g. moby.queue_size={batch * max(1, cfg.moby.queue_size // batch)}")
    if method == "esvit":
        if is_timm_backbone(m.name):
            raise ConfigError(f"method.name=esvit needs a SwinV2 backbone (multi-crop sizes and region tokens), "
                              f"not {m.name}")
        stride = m.patch_size * 2 ** ((len(m.depths) if m.depths else 4) - 1)
        if cfg.esvit.local_crops and cfg.esvit.local_crops_size % stride:
            raise ConfigError(f"esvit.local_crops_size={cfg.esvit.local_crops_size} must be a multiple of the "
                              f"backbone's stride {stride} (e.g. {max(stride, cfg.esvit.local_crops_size // stride * stride)})")
    if method == "sit" and not is_timm_backbone(m.name) and cfg.sit.drop_align % m.patch_size:
        raise ConfigError(f"sit.drop_align={cfg.sit.drop_align} must be a multiple of model.patch_size={m.patch_size}")
