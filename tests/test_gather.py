"""model.gather_negatives: every worker's candidates in each worker's softmax, with gradients, through
a real 2-process gloo group (what Ray Train's CPU workers use)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.support import free_port


def _worker(rank: int, port: int, out: dict, dtype) -> None:
    import torch.distributed as dist

    from bundlerec.model.two_tower import gather_candidates

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        n = 3 + rank  # the two workers' batches differ in size
        cand = (torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 100 * rank).to(dtype).requires_grad_(True)
        items = torch.arange(n) + 10 * rank
        log_q = torch.full((n,), -float(rank + 1))
        c, i, q = gather_candidates(cand, items, log_q)
        # the loss of rank 0 touches only rank 1's columns; rank 1's loss is 0: rank 1 still gets gradients
        loss = c[n:].float().sum() * (1.0 if rank == 0 else 0.0)
        loss.backward()
        out[rank] = {"shape": tuple(c.shape), "items": i.tolist(), "log_q": q.tolist(), "own_first": bool(torch.equal(c[:n], cand)),
                     "grad": cand.grad.float().tolist()}
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidates_of_every_worker_own_first_with_gradients(dtype):
    # a spawned manager, never a forked one: forking this process (which holds the suite's Ray driver
    # and its gRPC threads) left the driver's GCS calls hanging for the rest of the suite (stop 36)
    with mp.get_context("spawn").Manager() as m:
        out = m.dict()
        mp.spawn(_worker, args=(free_port(), out, dtype), nprocs=2, join=True)
        out = dict(out)
    assert out[0]["shape"] == out[1]["shape"] == (7, 4)
    assert out[0]["items"] == [0, 1, 2, 10, 11, 12, 13] and out[1]["items"] == [10, 11, 12, 13, 0, 1, 2]
    assert out[0]["log_q"] == [-1.0] * 3 + [-2.0] * 4 and out[0]["own_first"] and out[1]["own_first"]
    assert out[1]["grad"] == [[1.0] * 4] * 4  # rank 0's loss reached rank 1's embeddings
    assert out[0]["grad"] == [[0.0] * 4] * 3  # nobody's loss used rank 0's columns


def test_without_a_process_group_the_candidates_are_unchanged():
    from bundlerec.model.two_tower import gather_candidates

    c, i, q = torch.ones(2, 3), torch.tensor([5, 6]), torch.zeros(2)
    assert gather_candidates(c, i, q) == (c, i, q)
    assert os.environ.get("WORLD_SIZE") in (None, "1")
