"""Property-based bad-input tests for RandomGate, fix_gates, export_subnet and GateCallback.

Every bad argument raises a specific exception (ValueError/TypeError/KeyError) whose message names the argument and
says how to fix it, and the modules' parameters and state_dicts are exactly unchanged after the failed call.
"""
import math
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from weightdrop.gates import RandomGate, fix_gates, export_subnet, gates
from weightdrop.gate_callbacks import GateCallback

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def snapshot(*mods): return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
def same(a, b): return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
    assert 'between 1 and' in str(e.value) or 'must be an int' in str(e.value)
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
        with pytest.raises(ValueError, match='combine=.*use one of'): RandomGate(*bs, combine=combine, dim=dim)
    elif not isinstance(dim, int):
        with pytest.raises(TypeError, match='dim must be an int'): RandomGate(*bs, combine=combine, dim=dim)
    assert same(snapshot(*bs), before)


def test_no_branches_and_non_modules():
    with pytest.raises(ValueError, match='at least one branch'): RandomGate()
    with pytest.raises(ValueError, match='not only None'): RandomGate(None, None, combine='sum')
    with pytest.raises(TypeError, match='branch 1 .*nn.Module'): RandomGate(nn.Linear(2, 2), lambda x: x)
    with pytest.raises(ValueError, match="None .*combine='sum'"): RandomGate(nn.Linear(2, 2), None, combine='cat')
    with pytest.raises(ValueError, match="eval_choice"): RandomGate(nn.Linear(2, 2), eval_mode='fixed')
    with pytest.raises(ValueError, match="eval_mode="): RandomGate(nn.Linear(2, 2), eval_mode='mean')


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
    with pytest.raises(ValueError, match='step must be an int >= 0'): g.sample(step=step)
    assert g._held_seed is None and same(snapshot(g), before)


def supernet():
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
    net = supernet()
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
    net = supernet(); before = snapshot(net)
    with pytest.raises(ValueError, match=r"not fixed: call fix_gates"): export_subnet(net)
    assert same(snapshot(net), before)


@SETTINGS
@given(seed=st.one_of(st.integers(), st.floats(0, 3), st.booleans(), st.none()),
       valid=st.one_of(st.sampled_from(['all', 'expectation', 'fixed', None, 'mean', 'ALL']), st.text(max_size=3)),
       has_choices=st.booleans(), ddp=st.one_of(st.booleans(), st.none(), st.just(1)))
def test_gate_callback_args(seed, valid, has_choices, ddp):
    vc = [0, (1, 2)] if has_choices else None
    bad_seed = isinstance(seed, bool) or not isinstance(seed, int)
    bad_valid = valid not in ('all', 'expectation', 'fixed', None)
    bad_vc = (valid == 'fixed') != has_choices
    bad_ddp = ddp is not None and not isinstance(ddp, bool)
    if not (bad_seed or bad_valid or bad_vc or bad_ddp):
        GateCallback(seed=seed, valid=valid, valid_choices=vc, ddp=ddp); return
    with pytest.raises((ValueError, TypeError)) as e: GateCallback(seed=seed, valid=valid, valid_choices=vc, ddp=ddp)
    msg = str(e.value)
    assert ('seed' in msg if bad_seed else 'valid' in msg if (bad_valid or bad_vc) else 'ddp' in msg)


def test_gate_callback_bad_choices_fail_before_any_step():
    from fastai.basics import Learner, DataLoaders, MSELossFlat
    x = torch.randn(64, 3); y = x[:, :1]
    dls = DataLoaders.from_dsets(list(zip(x[:48], y[:48])), list(zip(x[48:], y[48:])), bs=16, num_workers=0)
    net = nn.Sequential(RandomGate(*branches(3), combine='sum'), nn.Linear(3, 1))
    before = snapshot(net)
    for vc, exc in (([7], ValueError), ({'nope': 0}, KeyError), ([0, 1], ValueError)):
        learn = Learner(dls, net, loss_func=MSELossFlat(), cbs=GateCallback(valid='fixed', valid_choices=vc))
        with pytest.raises(exc, match='choices'), learn.no_logging(): learn.fit(1, 1e-2)
        assert same(snapshot(net), before)
    learn = Learner(dls, nn.Linear(3, 1), loss_func=MSELossFlat(), cbs=GateCallback())
    with pytest.raises(ValueError, match='no RandomGate'), learn.no_logging(): learn.fit(1, 1e-2)
