"""MD on GPUs under MPI (issue 21), the parts that run without a GPU: each rank's device, and the host staging of
the ghost exchange (pinned buffers on CUDA; on the CPU the same arrays the exchange always used)."""

import numpy as np
import torch

from dpmd.md.domain import HostStage
from dpmd.md.parallel import rank_device


class _Node:
    def __init__(self, local_rank):
        self.local_rank = local_rank

    def Split_type(self, kind):   # what the node-local communicator answers
        return self

    def Get_rank(self):
        return self.local_rank


def test_cuda_under_mpi_is_the_node_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [rank_device("cuda", _Node(r)) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert rank_device("cuda:1", _Node(0)) == "cuda:1"     # an explicit GPU is the user's choice
    assert rank_device("cpu", _Node(3)) == "cpu"
    assert rank_device("cuda", None) == "cuda"              # not under MPI


def test_host_stage_round_trip_and_buffer_reuse():
    stage = HostStage()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert np.array_equal(stage.to_host("local", x), x.numpy())
    a = stage.buffer("ghosts", (4, 3))
    a[:] = 1.5
    b = stage.buffer("ghosts", (2, 3))       # a smaller exchange reuses the buffer
    assert np.shares_memory(a, b) and np.all(b == 1.5)
    back = stage.to_device(a, torch.zeros(1, dtype=torch.float32))
    assert back.dtype == torch.float32 and torch.equal(back, torch.full((4, 3), 1.5))
