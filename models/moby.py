"""MoBY: self-supervised learning with MoCo v2 and BYOL ideas on a Swin (or ViT) encoder.

Paper: `Self-Supervised Learning with Swin Transformers`, https://arxiv.org/abs/2105.04553

An online branch (encoder, projector, predictor) and a target branch (encoder, projector) of the
same shapes; the target is the momentum average of the online one (updated by the trainer after
each optimizer step, see scale/ema.py: `MomentumTeacher`). Two queues of past target keys, one
per view; each online view is contrasted with the other view's key and that view's queue:
    L = CE([q1.k2, q1.Q2^T] / tau) + CE([q2.k1, q2.Q1^T] / tau), label 0.
"""
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone
from .ssl_heads import ProjectionMLP

__all__ = ["KeyQueues", "MoBY", "build_moby", "gather_ranks"]


def gather_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` from every rank, in rank order (no gradient); `x` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class KeyQueues:
    """MoBY's two fp32 queues of L2-normalised keys (one per view) and their shared write pointer.

    Not a module on purpose: the engine casts module buffers to bf16, and the queues must stay fp32
    and equal on every rank. They start from the same seed on every rank and are only ever
    written with keys gathered from all ranks, so they stay equal.
    """

    def __init__(self, num_views: int, dim: int, size: int, seed: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.keys = F.normalize(torch.randn(num_views, size, dim, generator=generator), dim=-1).to(device)
        self.ptr = 0

    def push(self, keys: list[torch.Tensor]) -> None:
        """Write each view's keys, gathered from every rank, at the pointer; advance it. Collective."""
        gathered = [gather_ranks(k.detach().float()) for k in keys]
        n, size = gathered[0].shape[0], self.keys.shape[1]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
        for view, k in enumerate(gathered):
            self.keys[view, self.ptr:self.ptr + n] = k
        self.ptr = (self.ptr + n) % size

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys.clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys.copy_(state["keys"])
        self.ptr = int(state["ptr"])


class MoBY(nn.Module):
    """`forward(view0, view1)` -> {"loss", "positive_similarity", "negative_similarity"}."""

    def __init__(self, encoder: nn.Module, target_encoder: nn.Module, proj_dim: int = 256, hidden_dim: int = 4096,
                 temperature: float = 0.2, device=None, dtype=None) -> None:
        """Args:
            encoder, target_encoder: two headless backbones of the same architecture (the target's drop path 0).
            proj_dim, hidden_dim: output and hidden width of projector and predictor (256, 4096).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.temperature = temperature
        self.encoder = encoder
        self.projector = ProjectionMLP((encoder.num_features, hidden_dim, proj_dim), **dd)
        self.predictor = ProjectionMLP((proj_dim, hidden_dim, proj_dim), **dd)
        # the target branch (teacher): no predictor, no gradients; the trainer makes it the online branch's EMA
        self.teacher = nn.ModuleDict({"encoder": target_encoder,
                                      "projector": ProjectionMLP((encoder.num_features, hidden_dim, proj_dim), **dd)})
        self.teacher.requires_grad_(False)
        self.queues: Optional[KeyQueues] = None  # attached by the trainer, outside ZeRO-3's init

    @property
    def student(self) -> nn.ModuleDict:
        """The online modules that the target averages (same names as `teacher`)."""
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def contrast(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """InfoNCE of queries `q` against their positive keys `k` and the queue's negatives (fp32)."""
        positive = (q * k).sum(-1, keepdim=True)  # B, 1
        negative = q @ queue.T  # B, K
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), positive.mean(), negative.mean()

    def forward(self, view0: torch.Tensor, view1: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.queues is None:
            raise RuntimeError("MoBY.queues is not set: attach KeyQueues before training")
        q0, q1 = (F.normalize(self.predictor(self.projector(self.encoder(v))), dim=-1).float() for v in (view0, view1))
        with torch.no_grad():
            k0, k1 = (F.normalize(self.teacher["projector"](self.teacher["encoder"](v)), dim=-1).float()
                      for v in (view0, view1))
        # a snapshot: backward needs the negatives as they were, and push() overwrites the queues in place
        negatives = self.queues.keys.clone()
        loss0, pos0, neg0 = self.contrast(q0, k1, negatives[1])
        loss1, pos1, neg1 = self.contrast(q1, k0, negatives[0])
        self.queues.push([k0, k1])  # after the loss: this batch's keys are negatives from the next step on
        return {"loss": loss0 + loss1, "moby/positive_similarity": (pos0 + pos1).detach() / 2,
                "moby/negative_similarity": (neg0 + neg1).detach() / 2}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the online encoder's blocks (the target keeps no activations)."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Name keywords trained without weight decay (1-D parameters come on top)."""
        hook = getattr(self.encoder, "no_weight_decay", None)
        return set(hook()) if callable(hook) else set()


def build_moby(name: str, proj_dim: int = 256, hidden_dim: int = 4096, temperature: float = 0.2,
               **overrides: Any) -> MoBY:
    """MoBY around backbone `name` (SwinV2 or a timm ViT); overrides go to both encoders, the target's drop path is 0."""
    encoder = build_backbone(name, **overrides)
    target = build_backbone(name, **{**overrides, "drop_path_rate": 0.0})
    return MoBY(encoder, target, proj_dim, hidden_dim, temperature, device=overrides.get("device"),
                dtype=overrides.get("dtype"))
