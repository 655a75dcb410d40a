"""The refinement window is global under data parallelism (docs/algorithm.md, "Self-refinement"): 2 gloo ranks."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spa.training.losses import RefinementWindow


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = RefinementWindow(size=50, k_percent=25.0, warmup_fraction=0.0)
        # ranks hold different values and different counts
        mine = torch.arange(4.0) + 10 * rank if rank == 0 else torch.tensor([-1.0, 20.0, 30.0])
        w.update(mine)
        out[rank] = (len(w), w.tau, w.flags(mine, step=0, total_steps=1).tolist())
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_window_is_gathered_across_ranks():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    everything = torch.tensor([0.0, 1, 2, 3, -1, 20, 30])
    tau = torch.quantile(everything.double(), 0.25).item()
    assert out[0][0] == out[1][0] == 7
    assert out[0][1] == out[1][1] == tau
    assert out[0][2] == [True, False, False, False]  # 0.0 < tau = 0.5
    assert out[1][2] == [True, False, False]
