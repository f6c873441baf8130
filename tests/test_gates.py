"""weightdrop.gates: RandomGate, stochastic_depth, the shape probe, and the off branches' bookkeeping.
Sections: behaviour, bad input, pinned defects (the anchors' and our own users')."""
import math, os, random
import numpy as np
import pytest
import torch
from torch import nn
import torch.distributed as dist
from hypothesis import given, settings, strategies as st, HealthCheck
from weightdrop import gates as G
from weightdrop.gates import RandomGate, clear_off_grads, stochastic_depth
from weightdrop.dropout import WeightDropout
from launch import free_port

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sd_clone(m): return {k: v.clone() for k, v in m.state_dict().items()}
def sd_equal(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def snapshot(*mods): return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
def same(a, b): return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ---- behaviour

class Count(nn.Module):
    "Linear branch that counts calls and rows on real (non-meta) data."
    def __init__(self, i=4, o=3, bias=True):
        super().__init__(); self.lin, self.calls, self.rows = nn.Linear(i, o, bias=bias), 0, 0
    def forward(self, x):
        if not x.is_meta: self.calls += 1; self.rows += x.shape[0]
        return self.lin(x)


def test_off_branches_not_called_and_get_no_grad():
    torch.manual_seed(0)
    br = [Count(4, 3), Count(4, 5), Count(4, 2)]
    gate = RandomGate(*br, k=1, combine='cat', seed=0)
    x = torch.randn(6, 4)
    seen = set()
    for step in range(30):
        for b in br: b.calls = 0; b.lin.weight.grad = None
        y = gate(x)
        (on,) = gate.last_choice; seen.add(on)
        y.pow(2).sum().backward()
        for i, b in enumerate(br):
            assert b.calls == (1 if i == on else 0)
            assert (b.lin.weight.grad is not None) == (i == on)
    assert seen == {0, 1, 2}


def test_zero_slots_shape_dtype_and_fixed_layout():
    br = [nn.Linear(4, 3).double(), nn.Linear(4, 5).double()]
    gate = RandomGate(*br, combine='cat', seed=1)
    x = torch.randn(7, 4, dtype=torch.float64)
    slots = [slice(0, 3), slice(3, 8)]
    with torch.no_grad():
        for _ in range(20):
            y = gate(x); (on,) = gate.last_choice
            assert y.shape == (7, 8) and y.dtype == torch.float64 and y.device == x.device
            assert torch.equal(y[:, slots[1 - on]], torch.zeros(7, (5, 3)[on], dtype=torch.float64))
            assert torch.equal(y[:, slots[on]], br[on](x))


def test_stack_combine_layout():
    br = [nn.Linear(4, 3) for _ in range(3)]
    gate = RandomGate(*br, k=2, combine='stack', dim=1, seed=2)
    x = torch.randn(5, 4)
    with torch.no_grad():
        y = gate(x)
        assert y.shape == (5, 3, 3)
        for i in range(3):
            assert torch.equal(y[:, i], br[i](x) if i in gate.last_choice else torch.zeros(5, 3))


def test_shape_learned_once_per_input_shape_without_running(monkeypatch):
    calls = []
    real = G.probe_output
    monkeypatch.setattr(G, 'probe_output', lambda b, x: calls.append(tuple(x.shape)) or real(b, x))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    gate = RandomGate(bn, nn.Linear(4, 4), combine='cat', seed=0)
    stats = sd_clone(bn)
    probe_out = G.probe_output(bn, torch.randn(3, 4))
    assert probe_out.is_meta and sd_equal(sd_clone(bn), stats)   # the probe moved no BatchNorm statistic
    calls.clear()
    for _ in range(10): gate(torch.randn(8, 4))
    assert calls == [(8, 4), (8, 4)]          # once per branch, first call only
    gate(torch.randn(5, 4))
    assert calls[2:] == [(5, 4), (5, 4)]      # a new input shape is learned once more


def test_shape_fallback_when_meta_fails():
    class NeedsData(nn.Module):
        def __init__(self): super().__init__(); self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        def forward(self, x): return self.bn(self.lin(x)) * float(x.abs().max())   # .item() can't run on meta
    nd = NeedsData()
    stats = sd_clone(nd)
    out = G.probe_output(nd, torch.randn(3, 4))
    assert out.shape == (3, 4) and not out.is_meta
    assert sd_equal(sd_clone(nd), stats)       # ran on a throwaway copy


def test_choice_frequencies_match_inclusion_probabilities():
    p = [0.5, 0.3, 0.2]
    gate = RandomGate(*[nn.Linear(1, 1) for _ in p], k=2, p=p, combine='sum', seed=5)
    n = 4000
    hits = torch.zeros(3)
    with torch.no_grad():
        for _ in range(n):
            gate(torch.ones(1, 1)); assert len(gate.last_choice) == 2; hits += torch.tensor(gate.last_counts, dtype=torch.float)
    # inclusion probabilities for 2 draws without replacement, by hand
    expect = torch.tensor([0.5 + 0.3 * 0.5 / 0.7 + 0.2 * 0.5 / 0.8,
                           0.3 + 0.5 * 0.3 / 0.5 + 0.2 * 0.3 / 0.8,
                           0.2 + 0.5 * 0.2 / 0.5 + 0.3 * 0.2 / 0.7])
    sigma = (expect * (1 - expect) / n).sqrt()
    assert ((hits / n - expect).abs() <= 6 * sigma).all(), (hits / n, expect)
    assert torch.allclose(torch.tensor(gate.keep), expect, atol=1e-12, rtol=0)


def test_same_seed_same_choices_regardless_of_global_rng():
    def choices(global_seed):
        torch.manual_seed(global_seed)
        g = RandomGate(*[nn.Linear(2, 2) for _ in range(5)], k=2, combine='sum', seed=11)
        out = []
        with torch.no_grad():
            for step in range(20): g.hold_choice(step=step); g(torch.ones(1, 2)); out.append(g.last_choice)
        return out
    a, b = choices(0), choices(1)
    assert a == b and len(set(a)) > 3


def test_held_choice_is_same_for_repeated_calls_in_a_step():
    g = RandomGate(*[nn.Linear(3, 3) for _ in range(6)], combine='sum', seed=0)
    with torch.no_grad():
        for step in range(10):
            g.hold_choice(step=step); g(torch.ones(1, 3)); c = g.last_choice
            for _ in range(3): g(torch.ones(1, 3)); assert g.last_choice == c


def test_scale_is_exactly_one_over_keep_prob():
    br = [nn.Linear(3, 3, bias=False) for _ in range(4)]
    g = RandomGate(*br, k=2, combine='cat', scale=True, seed=3)
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = g(x)
        for i in g.last_choice: assert torch.equal(y[:, 3 * i:3 * i + 3], br[i](x) * 2.0)   # keep = 2/4


def test_identity_and_stochastic_depth_per_sample_saves_compute():
    blk = Count(8, 8)
    sd = stochastic_depth(blk, 0.25, per_sample=True, seed=0)
    x = torch.randn(400, 8, requires_grad=True)
    y = sd(x)
    kept = sd.last_choice[:, 0]
    assert blk.rows == int(kept.sum()) < 400
    assert torch.allclose(y[kept], x[kept] + blk.lin(x[kept]) / 0.75, atol=1e-6)
    assert torch.equal(y[~kept], x[~kept])
    y.sum().backward()
    assert blk.lin.weight.grad is not None
    # rows that skipped the block pass the gradient straight through
    assert torch.equal(x.grad[~kept], torch.ones(int((~kept).sum()), 8))
    sigma = (0.75 * 0.25 / 400) ** 0.5
    assert abs(kept.float().mean().item() - 0.75) <= 6 * sigma


def test_per_sample_cat_rows_scatter_back():
    br = [Count(4, 2), Count(4, 3), Count(4, 2)]
    g = RandomGate(*br, k=1, combine='cat', per_sample=True, seed=4)
    x = torch.randn(50, 4)
    with torch.no_grad(): y = g(x)
    mask = g.last_choice
    assert mask.shape == (50, 3) and torch.equal(mask.sum(1), torch.ones(50, dtype=torch.long))
    slots = [slice(0, 2), slice(2, 5), slice(5, 7)]
    for i, b in enumerate(br):
        assert b.rows == int(mask[:, i].sum())
        with torch.no_grad(): ref = b.lin(x)
        assert torch.allclose(y[mask[:, i], slots[i]], ref[mask[:, i]], atol=1e-6)
        assert torch.equal(y[~mask[:, i], slots[i]], torch.zeros(int((~mask[:, i]).sum()), slots[i].stop - slots[i].start))


def test_eval_modes():
    br = [nn.Linear(3, 3) for _ in range(3)]
    x = torch.randn(4, 3)
    with torch.no_grad():
        outs = [b(x) for b in br]
        g = RandomGate(*br, combine='sum', p=[0.5, 0.25, 0.25]).eval()
        assert torch.equal(g(x), outs[0] + outs[1] + outs[2])
        g.eval_mode = 'expectation'
        assert torch.equal(g(x), outs[0] * 0.5 + outs[1] * 0.25 + outs[2] * 0.25)
        g.scale = True
        assert torch.equal(g(x), outs[0] + outs[1] + outs[2])
        gf = RandomGate(*br, k=2, combine='cat', eval_mode='fixed', eval_choice=(2, 0)).eval()
        assert torch.equal(gf(x), torch.cat([outs[0], torch.zeros(4, 3), outs[2]], 1))
        # eval is deterministic: no generator draw
        assert torch.equal(gf(x), gf(x))


@pytest.mark.parametrize('make_opt', [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)], ids=['sgd_mom', 'adamw'])
@pytest.mark.parametrize('set_to_none', [True, False])
def test_off_branch_params_do_not_move(make_opt, set_to_none):
    torch.manual_seed(0)
    g = RandomGate(*[nn.Linear(4, 4) for _ in range(3)], combine='sum', seed=0)
    opt = make_opt(g.parameters())
    x = torch.randn(8, 4)
    for step in range(40):   # every branch gets optimizer state (momentum / Adam moments)
        g.hold_choice(step=step); g(x).pow(2).sum().backward()
        clear_off_grads(g); opt.step(); opt.zero_grad(set_to_none=set_to_none)
    for step in range(40, 60):
        before = [[q.detach().clone() for q in b.parameters()] for b in g.branches]
        g.hold_choice(step=step); g(x).pow(2).sum().backward()
        (on,) = g.last_choice
        clear_off_grads(g)
        for i, b in enumerate(g.branches):
            assert all((q.grad is None) == (i != on) for q in b.parameters())
        opt.step(); opt.zero_grad(set_to_none=set_to_none)
        for i, b in enumerate(g.branches):
            moved = [not torch.equal(q, q0) for q, q0 in zip(b.parameters(), before[i])]
            assert (not any(moved)) if i != on else all(moved)


