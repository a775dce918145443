"""Run on 2 ranks (tests/test_ssl_moby.py): GlobalBatchNorm1d over two halves == BatchNorm1d over the whole batch.

Outputs, input gradients and the (summed) affine gradients are compared with the single-batch reference.
"""
import torch
import torch.distributed as dist

from models.ssl_heads import GlobalBatchNorm1d

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x = torch.randn(8 * world, 5) * 3 + 1
upstream = torch.randn(8 * world, 5)

reference = torch.nn.BatchNorm1d(5)
x_all = x.clone().requires_grad_()
expected = reference(x_all)
(expected * upstream).sum().backward()

ours = GlobalBatchNorm1d(5)
rows = slice(8 * rank, 8 * (rank + 1))
x_mine = x[rows].clone().requires_grad_()
y = ours(x_mine)
(y * upstream[rows]).sum().backward()
weight_grad = ours.weight.grad.clone()
dist.all_reduce(weight_grad)

torch.testing.assert_close(y, expected[rows].detach())
torch.testing.assert_close(x_mine.grad, x_all.grad[rows])
torch.testing.assert_close(weight_grad, reference.weight.grad)
torch.testing.assert_close(ours.running_var, reference.running_var)
print(f"rank {rank}: global batch norm matches", flush=True)
dist.destroy_process_group()
