"""SiT v3: GMML reconstruction of corrupted pixels plus a contrastive loss against a momentum teacher.

Paper: `SiT: Self-supervised vIsion Transformer`, https://arxiv.org/abs/2104.03602 (v3)

The student sees block-corrupted views (blocks zero-filled after normalisation, or pasted from
another image of the batch), the teacher the clean ones. The student reconstructs the clean pixels
from its final tokens (L1 on the corrupted pixels only) and its pooled feature is contrasted with the
teacher's feature of the other view, the keys gathered from every rank (MoCo v3's loss, scaled by 2 tau):
    L = 2 tau CE(q0 K1^T / tau) + 2 tau CE(q1 K0^T / tau) + recon_weight * L1_corrupted.
The teacher (encoder, projector) is the student's EMA, updated by the trainer (scale/ema.py: `MomentumTeacher`).
"""
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbones import backbone_stride, backbone_tokens, build_backbone
from .moby import gather_ranks
from .simmim import pixel_decoder
from .ssl_heads import ProjectionMLP

__all__ = ["ReconstructionHead", "SiT", "build_sit", "contrastive_loss", "corrupt", "masked_l1"]


def corrupt(images: torch.Tensor, mask: torch.Tensor, replace: torch.Tensor) -> torch.Tensor:
    """GMML's corruption of (B, 3, H, W) normalised images where the (B, H, W) mask is 1.

    The masked pixels become 0 (the mean colour), or, for the images whose `replace` (B,) is set, the
    pixels of the batch's previous image: a fixed neighbour rather than SiT's random one, so every
    rank corrupts without drawing random numbers on the device.
    """
    donor = torch.where(replace.view(-1, 1, 1, 1).bool(), images.roll(1, dims=0), torch.zeros_like(images))
    return torch.where(mask.unsqueeze(1).bool(), donor, images)


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the channels of the pixels where the (B, H, W) mask is 1, in fp32.

    SiT's `drop_only`: the clean pixels are the input itself, so they would teach only copying.
    """
    weight = mask.unsqueeze(1).float()  # B, 1, H, W
    error = (prediction.float() - target.float()).abs() * weight
    return error.sum() / (weight.sum() * prediction.shape[1]).clamp(min=1)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of L2-normalised queries against the keys of every rank, positives at this rank's rows.

    Scaled by 2 tau as in MoCo v3, so the gradient's size does not follow the temperature.
    """
    keys = gather_ranks(k)  # the teacher's, no gradient: the plain all-gather is enough
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(q @ keys.T / temperature, labels) * (2 * temperature)


