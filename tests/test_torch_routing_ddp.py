"""``RoutingAttention`` under ``torch.distributed``: two gloo processes on 127.0.0.1 train a few DDP
steps; both ranks must end with identical centroids (the statistics are all-reduced before every
update), equal to single-process training on the concatenated batch.

DDP runs with ``broadcast_buffers=False`` so that it is the layer's own all-reduce, not DDP's
broadcast of rank 0's buffers, that keeps the centroids in step. Bounded: the processes are killed
after ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

pytest.importorskip("torch", reason="the torch backend needs torch (pip install 'refattn[torch]')")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refattn.backends.torch import RoutingAttention

TIMEOUT = 120.0
STEPS = 4
WORLD = 2
CONFIGS = {  # name: constructor keywords
    "tacl": dict(profile="tacl", causal=True, shared_qk=False, local_heads=1, local_block=4),
    "lucidrains": dict(profile="lucidrains", causal=False, shared_qk=False, local_heads=1, local_block=4),
}


def _model(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return RoutingAttention(dim=12, heads=3, num_clusters=3, window=5, decay=0.8, **CONFIGS[config]).double()


def _data():
    """The global batch (4 sequences; rank r takes rows 2r, 2r + 1), targets and padding, per step."""
    g = torch.Generator().manual_seed(1234)
    steps = []
    for _ in range(STEPS):
        x = torch.randn(4, 12, 12, generator=g, dtype=torch.float64)
        y = torch.randn(4, 12, 12, generator=g, dtype=torch.float64)
        mask = torch.zeros(4, 12, dtype=torch.bool)
        mask[1, 9:] = True  # 3 padded tokens on each rank: per-rank means average to the global mean
        mask[2, [1, 4, 7]] = True
        steps.append((x, y, mask))
    return steps


def _train(model, forward, rows: slice) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    layer = model.module if hasattr(model, "module") else model
    for x, y, mask in _data():
        optimizer.zero_grad()
        out = forward(x[rows], mask[rows])
        keep = (~mask[rows]).unsqueeze(-1).to(out.dtype)
        # means over the unpadded tokens; every rank holds as many, so DDP's average of the ranks'
        # gradients is the gradient of the global batch's mean (the commitment loss is such a mean too)
        loss = ((out - y[rows]) ** 2 * keep).sum() / (keep.sum() * y.shape[-1])
        (loss + layer.commitment_loss).backward()
        optimizer.step()


def _worker(rank: int, port: int, config: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(config), broadcast_buffers=False)
        _train(model, lambda x, m: model(x, m), slice(2 * rank, 2 * rank + 2))
        layer = model.module
        torch.save({"state": layer.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(config: str, out_dir: str) -> None:
    context = mp.start_processes(_worker, args=(_free_port(), config, out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2-process gloo run did not finish within {TIMEOUT:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ddp_centroids_identical_and_equal_to_single_process(config, tmp_path):
    _run_two_ranks(config, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{r}.pt")["state"] for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _model(config).train()
        initial = {k: v.clone() for k, v in single.state_dict().items()}
        _train(single, lambda x, m: single(x, m), slice(0, 4))
    finally:
        torch.set_num_threads(threads)
    expected = single.state_dict()

    for name in ("means", "counts", "sums"):
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(states[0][name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.equal(expected[name], initial[name]) or (config == "lucidrains" and name != "means")
    for name, value in expected.items():  # and DDP trained the same parameters
        torch.testing.assert_close(states[0][name], value, rtol=1e-10, atol=1e-12, msg=name)