def test_shared_parameter_between_on_and_off_branch_keeps_its_grad():
    shared = nn.Linear(3, 3)
    g = RandomGate(shared, nn.Sequential(shared, nn.ReLU()), nn.Linear(3, 3), combine='sum', seed=0, ddp=True)
    for step in range(20):
        g.hold_choice(step=step); g(torch.randn(2, 3)).sum().backward()
        if g.last_choice[0] in (0, 1):
            clear_off_grads(g)
            assert shared.weight.grad is not None and shared.weight.grad.abs().sum() > 0
        shared.weight.grad = None


def test_ddp_mode_gives_zero_grads_then_cleared():
    g = RandomGate(nn.Linear(3, 3), nn.Linear(3, 3), combine='cat', ddp=True, seed=0)
    y = g(torch.randn(2, 3)); (on,) = g.last_choice
    y.sum().backward()
    off = g.branches[1 - on]
    assert torch.equal(off.weight.grad, torch.zeros(3, 3)) and torch.equal(off.bias.grad, torch.zeros(3))
    clear_off_grads(g)
    assert off.weight.grad is None and off.bias.grad is None


# ---- bad input

def branches(n):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(n)]


def p_is_valid(p, n, k):
    "Independent oracle for the probabilities argument."
    if p is None: return True
    if len(p) != n or not all(math.isfinite(q) for q in p) or any(q < 0 for q in p): return False
    return abs(sum(p) - 1) <= 1e-6 and sum(q > 0 for q in p) >= k


