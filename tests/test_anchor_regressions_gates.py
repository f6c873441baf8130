"""Anchor regressions, random gates (ANCHORS.md "Random gates"): each test reproduces a defect users hit with the
public implementations (NNI, SPOS, Once-for-all, timm/torchvision drop path, DDP with supernets, weight decay on
inactive branches) and shows it cannot happen with weightdrop's RandomGate. Self-contained: no conftest changes."""
import os, random, socket
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from weightdrop.gates import RandomGate, clear_off_grads, recalibrate_bn, stochastic_depth, gates


def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _choices(global_seed, steps=16):
    "One 'rank': its own global RNG state, a gate built from the same config."
    torch.manual_seed(global_seed); random.seed(global_seed); np.random.seed(global_seed)
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(4)], combine='sum', seed=0)
    out = []
    with torch.no_grad():
        for step in range(steps):
            g.sample(step=step); g(torch.ones(1, 2)); out.append(g.last_choice)
            torch.rand(3); random.random(); np.random.rand()   # user code moving the global RNGs differently per rank
    return out


def test_nni_unseeded_random_state_differs_per_rank():
    """microsoft/nni#5013: NNI's Categorical.random() used an unseeded RandomState, so DDP ranks drew different paths.
    Here the choice depends only on (seed, step), not on any global RNG: two ranks with different global states agree."""
    a, b = _choices(0), _choices(12345)
    assert a == b
    assert len(set(a)) > 1


def test_spos_grad_sum_zero_heuristic():
    """megvii-model/SinglePathOneShot: after backward SPOS sets grad=None where grad.sum()==0, a guess at which blocks
    were off. An *enabled* branch whose gradient happens to be zero (a dead ReLU) would lose its momentum and weight
    decay too. RandomGate knows which branches ran: only off branches get None."""
    dead = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with torch.no_grad(): dead[0].bias.fill_(-100.0)   # ReLU always 0: zero gradient although the branch runs
    g = RandomGate(dead, nn.Linear(3, 3), combine='sum', seed=0)
    opt = torch.optim.SGD(g.parameters(), lr=0.1, weight_decay=0.1)
    saw_dead_on = False
    for step in range(20):
        g.sample(step=step); g(torch.randn(4, 3)).sum().backward(); clear_off_grads(g)
        if g.last_choice == (0,):
            saw_dead_on = True
            assert dead[0].weight.grad is not None and dead[0].weight.grad.abs().sum() == 0
            w = dead[0].weight.detach().clone(); opt.step()
            assert torch.allclose(dead[0].weight, w * (1 - 0.1 * 0.1), rtol=1e-6, atol=0)   # weight decay applied
        else:
            assert dead[0].weight.grad is None
            opt.step()
        opt.zero_grad()
    assert saw_dead_on


def test_spos_bn_unstable_without_recalibration():
    """megvii-model/ShuffleNet-Series#9: SPOS results are "unstable" unless BatchNorm statistics are re-estimated per
    candidate. recalibrate_bn re-estimates them exactly for the fixed choice, so its eval output matches BatchNorm with
    the statistics computed by hand over the data."""
    torch.manual_seed(0)
    def bb(scale): return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net = nn.Sequential(RandomGate(bb(1), bb(2), combine='sum', seed=0))
    data = [torch.randn(32, 3) * 3 + 2 for _ in range(3)]
    for _ in range(5):
        for xb in data: net(xb)   # supernet training: statistics of a mixture of subnets
    recalibrate_bn(net, data, choices=[0])
    net.eval()
    lin, bn = net[0].branches[0]
    with torch.no_grad():
        h = [lin(xb) for xb in data]
        mean = torch.stack([t.mean(0) for t in h]).mean(0); var = torch.stack([t.var(0) for t in h]).mean(0)
        x = torch.randn(5, 3)
        expect = (lin(x) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        assert torch.allclose(net(x), expect, atol=1e-5)


def test_ofa_reseeds_global_random():
    """Once-for-all seeds Python's global `random` from the step index so workers agree, which resets every other user
    of `random`. RandomGate draws from its own generator: the global torch, Python and NumPy states do not move."""
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(3)], k=2, combine='cat', per_sample=True, seed=0)
    torch.manual_seed(1); random.seed(1); np.random.seed(1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with torch.no_grad():
        for step in range(5): g.sample(step=step); g(torch.ones(4, 2))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_drop_path_computes_then_masks():
    """timm drop_path and torchvision StochasticDepth compute the block for every row and then multiply by a mask, which
    saves nothing. stochastic_depth runs the block only on kept rows (per sample) and not at all when the whole batch
    skips it."""
    class Rows(nn.Module):
        def __init__(self): super().__init__(); self.lin, self.rows = nn.Linear(4, 4), 0
        def forward(self, x):
            if not x.is_meta: self.rows += x.shape[0]
            return self.lin(x)
    blk = Rows()
    sd = stochastic_depth(blk, 0.5, per_sample=True, seed=0)
    with torch.no_grad(): sd(torch.randn(200, 4))
    assert blk.rows == int(sd.last_choice[:, 0].sum()) < 200
    blk2 = Rows()
    batch = stochastic_depth(blk2, 0.5, per_sample=False, seed=0)
    skipped = 0
    with torch.no_grad():
        for step in range(20):
            before = blk2.rows; x = torch.randn(8, 4); y = batch(x)
            if batch.last_choice == (1,): skipped += 1; assert blk2.rows == before and torch.equal(y, x)
    assert skipped > 0


def _ddp_world1(port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=0, world_size=1)


class _HandSwitch(nn.Module):
    "The hand-written supernet: run one branch, ignore the other."
    def __init__(self): super().__init__(); self.b = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)]); self.i = 0
    def forward(self, x): self.i += 1; return self.b[self.i % 2](x)


