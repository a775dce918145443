"""Image classification fine-tuning as a task, at one resolution stage after another.

The recipe of Microsoft's SwinV2 fine-tunes: RandAugment and random erasing (timm transforms),
mixup/cutmix with label smoothing (timm `Mixup`, always soft targets), layer-wise LR decay,
stochastic depth (`model.drop_path_rate`), an optional fp32 EMA of the weights, and top-1/top-5
on the validation split at each stage's resolution. `set_stage` moves the partitioned model to a
new resolution and window: coordinate tables are rebuilt, the log-CPB MLP and every weight kept,
and coordinates stay normalised by the windows the MLP was pretrained at.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from torch import nn

import data
from scale.ema import WeightEMA
from scale.param_groups import build_param_groups
from scale.tasks.base import Task, apply_runtime_switches


def mixes(recipe: Any) -> bool:
    """Whether the recipe mixes images (mixup or cutmix), which needs an even micro-batch."""
    return recipe.mixup > 0 or recipe.cutmix > 0


class ClassifierWithLoss(nn.Module):
    """A SwinV2 classifier whose forward returns the soft-target cross-entropy when given targets."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        """(B, 3, H, W) images -> logits (B, classes); with (B, classes) soft targets -> {"loss": scalar}."""
        logits = self.encoder(images)
        if targets is None:
            return logits
        # in fp32: a bf16 log-softmax over 1000 classes loses the small probabilities label smoothing puts there
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return {"loss": loss}


class ClassificationTask(Task):
    """Supervised fine-tuning of a SwinV2 classifier; `cfg` is a `FinetuneConfig` with num_classes resolved."""

    name = "classification"

    def __init__(self, cfg: Any, info: Any, log: Callable[[str], None] = print) -> None:
        super().__init__(cfg, info, log)
        f = cfg.finetune
        self.num_classes = f.num_classes
        # timm's Mixup needs an even batch even when it never mixes: without mixing, targets are only smoothed
        self.mixup = data.build_mixup(self.num_classes, mixup=f.mixup, cutmix=f.cutmix,
                                      label_smoothing=f.label_smoothing) if mixes(f) else None
        self.stage = cfg.stages[0]
        self.ema: WeightEMA | None = None

    def build_model(self) -> nn.Module:
        import models

        encoder = models.build_model(self.cfg.model.name, num_classes=self.num_classes, **self.cfg.model.build_args())
        apply_runtime_switches(encoder, self.cfg.model)
        return ClassifierWithLoss(encoder)

    def setup(self, engine: Any) -> None:
        if self.cfg.finetune.ema_decay > 0:
            self.ema = WeightEMA(engine, self.cfg.finetune.ema_decay)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decay = self.cfg.finetune.layer_decay
        return build_param_groups(model, self.cfg.optim.weight_decay, layer_decay=decay if decay < 1 else None)

    def set_stage(self, stage: Any, model: nn.Module) -> None:
        """Move the (possibly partitioned) classifier to `stage`'s resolution and window."""
        self.stage = stage
        model.encoder.set_input_size(stage.img_size, stage.window_size,
                                     pretrained_window_sizes=self.cfg.model.pretrained_window_sizes)

    def train_transform(self) -> Callable:
        f = self.cfg.finetune
        return data.build_finetune_transform(self.stage.img_size, auto_augment=f.auto_augment or None,
                                             re_prob=f.re_prob, color_jitter=f.color_jitter,
                                             scale=tuple(f.crop_scale))

    def eval_transform(self) -> Callable:
        """Resize and centre crop at the current stage's resolution."""
        return data.build_eval_transform(self.stage.img_size, crop_pct=self.cfg.finetune.eval_crop_pct)

    def inputs(self, batch: dict[str, Any], engine: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(engine.info.device, non_blocking=True).float()  # normalised by timm's transform
        labels = batch["label"].to(engine.info.device, non_blocking=True)
        # mixed in fp32, then cast for the model; targets are always soft (label smoothing, mixup/cutmix)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        else:
            targets = mixup_target(labels, self.num_classes, smoothing=self.cfg.finetune.label_smoothing)
        return images.to(engine.dtype), targets

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        if self.ema is not None:
            self.ema.update()

    def flops_per_image(self, model: nn.Module) -> int:
        import models

        return models.estimate_flops(model.encoder)

    @torch.no_grad()
    def evaluate(self, engine: Any, loader: Any) -> dict[str, float]:
        """top1/top5 (%) over `loader` on every rank, and `ema_top1`/`ema_top5` with the EMA weights if on.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        """
        results = self._accuracy(engine, loader, prefix="")
        if self.ema is not None:
            with self.ema.applied():
                results.update(self._accuracy(engine, loader, prefix="ema_"))
        return results

    def _accuracy(self, engine: Any, loader: Any, prefix: str) -> dict[str, float]:
        import deepspeed.comm as dist

        counts = torch.zeros(3, dtype=torch.float64, device=engine.info.device)  # top1 hits, top5 hits, images
        with engine.evaluating() as module:
            for batch in loader:
                images = batch["image"].to(engine.info.device).to(engine.dtype)
                labels = batch["label"].to(engine.info.device)
                top5 = module(images).float().topk(min(5, self.num_classes), dim=-1).indices
                hits = top5 == labels[:, None]
                counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=-1).sum().item(), len(labels)],
                                       dtype=torch.float64, device=counts.device)
        dist.all_reduce(counts)
        return {f"{prefix}top1": 100.0 * float(counts[0] / counts[2]),
                f"{prefix}top5": 100.0 * float(counts[1] / counts[2])}

    def model_args(self) -> dict[str, Any]:
        return {"kind": "classifier", **super().model_args(), "img_size": self.stage.img_size,
                "window_size": self.stage.window_size, "num_classes": self.num_classes,
                "pretrained_window_sizes": self.cfg.model.pretrained_window_sizes}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