class ReconstructionHead(nn.Module):
    """SiT's RECHead: `depth` x (Linear + GELU) on every token, then each token's stride x stride pixels.

    The pixel layer is SimMIM's decoder (a per-token linear map + PixelShuffle), which is what SiT's
    ConvTranspose2d with kernel = stride computes.
    """

    def __init__(self, dim: int, stride: int, depth: int = 3, in_chans: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.stride = stride
        self.mlp = nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(dim, dim, **dd), nn.GELU())])
        self.pixels = pixel_decoder(dim, stride, in_chans, **dd)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) final tokens of (H, W) = `size` images -> (B, in_chans, H, W) pixels."""
        grid = (size[0] // self.stride, size[1] // self.stride)
        return self.pixels(self.mlp(tokens).transpose(1, 2).unflatten(2, grid))


class SiT(nn.Module):
    """`forward(view0, view1, corrupt0, corrupt1, replace)` -> {"loss", "sit/recon_loss", ...}."""

    def __init__(self, encoder: nn.Module, teacher_encoder: nn.Module, proj_dim: int = 256, hidden_dim: int = 4096,
                 temperature: float = 0.2, recon_weight: float = 1.0, decoder_depth: int = 3,
                 device=None, dtype=None) -> None:
        """Args:
            encoder, teacher_encoder: two headless backbones of the same architecture (the teacher's drop path 0).
            proj_dim, hidden_dim: output and hidden width of the pooled-feature head (256, 4096).
            recon_weight: lambda of the reconstruction loss.
            decoder_depth: hidden layers of the reconstruction head (SiT: 3; 0 = SimMIM's linear decoder).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.temperature, self.recon_weight = temperature, recon_weight

        def head() -> ProjectionMLP:  # SiT v3's CLSHead; batch norms over every rank's batch
            dims = (encoder.num_features, hidden_dim, hidden_dim, proj_dim)
            return ProjectionMLP(dims, out_norm=True, act=nn.ReLU, last_act=nn.GELU, **dd)

        self.encoder = encoder
        self.projector = head()
        self.decoder = ReconstructionHead(encoder.num_features, backbone_stride(encoder), decoder_depth, **dd)
        # no decoder on the teacher: it only gives keys; the trainer makes it the student's EMA
        self.teacher = nn.ModuleDict({"encoder": teacher_encoder, "projector": head()})
        self.teacher.requires_grad_(False)

    @property
    def student(self) -> nn.ModuleDict:
        """The student modules that the teacher averages (same names as `teacher`)."""
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def student_pass(self, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled feature (B, C), reconstructed pixels (B, 3, H, W)) of one encoder pass over corrupted images."""
        pooled, tokens = backbone_tokens(self.encoder, corrupted)
        return pooled, self.decoder(tokens, corrupted.shape[-2:])

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor,
                    replace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the student sees, what it reconstructs) for (B, 3, H, W) clean normalised images."""
        corrupted = corrupt(images, mask, replace)
        return corrupted, self.student_pass(corrupted)[1]

    def forward(self, view0: torch.Tensor, view1: torch.Tensor, corrupt0: torch.Tensor, corrupt1: torch.Tensor,
                replace: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: two (B, 3, H, W) normalised views, their (B, H, W) corruption masks (1 = corrupted) and the
        (B,) flags of the images whose masked pixels are pasted from another image instead of zero-filled."""
        # both views in one pass per encoder (as SiT does): half the ZeRO-3 gathers, and the
        # heads' batch norms see both views together
        clean = torch.cat([view0, view1])
        masks = torch.cat([corrupt0, corrupt1])
        pooled, recon = self.student_pass(torch.cat([corrupt(view0, corrupt0, replace),
                                                     corrupt(view1, corrupt1, replace)]))
        q0, q1 = F.normalize(self.projector(pooled).float(), dim=-1).chunk(2)
        with torch.no_grad():
            k0, k1 = F.normalize(self.teacher["projector"](self.teacher["encoder"](clean)).float(), dim=-1).chunk(2)
        contrastive = contrastive_loss(q0, k1, self.temperature) + contrastive_loss(q1, k0, self.temperature)
        recon_loss = masked_l1(recon, clean, masks)
        positive = ((q0 * k1).sum(-1).mean() + (q1 * k0).sum(-1).mean()) / 2
        return {"loss": contrastive + self.recon_weight * recon_loss, "sit/recon_loss": recon_loss.detach(),
                "sit/contrastive_loss": contrastive.detach(), "sit/positive_similarity": positive.detach()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the student encoder's blocks (the teacher keeps no activations)."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Name keywords trained without weight decay (1-D parameters come on top)."""
        hook = getattr(self.encoder, "no_weight_decay", None)
        return set(hook()) if callable(hook) else set()


def build_sit(name: str, proj_dim: int = 256, hidden_dim: int = 4096, temperature: float = 0.2,
              recon_weight: float = 1.0, decoder_depth: int = 3, **overrides: Any) -> SiT:
    """SiT around backbone `name` (SwinV2 or a timm ViT); overrides go to both encoders, the teacher's drop path 0."""
    encoder = build_backbone(name, **overrides)
    teacher = build_backbone(name, **{**overrides, "drop_path_rate": 0.0})
    return SiT(encoder, teacher, proj_dim, hidden_dim, temperature, recon_weight, decoder_depth,
               device=overrides.get("device"), dtype=overrides.get("dtype"))