bad_k = st.one_of(st.integers(-5, 0), st.integers(7, 50), st.booleans(), st.floats(0.5, 3.5), st.just('2'))
finite = st.floats(-2, 2, allow_nan=False)
any_p = st.lists(st.one_of(finite, st.just(float('nan')), st.just(float('inf'))), min_size=0, max_size=8)


@SETTINGS
@given(n=st.integers(1, 6), k=bad_k)
def test_bad_k(n, k):
    bs = branches(n); before = snapshot(*bs)
    if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n: return
    with pytest.raises((ValueError, TypeError), match=r'\bk\b') as e: RandomGate(*bs, k=k)
    assert any(w in str(e.value) for w in ('between 1 and', 'must be an int', 'must be >= 1'))
    assert same(snapshot(*bs), before)


@SETTINGS
@given(n=st.integers(1, 6), k=st.integers(1, 6), p=any_p)
def test_bad_p(n, k, p):
    k = min(k, n)
    bs = branches(n); before = snapshot(*bs)
    if p_is_valid(p, n, k):
        g = RandomGate(*bs, k=k, p=p, combine='sum')
        assert math.isclose(sum(g.keep), k, rel_tol=1e-9)
        return
    with pytest.raises(ValueError, match=r'\bp\b') as e: RandomGate(*bs, k=k, p=p, combine='sum')
    msg = str(e.value)
    assert any(w in msg for w in ('one per branch', 'negative', 'normalise', 'non-finite', "can't be drawn"))
    assert same(snapshot(*bs), before)


