"""weightdrop.gate_callbacks: GateCallback and show_gate_stats in a fastai Learner.
Sections: behaviour, bad input, pinned defects."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.basics import Learner, MSELossFlat, SGD, Adam, Callback, CancelFitException
from weightdrop import gates as G
from weightdrop.gates import RandomGate
from weightdrop.subnet import export_subnet
from weightdrop.gate_callbacks import GateCallback, show_gate_stats
from weightdrop.synth import synth_dls

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def snapshot(*mods): return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
def same(a, b): return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))
def sd_clone(m): return {k: v.clone() for k, v in m.state_dict().items()}


def branches(n):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(n)]


# ---- behaviour

def dls(n=256, bs=32): return synth_dls(n, 4, bs, fn=lambda x: torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2])


def two_gate_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(RandomGate(*[nn.Linear(4, 8) for _ in range(4)], combine='sum'), nn.ReLU(),
                         RandomGate(*[nn.Linear(8, 8) for _ in range(4)], combine='sum'), nn.ReLU(), nn.Linear(8, 1))


class Record(Callback):
    "Record every gate's choice after each training forward."
    order = 1
    def __init__(self): self.log = []
    def after_pred(self):
        if self.training: self.log.append(tuple(m.last_choice for m in G.gates(self.learn.model).values()))


def test_gate_callback_same_choices_for_same_seed_independent_across_gates():
    def run(net_seed):
        rec = Record()
        learn = Learner(dls(), two_gate_net(net_seed), loss_func=MSELossFlat(), cbs=[GateCallback(seed=7), rec])
        with learn.no_logging(): learn.fit(3, 1e-2)
        return rec.log
    a, b = run(0), run(1)      # like two ranks: different weights and global RNG, same seed
    assert a == b and len(a) == 3 * 6
    assert any(c0 != c1 for c0, c1 in a)   # the two identical gates do not move in lockstep


def test_gate_callback_counts_and_stats_table():
    learn = Learner(dls(), two_gate_net(), loss_func=MSELossFlat(), cbs=GateCallback(seed=0))
    rec = Record(); learn.add_cb(rec)
    with learn.no_logging(): learn.fit(2, 1e-2)
    df = show_gate_stats(learn)
    assert list(df.columns) == ['gate', 'branch', 'chosen', 'share', 'expected'] and len(df) == 8
    for gi, name in enumerate(['0', '2']):
        expect = [sum(c[gi] == (i,) for c in rec.log) for i in range(4)]
        assert df[df.gate == name].chosen.tolist() == expect
    assert (df.expected == 0.25).all()


def test_gate_callback_clears_off_grads_for_fastai_optimizers():
    for opt in (lambda *a, **k: SGD(*a, mom=0.9, **k), Adam):
        net = two_gate_net()
        learn = Learner(dls(), net, loss_func=MSELossFlat(), opt_func=opt, wd=0.1, cbs=GateCallback(seed=1))
        with learn.no_logging():
            learn.fit(1, 1e-2)
            net[0].p = [0, 0, 1.0, 0]              # from now on only branch 2 of the first gate
            before = sd_clone(net[0])
            learn.fit(1, 1e-2)
        after = sd_clone(net[0])
        for k in before:
            assert torch.equal(before[k], after[k]) == (not k.startswith('branches.2.')), k


def test_gate_callback_valid_fixed_equals_exported_subnet():
    learn = Learner(dls(), two_gate_net(), loss_func=MSELossFlat(),
                    cbs=GateCallback(valid='fixed', valid_choices=[3, 1]))
    with learn.no_logging(): learn.fit(1, 1e-2)
    sub = export_subnet(learn.model, [3, 1]).eval()
    xs, ys = zip(*learn.dls.valid_ds)
    with torch.no_grad(): ref = F.mse_loss(sub(torch.stack(xs)), torch.stack(ys)).item()
    assert abs(learn.recorder.values[-1][1] - ref) < 1e-6


def test_gate_callback_valid_most():
    cb = GateCallback(valid='fixed', valid_choices='most', seed=0)
    learn = Learner(dls(), two_gate_net(), loss_func=MSELossFlat(), cbs=cb)
    with learn.no_logging(): learn.fit(1, 1e-2)
    most = cb.most_chosen()
    for n, c in most.items(): assert cb.counts[n][c[0]] == max(cb.counts[n])
    sub = export_subnet(learn.model, most).eval()
    xs, ys = zip(*learn.dls.valid_ds)
    with torch.no_grad(): ref = F.mse_loss(sub(torch.stack(xs)), torch.stack(ys)).item()
    assert abs(learn.recorder.values[-1][1] - ref) < 1e-6


class Stop(Callback):
    def __init__(self, when, exc): self.when, self.exc = when, exc
    def after_pred(self):
        if (self.when == 'train') == self.training: raise self.exc


@pytest.mark.parametrize('when', ['train', 'valid'])
@pytest.mark.parametrize('exc', [CancelFitException, RuntimeError, KeyboardInterrupt])
def test_interrupted_fit_leaves_model_eval_ready(when, exc):
    net = two_gate_net()
    learn = Learner(dls(), net, loss_func=MSELossFlat(),
                    cbs=[GateCallback(valid='fixed', valid_choices=[0, 0], ddp=True), Stop(when, exc('stop'))])
    try:
        with learn.no_logging(): learn.fit(1, 1e-2)
    except (RuntimeError, KeyboardInterrupt): pass
    if exc is CancelFitException:   # fastai runs after_cancel_fit: the callback cleaned up by itself
        for g in G.gates(net).values(): assert g._held_seed is None and g._override is None
    net.eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        h = F.relu(sum(b(x) for b in net[0].branches))
        expect = net[4](F.relu(sum(b(h) for b in net[2].branches)))   # the gates' own eval_mode='all'
        assert torch.equal(net(x), expect)
    for g in G.gates(net).values(): assert (g._held_seed, g._override, g._keep_graph) == (None, None, None)


# ---- bad input

@SETTINGS
@given(seed=st.one_of(st.integers(), st.floats(0, 3), st.booleans(), st.none()),
       valid=st.one_of(st.sampled_from(['all', 'expectation', 'fixed', None, 'mean', 'ALL']), st.text(max_size=3)),
       has_choices=st.booleans(), ddp=st.one_of(st.booleans(), st.none(), st.just(1)))
def test_gate_callback_args(seed, valid, has_choices, ddp):
    vc = [0, (1, 2)] if has_choices else None
    bad_seed = isinstance(seed, bool) or not isinstance(seed, int) or seed < 0
    bad_valid = valid not in ('all', 'expectation', 'fixed', None)
    bad_vc = (valid == 'fixed') != has_choices
    bad_ddp = ddp is not None and not isinstance(ddp, bool)
    if not (bad_seed or bad_valid or bad_vc or bad_ddp):
        GateCallback(seed=seed, valid=valid, valid_choices=vc, ddp=ddp); return
    with pytest.raises((ValueError, TypeError)) as e: GateCallback(seed=seed, valid=valid, valid_choices=vc, ddp=ddp)
    msg = str(e.value)
    assert ('seed' in msg if bad_seed else 'valid' in msg if (bad_valid or bad_vc) else 'ddp' in msg)


def test_gate_callback_bad_choices_fail_before_any_step():
    dls = synth_dls(64, 3, 16)
    net = nn.Sequential(RandomGate(*branches(3), combine='sum'), nn.Linear(3, 1))
    before = snapshot(net)
    for vc, exc in (([7], ValueError), ({'nope': 0}, KeyError), ([0, 1], ValueError)):
        learn = Learner(dls, net, loss_func=MSELossFlat(), cbs=GateCallback(valid='fixed', valid_choices=vc))
        with pytest.raises(exc, match='choices'), learn.no_logging(): learn.fit(1, 1e-2)
        assert same(snapshot(net), before)
    learn = Learner(dls, nn.Linear(3, 1), loss_func=MSELossFlat(), cbs=GateCallback())
    with pytest.raises(ValueError, match='no RandomGate'), learn.no_logging(): learn.fit(1, 1e-2)


# ---- pinned defects


def test_lr_find_is_invisible_to_choices_and_statistics():
    """`lr_find` then `fit` trains on the same gate choices and reports the same statistics as `fit` alone: lr_find's
    batches draw from a stream of their own and are not counted."""
    def run(lr_find):
        cb, rec = GateCallback(seed=4), Record()
        learn = Learner(dls(), two_gate_net(), loss_func=MSELossFlat(), cbs=[cb, rec])
        with learn.no_logging(), learn.no_bar():
            if lr_find: learn.lr_find(num_it=12, show_plot=False); rec.log.clear()
            learn.fit(2, 1e-2)
        return rec.log, cb.counts, cb.totals, cb.step, show_gate_stats(cb).chosen.tolist()
    alone, after = run(False), run(True)
    assert after == alone and len(alone[0]) == 2 * 6
