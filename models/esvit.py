"""EsViT: DINO's self-distillation on a multi-stage (Swin) encoder, with a region-matching loss on its tokens.

Paper: `Efficient Self-supervised Vision Transformers for Representation Learning`, https://arxiv.org/abs/2106.09785

A student (encoder, view head, region head) and a teacher of the same shapes, the teacher the
momentum average of the student (updated by the trainer after each optimizer step, see
scale/ema.py: `MomentumTeacher`). The teacher sees the two global crops, the student every crop.
For each teacher global crop t and each student crop s of another view:
    view term:   CE(softmax((z_t - c) / T_t), log_softmax(z_s / T_s)) on the heads' pooled outputs;
    region term: the same on the region heads' outputs, each student token against the teacher token
                 whose backbone feature is most similar to its own (cosine, argmax), centred by c_grid;
    pair loss = (view + region) / 2 (view alone without the region loss), averaged over pairs.
"""
import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbones import backbone_tokens, build_backbone
from .ssl_heads import DINOHead
from .swin_transformer_v2 import IntOrPair, to_pair

__all__ = ["Centers", "EsViT", "build_esvit", "dino_head_flops", "match_regions"]


def match_regions(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For every student token, the index of the teacher token with the most similar feature (cosine).

    Args:
        student: (B, Ts, C) backbone features of one student crop.
        teacher: (B, Tt, C) backbone features of one teacher crop of the same images.

    Returns:
        (B, Ts) indices into the teacher's tokens.
    """
    similarity = F.normalize(student.float(), dim=-1) @ F.normalize(teacher.float(), dim=-1).transpose(1, 2)
    return similarity.argmax(dim=-1)  # B, Ts


def dino_head_flops(head: DINOHead) -> int:
    """Forward FLOPs of one row through a DINOHead (its four matmuls)."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    out_dim, bottleneck = getattr(head.prototypes, "ds_shape", head.prototypes.shape)  # ZeRO-3: the full shape
    return 2 * (sum(m.in_features * m.out_features for m in linears) + bottleneck * out_dim)


class Centers:
    """EMAs of the teacher's mean logits, one per head (DINO's `center`, EsViT's `center_grid`), in fp32.

    Not module buffers on purpose: the engine may cast those to bf16, and the centres must stay
    fp32 and equal on every rank. They start at zero everywhere and are only moved by means
    all-reduced over the ranks, so they stay equal.
    """

    def __init__(self, dims: dict[str, int], momentum: float, device: torch.device) -> None:
        self.values = {name: torch.zeros(1, dim, device=device) for name, dim in dims.items()}
        self.momentum = momentum

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor]) -> None:
        """centre = m * centre + (1 - m) * mean over every rank's rows of `logits[name]` (rows, dim). Collective."""
        sums = torch.cat([logits[name].float().sum(0) for name in self.values])
        rows = torch.tensor([float(logits[name].shape[0]) for name in self.values], device=sums.device)
        stats = torch.cat([sums, rows])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # one collective for both centres
        offset = 0
        for i, (name, center) in enumerate(self.values.items()):
            dim = center.shape[1]
            mean = stats[offset:offset + dim] / stats[len(sums) + i]
            center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
            offset += dim

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: center.clone() for name, center in self.values.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, center in self.values.items():
            center.copy_(state[name])


@contextlib.contextmanager
def input_size(encoder: nn.Module, size: IntOrPair) -> Iterator[None]:
    """The SwinV2 `encoder` set to `size` inside the `with`, back at its own size after it.

    One student encodes crops of two sizes, so its windows, masks and tables follow the crops; the
    blocks cache each size's (switching back costs no rebuild), and checkpointed blocks recompute in
    backward at the size of their forward. Its parameters stay the same, which ZeRO-3 needs.
    """
    own = encoder.img_size
    if to_pair(size) == own:
        yield
        return
    encoder.set_input_size(size, encoder.window_sizes)
    try:
        yield
    finally:
        encoder.set_input_size(own, encoder.window_sizes)


