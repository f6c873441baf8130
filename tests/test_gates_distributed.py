"""RandomGate under DistributedDataParallel: 2 processes, gloo, CPU, no find_unused_parameters.

The documented setup: `RandomGate(..., ddp=True)` (or `GateCallback`, which turns it on when the model is DDP-wrapped)
keeps the off branches on the graph through a zero-cost term, so DDP's reducer gets a gradient for every parameter;
`gate.sample(step=...)` draws the same branches on every rank with no communication; `clear_off_grads(model)` after
backward (the all-reduce is done) and before `optimizer.step()` gives the off branches `grad=None` again, so momentum and
weight decay do not move them.
"""
import os, socket
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.distributed


def leave_process_group():
    "End a spawned rank cleanly: meet the peer, tear the group down, and exit without C++ teardown."
    dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
    dist.destroy_process_group()
    os._exit(0)      # gloo threads sometimes abort the interpreter's exit ('terminate called ...')


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def supernet():
    from weightdrop.gates import RandomGate
    torch.manual_seed(0)
    return nn.Sequential(
        RandomGate(nn.Linear(6, 8), nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(6, 8), combine='sum', ddp=True),
        nn.ReLU(),
        RandomGate(nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4), k=2, combine='cat', ddp=True, seed=1),
        nn.Linear(12, 1))


def _torch_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from weightdrop.gates import gates, clear_off_grads
    res = {}
    for opt_name in ('sgd', 'adamw'):
        model = supernet()
        ddp = nn.parallel.DistributedDataParallel(model)   # find_unused_parameters defaults to False
        opt = (torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01) if opt_name == 'sgd'
               else torch.optim.AdamW(ddp.parameters(), lr=0.01, weight_decay=0.1))
        gen = torch.Generator().manual_seed(100 + rank)   # each rank its own data
        choices, off_still, local_grads = [], True, []
        for step in range(12):
            for g in gates(model).values(): g.sample(step=step)
            x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
            before = {n: q.detach().clone() for n, q in model.named_parameters()}
            loss = (ddp(x) - y).pow(2).mean()
            loss.backward()
            clear_off_grads(model)
            off = {id(q) for g in gates(model).values() for q in g.off_params}
            assert all((q.grad is None) == (id(q) in off) for q in model.parameters())
            opt.step(); opt.zero_grad(set_to_none=True)
            for n, q in model.named_parameters():
                if id(q) in off and not torch.equal(q, before[n]): off_still = False
            choices.append([g.last_choice for g in gates(model).values()])
        flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
        res[opt_name] = dict(choices=choices, off_still=off_still, flat=flat)
    torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    leave_process_group()


def test_ddp_two_ranks_same_choices_identical_weights_off_params_still(tmp_path):
    mp.spawn(_torch_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    init = torch.cat([q.detach().reshape(-1) for q in supernet().parameters()])
    for opt in ('sgd', 'adamw'):
        assert r0[opt]['choices'] == r1[opt]['choices']              # same branches on both ranks, no communication
        assert len({str(c) for c in r0[opt]['choices']}) > 1          # and they do change from step to step
        assert torch.equal(r0[opt]['flat'], r1[opt]['flat'])          # ranks' weights identical
        assert not torch.equal(r0[opt]['flat'], init)                 # and they trained
        assert r0[opt]['off_still'] and r1[opt]['off_still']          # off branches never moved


def _check_grad_is_mean_worker(rank, world, port, out_dir):
    "The on branch's all-reduced gradient is the mean of the ranks' local gradients (not divided by the world size twice)."
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from weightdrop.gates import gates, clear_off_grads
    model = supernet(); ref = supernet()
    ddp = nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(7 + rank)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
    for m in (model, ref):
        for g in gates(m).values(): g.sample(step=3)
    (ddp(x) - y).pow(2).mean().backward(); clear_off_grads(model)
    (ref(x) - y).pow(2).mean().backward(); clear_off_grads(ref)
    ok = True
    for q, r in zip(model.parameters(), ref.parameters()):
        if (q.grad is None) != (r.grad is None): ok = False; continue
        if r.grad is None: continue
        mean = r.grad.clone(); dist.all_reduce(mean); mean /= world
        ok &= torch.allclose(q.grad, mean, atol=1e-6)
    torch.save(ok, os.path.join(out_dir, f'ok{rank}.pt'))
    leave_process_group()


def test_ddp_grad_is_mean_of_rank_grads(tmp_path):
    mp.spawn(_check_grad_is_mean_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / 'ok0.pt') and torch.load(tmp_path / 'ok1.pt')


def _fastai_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from fastai.basics import Learner, DataLoaders, MSELossFlat, SGD
    from weightdrop.gate_callbacks import GateCallback
    model = supernet()
    for g in model.modules():
        if hasattr(g, 'ddp'): g.ddp = False      # GateCallback must turn it on by itself for a DDP model
    ddp = nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(96, 6, generator=gen); y = x[:, :1] - x[:, 1:2]
    dls = DataLoaders.from_dsets(list(zip(x[:64], y[:64])), list(zip(x[64:], y[64:])), bs=16, shuffle=False, num_workers=0)
    cb = GateCallback(seed=5)
    learn = Learner(dls, ddp, loss_func=MSELossFlat(), opt_func=lambda *a, **k: SGD(*a, mom=0.9, **k), wd=0.01, cbs=cb)
    with learn.no_logging(): learn.fit(2, 1e-2)
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    torch.save(dict(flat=flat, counts=cb.counts), os.path.join(out_dir, f'rank{rank}.pt'))
    leave_process_group()


def test_ddp_fastai_gate_callback(tmp_path):
    mp.spawn(_fastai_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    assert r0['counts'] == r1['counts'] and sum(r0['counts']['0']) == 2 * 4
    assert torch.equal(r0['flat'], r1['flat'])
