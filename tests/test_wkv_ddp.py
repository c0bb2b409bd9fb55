"""Two-process gloo DistributedDataParallel through `wkv7` (the reference path on CPU): grads equal
the single-process grads of the same global batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, T, H, N = 4, 6, 2, 4
C = H * N


class TinyWKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(C, 6 * C)
        self.state0 = torch.nn.Parameter(torch.randn(H, N, N) * 0.1)

    def forward(self, x):
        from edge_rwkv.cuda_kernels import wkv7

        bsz = x.shape[0]
        r, w, k, v, kk, g = self.proj(x).view(bsz, T, 6, H, N).unbind(2)
        kk = torch.nn.functional.normalize(kk, dim=-1)
        y, s = wkv7(r, w, k, v, -kk, kk * torch.sigmoid(g), self.state0.expand(bsz, H, N, N))
        return (y ** 2).mean() + s.pow(2).mean()


def _data():
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))


def _worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(TinyWKV())
    x = _data().chunk(world)[rank]
    model(x).backward()
    if rank == 0:
        # numpy arrays travel by value; torch tensors would be shared through a descriptor that
        # vanishes if this process exits before the parent reads the queue
        q.put({n: p.grad.detach().numpy().copy() for n, p in model.module.named_parameters()})
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_grads_match_single_process():
    model = TinyWKV()
    model(_data()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for n, g in ref.items():
        torch.testing.assert_close(torch.from_numpy(got[n]), g, rtol=1e-5, atol=1e-6)