def cross_entropy(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(target * log_probs) on the last axis."""
    return -(target * log_probs).sum(-1).mean()


class EsViT(nn.Module):
    """`forward(global0, global1, *locals)` -> {"loss", "esvit/view_loss", "esvit/region_loss" (with the region
    loss), "esvit/teacher_entropy"}."""

    def __init__(self, encoder: nn.Module, teacher_encoder: nn.Module, out_dim: int = 65536,
                 dense_out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = False, region_loss: bool = True, student_temp: float = 0.1,
                 device=None, dtype=None) -> None:
        """Args:
            encoder, teacher_encoder: two headless SwinV2 of the same architecture (the teacher's drop path 0),
                at the global crops' size.
            out_dim, dense_out_dim: prototypes of the view head and of the region head.
            hidden_dim, bottleneck_dim, norm_last_layer: both heads' MLP width, bottleneck and prototype norms.
            region_loss: false trains with the view loss alone (plain DINO, no region heads).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.region_loss = region_loss
        self.student_temp = student_temp
        self.teacher_temp = 0.04  # set before every step by the task (a warmup schedule)
        width = encoder.num_features

        def heads() -> dict[str, nn.Module]:
            built = {"head": DINOHead(width, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, **dd)}
            if region_loss:
                built["dense_head"] = DINOHead(width, dense_out_dim, hidden_dim, bottleneck_dim, norm_last_layer, **dd)
            return built

        self.encoder = encoder
        for name, head in heads().items():
            self.add_module(name, head)
        # no gradients; the trainer makes it the student's EMA
        self.teacher = nn.ModuleDict({"encoder": teacher_encoder, **heads()})
        self.teacher.requires_grad_(False)
        self.centers: Optional[Centers] = None  # attached by the trainer, outside ZeRO-3's init

    @property
    def student(self) -> nn.ModuleDict:
        """The modules that train and that the teacher averages (same names as `teacher`)."""
        return nn.ModuleDict({name: getattr(self, name) for name in self.teacher})

    def teach(self, global0: torch.Tensor, global1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's fp32 logits: "head" (2, B, K) and "dense_head" (2, B, T, K'), features (2, B, T, C)."""
        with torch.no_grad():
            pooled, tokens = backbone_tokens(self.teacher["encoder"], torch.cat([global0, global1]))
            out = {"head": self.teacher["head"](pooled).float().unflatten(0, (2, -1))}
            if self.region_loss:
                out["dense_head"] = self.teacher["dense_head"](tokens).float().unflatten(0, (2, -1))
                out["features"] = tokens.unflatten(0, (2, -1))
        return out

    def learn(self, crops: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """The student's fp32 log-probabilities per crop ("head" (B, K), "dense_head" (B, T, K')), features (B, T, C).

        One encoder pass per crop size (the two globals, then the locals) and one call per head,
        as EsViT batches them.
        """
        groups = [crops[:2]] + ([crops[2:]] if len(crops) > 2 else [])  # one per crop size
        pooled, tokens = [], []
        for group in groups:
            with input_size(self.encoder, group[0].shape[-2:]):
                p, t = backbone_tokens(self.encoder, torch.cat(group))
            pooled += p.chunk(len(group))
            tokens += t.chunk(len(group))
        out = {"head": self.head(torch.cat(pooled)).float().div(self.student_temp).log_softmax(-1)
               .chunk(len(crops))}
        if self.region_loss:
            counts = [t.shape[0] * t.shape[1] for t in tokens]  # rows per crop: B * its tokens
            logits = self.dense_head(torch.cat([t.flatten(0, 1) for t in tokens])).float()
            out["dense_head"] = [part.view(*t.shape[:2], -1).div(self.student_temp).log_softmax(-1)
                                 for part, t in zip(logits.split(counts), tokens)]
            out["features"] = tokens
        return out

    def forward(self, global0: torch.Tensor, global1: torch.Tensor,
                *local_crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.centers is None:
            raise RuntimeError("EsViT.centers is not set: attach Centers before training")
        teacher = self.teach(global0, global1)
        student = self.learn([global0, global1, *local_crops])
        targets = {name: ((teacher[name] - self.centers.values[name]) / self.teacher_temp).softmax(-1)
                   for name in self.centers.values}
        view_terms, region_terms = [], []
        for t in range(2):
            for s in range(len(student["head"])):
                if s == t:  # the same view: no loss
                    continue
                view_terms.append(cross_entropy(targets["head"][t], student["head"][s]))
                if self.region_loss:
                    matched = match_regions(student["features"][s].detach(), teacher["features"][t])  # B, Ts
                    # CE of every student token against every teacher token (one batched matmul: the targets are
                    # not copied per pair), of which each token keeps its matched one
                    scores = torch.bmm(student["dense_head"][s], targets["dense_head"][t].transpose(1, 2))
                    region_terms.append(-scores.gather(2, matched.unsqueeze(-1)).mean())
        view_loss = torch.stack(view_terms).mean()
        extras = {"esvit/view_loss": view_loss.detach()}
        loss = view_loss
        if self.region_loss:
            region_loss = torch.stack(region_terms).mean()
            loss = (view_loss + region_loss) / 2
            extras["esvit/region_loss"] = region_loss.detach()
        probs = targets["head"]
        extras["esvit/teacher_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        # after the loss: this batch moves the centres from the next step on (DINO's order)
        self.centers.update({name: teacher[name].flatten(0, -2) for name in self.centers.values})
        return {"loss": loss, **extras}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the student encoder's blocks (the teacher keeps no activations)."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Name keywords trained without weight decay (1-D parameters come on top)."""
        return set(self.encoder.no_weight_decay())


def build_esvit(name: str, out_dim: int = 65536, dense_out_dim: int = 65536, hidden_dim: int = 2048,
                bottleneck_dim: int = 256, norm_last_layer: bool = False, region_loss: bool = True,
                student_temp: float = 0.1, **overrides: Any) -> EsViT:
    """EsViT around SwinV2 `name` at the global crops' size (`img_size`); the teacher's drop path is 0."""
    encoder = build_backbone(name, **overrides)
    teacher = build_backbone(name, **{**overrides, "drop_path_rate": 0.0})
    return EsViT(encoder, teacher, out_dim, dense_out_dim, hidden_dim, bottleneck_dim, norm_last_layer, region_loss,
                 student_temp, device=overrides.get("device"), dtype=overrides.get("dtype"))