@SETTINGS
@given(combine=st.text(max_size=6), dim=st.one_of(st.integers(-3, 3), st.floats(0, 2), st.none()))
def test_bad_combine_and_dim(combine, dim):
    bs = branches(2); before = snapshot(*bs)
    if combine not in ('cat', 'sum', 'stack'):
        with pytest.raises(ValueError, match='combine must be one of'): RandomGate(*bs, combine=combine, dim=dim)
    elif not isinstance(dim, int):
        with pytest.raises(TypeError, match='dim must be an int'): RandomGate(*bs, combine=combine, dim=dim)
    assert same(snapshot(*bs), before)


def test_no_branches_and_non_modules():
    with pytest.raises(ValueError, match='at least one branch'): RandomGate()
    with pytest.raises(ValueError, match='not only None'): RandomGate(None, None, combine='sum')
    with pytest.raises(TypeError, match='branch 1 .*nn.Module'): RandomGate(nn.Linear(2, 2), lambda x: x)
    with pytest.raises(ValueError, match="None .*combine='sum'"): RandomGate(nn.Linear(2, 2), None, combine='cat')
    with pytest.raises(ValueError, match="eval_choice"): RandomGate(nn.Linear(2, 2), eval_mode='fixed')
    with pytest.raises(ValueError, match="eval_mode must be one of"): RandomGate(nn.Linear(2, 2), eval_mode='mean')


@SETTINGS
@given(outs=st.lists(st.integers(1, 5), min_size=2, max_size=4), combine=st.sampled_from(['sum', 'stack', 'cat']),
       extra_dim=st.booleans())
def test_branches_that_cannot_be_combined(outs, combine, extra_dim):
    torch.manual_seed(0)
    bs = [nn.Sequential(nn.Linear(3, o), nn.BatchNorm1d(o)) for o in outs]
    if extra_dim: bs[-1] = nn.Sequential(bs[-1], nn.Unflatten(1, (outs[-1], 1)))
    g = RandomGate(*bs, combine=combine)
    before = snapshot(g)
    compatible = (not extra_dim) and (combine == 'cat' or len(set(outs)) == 1)
    x = torch.randn(4, 3)
    if compatible: g(x); return
    with pytest.raises(ValueError, match="can't be combined") as e: g(x)
    assert 'make the branch outputs match' in str(e.value)
    assert same(snapshot(g), before)   # BatchNorm statistics included: no branch ran


@SETTINGS
@given(step=st.one_of(st.integers(-10, -1), st.floats(0, 5), st.booleans(), st.text(max_size=2)))
def test_bad_step(step):
    g = RandomGate(*branches(2)); before = snapshot(g)
    with pytest.raises((ValueError, TypeError), match='step must be'): g.hold_choice(step=step)
    assert g._held_seed is None and same(snapshot(g), before)


def test_bad_eval_override_and_setters_leave_the_gate_as_it_was():
    g = RandomGate(*branches(3), combine='sum')
    with pytest.raises(ValueError, match='mode must be one of'): g.override_eval('mean')
    with pytest.raises(ValueError, match='outside 0..2'): g.override_eval('fixed', 5)
    assert g._override is None
    with pytest.raises(ValueError, match='needs eval_choice'): g.eval_mode = 'fixed'
    with pytest.raises(ValueError, match='not 1'): g.p = [0.5, 0.5, 0.5]
    assert g.eval_mode == 'all' and g.p == [1 / 3] * 3 and g.keep == [1 / 3] * 3


# ---- pinned defects


def _choices(global_seed, steps=16):
    "One 'rank': its own global RNG state, a gate built from the same config."
    torch.manual_seed(global_seed); random.seed(global_seed); np.random.seed(global_seed)
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(4)], combine='sum', seed=0)
    out = []
    with torch.no_grad():
        for step in range(steps):
            g.hold_choice(step=step); g(torch.ones(1, 2)); out.append(g.last_choice)
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
        g.hold_choice(step=step); g(torch.randn(4, 3)).sum().backward(); clear_off_grads(g)
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


