"""weightdrop.subnet: fix_gates, export_subnet, ChosenBranches, recalibrate_bn.
Sections: behaviour, bad input, pinned defects."""
import copy
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from weightdrop import gates as G
from weightdrop.gates import RandomGate, clear_off_grads, stochastic_depth, gates
from weightdrop.subnet import fix_gates, export_subnet, recalibrate_bn

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sd_clone(m): return {k: v.clone() for k, v in m.state_dict().items()}
def sd_equal(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def snapshot(*mods): return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
def same(a, b): return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def branches(n):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(n)]


# ---- behaviour

def supernet():
    torch.manual_seed(0)
    return nn.Sequential(RandomGate(nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6), combine='sum'), nn.ReLU(),
                         RandomGate(nn.Linear(6, 2), nn.Linear(6, 3), combine='cat', scale=True), nn.Linear(5, 1),
                         RandomGate(nn.Linear(1, 1), None, combine='sum', identity=True))


def test_fix_gates_and_export_subnet_keep_weights_and_outputs():
    sup = supernet()
    ref = sd_clone(sup)
    sub = export_subnet(sup, [1, 0, 1])
    assert sd_equal(sd_clone(sup), ref) and all(g.fixed is None for g in G.gates(sup).values())
    assert isinstance(sub[0], nn.Linear) and torch.equal(sub[0].weight, sup[0].branches[1].weight)
    assert not G.gates(sub)
    x = torch.randn(5, 4)
    with torch.no_grad():
        h = F.relu(sup[0].branches[1](x))
        h = torch.cat([sup[2].branches[0](h) * 2.0, torch.zeros(5, 3)], 1)   # scale=True: 1/keep = 2
        expect = sup[3](h)                                                   # the None branch: identity only
        assert torch.equal(sub(x), expect)
        fix_gates(sup, {'0': 1, '2': 0, '4': 1})
        for mode in (True, False):
            sup.train(mode); assert torch.equal(sup(x), expect)
    n_sub = sum(q.numel() for q in sub.parameters())
    assert n_sub == 4 * 6 + 6 + 6 * 2 + 2 + 5 + 1
    fix_gates(sup, None)
    assert all(g.fixed is None for g in G.gates(sup).values())


def test_exported_subnet_trains_and_saves():
    sub = export_subnet(supernet(), [2, 1, 0])
    opt = torch.optim.SGD(sub.parameters(), lr=0.1)
    sub(torch.randn(3, 4)).sum().backward(); opt.step()
    clone = copy.deepcopy(sub)
    assert sd_equal(sd_clone(clone), sd_clone(sub))


def test_recalibrate_bn_exact_statistics_and_restores_state():
    def bnb(): return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3))
    net = nn.Sequential(RandomGate(bnb(), bnb(), combine='sum', seed=0))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, generator=g) * 2 + 1, torch.zeros(16)) for _ in range(5)]
    for xb, _ in data: net(xb)
    net.eval()
    other = sd_clone(net[0].branches[0])
    recalibrate_bn(net, data, choices=[1], n_batches=4)
    b = net[0].branches[1]
    with torch.no_grad(): h = [b[0](xb) for xb, _ in data[:4]]
    assert torch.allclose(b[1].running_mean, torch.stack([t.mean(0) for t in h]).mean(0), atol=1e-6)
    assert torch.allclose(b[1].running_var, torch.stack([t.var(0) for t in h]).mean(0), atol=1e-5)
    assert b[1].momentum == 0.3 and not net.training and net[0].fixed == (1,)
    # BatchNorm of the branch that is not chosen: reset (it is part of the model), then never fed
    assert torch.equal(net[0].branches[0][1].running_mean, torch.zeros(4))
    assert torch.equal(net[0].branches[0][0].weight, other['0.weight'])


def test_recalibrate_bn_refuses_loose_gates():
    net = nn.Sequential(RandomGate(nn.BatchNorm1d(3), nn.BatchNorm1d(3), combine='sum'))
    before = sd_clone(net)
    with pytest.raises(ValueError, match='not fixed'): recalibrate_bn(net, [torch.randn(4, 3)])
    assert sd_equal(sd_clone(net), before)


def test_fixed_gate_in_training_reports_its_off_branches():
    "After fix_gates, a training step's off branches are the unchosen ones (not a stale sampled set)."
    g = RandomGate(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), combine='sum', seed=0, ddp=True)
    g.hold_choice(step=0); g(torch.randn(2, 3))
    fix_gates(g, 2)
    g(torch.randn(2, 3)).sum().backward(); clear_off_grads(g)
    assert [b.weight.grad is None for b in g.branches] == [True, True, False]


def test_exported_subnet_pickles(tmp_path):
    "torch.save of the whole exported model (fastai's export does this) and load give the same outputs."
    sub = export_subnet(supernet(), [0, (1,), 1]).eval()
    torch.save(sub, tmp_path / 'sub.pt')
    back = torch.load(tmp_path / 'sub.pt', weights_only=False)
    x = torch.randn(3, 4)
    with torch.no_grad(): assert torch.equal(back(x), sub(x))


