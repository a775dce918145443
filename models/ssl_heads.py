"""Projection heads of the self-supervised methods (MoBY, EsViT/DINO, SiT) and a batch norm synced over ranks.

Plain PyTorch; the only collective is `GlobalBatchNorm1d`'s all-reduce of batch statistics.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

__all__ = ["GlobalBatchNorm1d", "ProjectionMLP", "DINOHead"]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: every rank's loss depends on the sum.

    Ours because torch.distributed.nn's differentiable all_reduce is deprecated and the functional
    collectives that replace it document no backward for all_reduce.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every rank (the papers' SyncBN).

    Ours because torch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU");
    this one all-reduces [sum, sum of squares, count] once per call on any device, differentiably,
    in fp32 (bf16 sums of 4096-wide batches lose the variance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        count = torch.full((1, x.shape[1]), float(x.shape[0]), device=x.device)
        stats = _SumOverRanks.apply(torch.cat([x32.sum(0, keepdim=True), (x32 * x32).sum(0, keepdim=True), count]))
        n = stats[2]
        mean = stats[0] / n
        var = (stats[1] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


class ProjectionMLP(nn.Module):
    """Linear -> BN -> activation, repeated, then Linear (-> BN without affine): MoBY's and SiT's heads.

    Args:
        dims: widths from input to output, e.g. (768, 4096, 256) for MoBY's two-layer MLP.
        out_norm: a parameter-free batch norm on the output (SiT v3's CLS head).
        act: activation of each hidden layer; `last_act` that of the last hidden layer (SiT: GELU).
    """

    def __init__(self, dims: tuple[int, ...], out_norm: bool = False, act: type[nn.Module] = nn.ReLU,
                 last_act: Optional[type[nn.Module]] = None, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-2], dims[1:-1])):
            hidden_act = last_act if last_act is not None and i == len(dims) - 3 else act
            layers += [nn.Linear(a, b, **dd), GlobalBatchNorm1d(b, **dd), hidden_act()]
        layers.append(nn.Linear(dims[-2], dims[-1], **dd))
        if out_norm:
            layers.append(GlobalBatchNorm1d(dims[-1], affine=False, **dd))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's head: 3-layer GELU MLP to a bottleneck, L2 normalisation, weight-normalised prototypes.

    The prototype layer computes normalize(V, dim=1) @ x explicitly instead of torch's weight_norm
    hook: the hook rebuilds `weight` before forward, which under ZeRO-3 can run before the
    parameters are gathered. `norm_last_layer` fixes the prototype norms to 1 (no magnitude
    parameter), as DINO's option of that name does.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim, **dd), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim, **dd), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim, **dd))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim, **dd))  # weight-norm direction V
        if norm_last_layer:  # g fixed at 1: a buffer, so no frozen parameter sits in the optimizer's way
            self.register_buffer("scale", torch.ones(out_dim, 1, **dd))
        else:
            self.scale = nn.Parameter(torch.ones(out_dim, 1, **dd))  # g
        # through Module.apply: the Linear layers are partitioned already under deepspeed.zero.Init,
        # which gathers a module's weights only around apply (a direct init would change nothing)
        self.mlp.apply(_init_linear)
        trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) logits."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=1) * self.scale)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