def test_ofa_reseeds_global_random():
    """Once-for-all seeds Python's global `random` from the step index so workers agree, which resets every other user
    of `random`. RandomGate draws from its own generator: the global torch, Python and NumPy states do not move."""
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(3)], k=2, combine='cat', per_sample=True, seed=0)
    torch.manual_seed(1); random.seed(1); np.random.seed(1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with torch.no_grad():
        for step in range(5): g.hold_choice(step=step); g(torch.ones(4, 2))
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


@pytest.mark.distributed
def test_ddp_find_unused_false_expected_to_have_finished_reduction():
    """pytorch/pytorch#18180, microsoft/nni#1962: a supernet under DDP with find_unused_parameters=False raises
    "Expected to have finished reduction in the prior iteration"; static_graph=True raises "graph has changed".
    With RandomGate both settings train, with no weightdrop-specific call (one process, gloo, world size 1 is enough to reproduce it)."""
    _ddp_world1(free_port())
    try:
        hand = nn.parallel.DistributedDataParallel(_HandSwitch())
        with pytest.raises(RuntimeError, match='Expected to have finished reduction'):
            for _ in range(3): hand(torch.randn(2, 3)).sum().backward()
        for static in (False, True):
            torch.manual_seed(0)
            net = nn.Sequential(RandomGate(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Tanh()), combine='sum',
                                           seed=0))   # ddp left at None: the process group is detected
            ddp = nn.parallel.DistributedDataParallel(net, static_graph=static)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            seen = set()
            for step in range(8):
                ddp(torch.randn(2, 3)).sum().backward()
                opt.step(); opt.zero_grad(); seen.add(net[0].last_choice)
            assert seen == {(0,), (1,)}
    finally:
        dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
        dist.destroy_process_group()


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
        g.hold_choice(step=step); g(x).pow(2).sum().backward(); clear_off_grads(g)
        opt.step(); opt.zero_grad(set_to_none=False)   # zeroed, not deleted: the harder case
        for i, b in enumerate(g.branches):
            assert torch.equal(b.weight, before[i]) == (i not in g.last_choice)


def test_probe_of_a_new_input_shape_keeps_the_held_mask_of_a_branch():
    """A shape probe is not a call: a branch's WeightDropout holding a seeded mask for the step keeps it when the gate
    meets a new input shape (two calls in one batch with different shapes see one mask), and the probe moves no
    generator, BatchNorm statistic or global RNG."""
    wd = WeightDropout(nn.Linear(4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    bn = nn.BatchNorm1d(4)
    g = RandomGate(nn.Sequential(wd, bn), nn.Linear(4, 4), combine='sum', p=[1.0, 0.0])
    wd.hold_mask = True; wd.resample()
    held, gen = wd._held['weight'].clone(), wd.generator.get_state()
    seen = []
    wd.module.register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
    xs = [torch.randn(3, 4), torch.randn(5, 4)]
    torch.manual_seed(0); rng = torch.get_rng_state()
    with torch.no_grad():
        for x in xs: g(x)
    assert torch.equal(wd._held['weight'], held) and torch.equal(wd.generator.get_state(), gen)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])          # one mask for both calls
    assert torch.equal(torch.get_rng_state(), rng)
    assert bn.num_batches_tracked == 2                                 # the two real calls, not the probes


@pytest.mark.parametrize('zero_to_none', [True, False])
def test_off_branches_still_in_a_plain_loop_with_momentum_and_weight_decay(zero_to_none):
    """A plain torch loop with SGD(momentum, weight_decay) and no weightdrop-specific call: in steps where a branch
    was off, its weights and momentum buffer are bit-unchanged (the step pre-hook gives it grad None), even when
    zero_grad leaves zero tensors behind."""
    torch.manual_seed(0)
    g = RandomGate(*[nn.Linear(4, 4) for _ in range(3)], combine='sum', seed=0)
    opt = torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(8, 4)
    still = moved = 0
    for step in range(30):
        before = [[q.detach().clone() for q in b.parameters()] for b in g.branches]
        mom = [[None if opt.state[q].get('momentum_buffer') is None else opt.state[q]['momentum_buffer'].clone()
                for q in b.parameters()] for b in g.branches]
        g(x).pow(2).sum().backward()
        (on,) = g.last_choice
        opt.step(); opt.zero_grad(set_to_none=zero_to_none)
        for i, b in enumerate(g.branches):
            for q, q0, m0 in zip(b.parameters(), before[i], mom[i]):
                if i == on: moved += not torch.equal(q, q0); continue
                still += 1
                assert torch.equal(q, q0)
                m = opt.state[q].get('momentum_buffer')
                assert (m is None and m0 is None) or torch.equal(m, m0)
    assert still > 0 and moved > 0