def test_ddp_find_unused_false_expected_to_have_finished_reduction():
    """pytorch/pytorch#18180, microsoft/nni#1962: a supernet under DDP with find_unused_parameters=False raises
    "Expected to have finished reduction in the prior iteration"; static_graph=True raises "graph has changed".
    With RandomGate(ddp=True) both settings train (one process, gloo, world size 1 is enough to reproduce it)."""
    _ddp_world1(_free_port())
    try:
        hand = nn.parallel.DistributedDataParallel(_HandSwitch())
        with pytest.raises(RuntimeError, match='Expected to have finished reduction'):
            for _ in range(3): hand(torch.randn(2, 3)).sum().backward()
        for static in (False, True):
            torch.manual_seed(0)
            net = nn.Sequential(RandomGate(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Tanh()), combine='sum',
                                           ddp=True, seed=0))
            ddp = nn.parallel.DistributedDataParallel(net, static_graph=static)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            seen = set()
            for step in range(8):
                net[0].sample(step=step); ddp(torch.randn(2, 3)).sum().backward()
                clear_off_grads(net); opt.step(); opt.zero_grad(); seen.add(net[0].last_choice)
            assert seen == {(0,), (1,)}
    finally:
        dist.destroy_process_group()


def _rank_grads(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(RandomGate(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), combine='sum', ddp=True))
    ddp = nn.parallel.DistributedDataParallel(net)
    x = torch.full((2, 3), float(rank + 1))
    net[0].sample(step=4); ddp(x).sum().backward(); clear_off_grads(net)
    (on,) = net[0].last_choice
    torch.save((on, net[0].branches[on].weight.grad.clone()), os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_rank_divergent_choices_divide_grad_by_world_size(tmp_path):
    """ANCHORS.md, DDP tested: with find_unused_parameters=True but ranks choosing different branches, each branch's
    gradient comes out divided by the world size. With step-seeded choices both ranks pick the same branch, and its
    gradient is the plain mean of the ranks' gradients: for x = 1 and x = 2 rows, d(sum W x)/dW = 2 * mean(1, 2)."""
    mp.spawn(_rank_grads, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    (on0, g0), (on1, g1) = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert on0 == on1
    assert torch.equal(g0, g1) and torch.allclose(g0, torch.full((3, 3), 2 * 1.5))


@pytest.mark.parametrize('opt_name', ['sgd_momentum_wd', 'adamw'])
def test_weight_decay_on_inactive_supernet_params(opt_name):
    """walkerning/aw_nas#5, megvii-model/DetNAS#3: weight decay (and momentum) on the parameters of inactive supernet
    branches over-regularizes them. A branch that is off gets grad None and is not moved by the optimizer at all."""
    torch.manual_seed(0)
    g = RandomGate(*[nn.Linear(4, 4) for _ in range(4)], combine='sum', seed=3)
    opt = (torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) if opt_name == 'sgd_momentum_wd'
           else torch.optim.AdamW(g.parameters(), lr=0.01, weight_decay=0.5))
    x = torch.randn(8, 4)
    for step in range(60):
        before = [b.weight.detach().clone() for b in g.branches]
        g.sample(step=step); g(x).pow(2).sum().backward(); clear_off_grads(g)
        opt.step(); opt.zero_grad(set_to_none=False)   # zeroed, not deleted: the harder case
        for i, b in enumerate(g.branches):
            assert torch.equal(b.weight, before[i]) == (i not in g.last_choice)