@pytest.mark.gpu
def test_gate_on_cuda_keeps_everything_on_the_device():
    dev = torch.device('cuda')
    g = RandomGate(nn.Linear(4, 3), nn.Linear(4, 5), combine='cat', per_sample=True, seed=0).to(dev)
    x = torch.randn(16, 4, device=dev)
    y = g(x)
    assert y.device.type == 'cuda' and y.shape == (16, 8)
    y.sum().backward()
    sub = export_subnet(fix_gates(copy.deepcopy(g).cpu(), 1).to(dev))
    assert sub(x).device.type == 'cuda'

def test_subnet_of_a_gate_that_never_ran_learns_its_zero_slots_on_first_call():
    sup = supernet()
    sub = export_subnet(sup, [2, 1, 0])
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match='call it once on an example input'): torch.jit.trace(sub.eval(), x)
    fix_gates(sup, [2, 1, 0]).eval()
    with torch.no_grad():
        assert torch.equal(sub(x), sup(x))
        assert torch.equal(torch.jit.trace(sub, x)(x), sup(x))   # sizes known now: it traces


def test_exported_skip_of_stochastic_depth_is_the_identity():
    net = nn.Sequential(stochastic_depth(nn.Linear(4, 4), 0.3))
    x = torch.randn(5, 4)
    assert torch.equal(export_subnet(net, 1)(x), x)


# ---- bad input

def bn_supernet():
    torch.manual_seed(0)
    return nn.Sequential(RandomGate(*branches(3), combine='sum'), nn.ReLU(),
                         RandomGate(*branches(4), k=2, combine='cat'), nn.Linear(6, 1))


choice_item = st.one_of(st.integers(-2, 5), st.lists(st.integers(-1, 4), max_size=3).map(tuple), st.booleans(),
                        st.just('x'), st.floats(0, 2))


def choice_ok(c, n, k):
    if isinstance(c, bool): return False
    if isinstance(c, int): c = (c,)
    if not isinstance(c, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in c): return False
    return len(c) == k and len(set(c)) == k and all(0 <= i < n for i in c)


@SETTINGS
@given(c0=choice_item, c1=choice_item, as_dict=st.booleans(), extra=st.booleans())
def test_fix_gates_is_atomic(c0, c1, as_dict, extra):
    net = bn_supernet()
    fix_gates(net, [2, (0, 3)])
    before = snapshot(net)
    choices = {'0': c0, '2': c1} if as_dict else [c0, c1]
    if extra: choices = {**choices, 'nope': 0} if as_dict else choices + [0]
    valid = not extra and choice_ok(c0, 3, 1) and choice_ok(c1, 4, 2)
    if valid:
        fix_gates(net, choices)
        return
    with pytest.raises((ValueError, TypeError, KeyError), match='choices') as e: fix_gates(net, choices)
    assert any(w in str(e.value) for w in ('give', 'pick among', 'gates:', 'must'))
    assert [g.fixed for g in gates(net).values()] == [(2,), (0, 3)]   # no gate changed
    assert same(snapshot(net), before)
    with pytest.raises((ValueError, TypeError, KeyError), match='choices'): export_subnet(net, choices)
    assert same(snapshot(net), before)


def test_export_needs_fixed_gates():
    net = bn_supernet(); before = snapshot(net)
    with pytest.raises(ValueError, match=r"not fixed: call fix_gates"): export_subnet(net)
    assert same(snapshot(net), before)


# ---- pinned defects

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


def _trained_supernet():
    "A supernet after a few training steps, as a user exports it."
    sup = supernet()
    opt = torch.optim.SGD(sup.parameters(), lr=0.01)
    for _ in range(4): sup(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    return sup


@pytest.mark.parametrize('deploy', ['jit_trace', 'torch_export', 'torch_save'])
def test_exported_subnet_deploys_like_the_fixed_supernet(deploy, tmp_path):
    """An exported subnet is at least as deployable as the fixed supernet: `torch.jit.trace`, `torch.export` and
    `torch.save` of the whole module all work and compute what the fixed supernet computes (a subnet that kept meta
    copies of its off branches for their zero slots failed `jit.trace` with "Cannot copy out of meta tensor")."""
    sup = _trained_supernet()
    choice = [0, 1, 0]
    sub = export_subnet(sup, choice).eval()
    ref_net = fix_gates(copy.deepcopy(sup), choice).eval()
    x = torch.randn(6, 4)
    with torch.no_grad():
        ref = ref_net(x)
        if deploy == 'jit_trace':
            assert torch.equal(torch.jit.trace(ref_net, x)(x), ref)   # the supernet traces...
            out = torch.jit.trace(sub, x)(x)                             # ...and so does its subnet
        elif deploy == 'torch_export': out = torch.export.export(sub, (x,)).module()(x)
        else:
            torch.save(sub, tmp_path / 'sub.pt')
            out = torch.load(tmp_path / 'sub.pt', weights_only=False)(x)
    assert torch.equal(out, ref)
