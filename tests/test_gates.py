"Tests for weightdrop.gates and weightdrop.gate_callbacks (issue #4: random-gate modules)."
import copy, random
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from weightdrop import gates as G
from weightdrop.gates import RandomGate, fix_gates, export_subnet, recalibrate_bn, clear_off_grads, stochastic_depth, step_seed
from weightdrop.gate_callbacks import GateCallback, show_gate_stats


class Count(nn.Module):
    "Linear branch that counts calls and rows on real (non-meta) data."
    def __init__(self, i=4, o=3, bias=True):
        super().__init__(); self.lin, self.calls, self.rows = nn.Linear(i, o, bias=bias), 0, 0
    def forward(self, x):
        if not x.is_meta: self.calls += 1; self.rows += x.shape[0]
        return self.lin(x)


def sd_clone(m): return {k: v.clone() for k, v in m.state_dict().items()}
def sd_equal(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- only the enabled branches run; zeros of the right shape, dtype and device; layout fixed
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
    real = G._meta_output
    monkeypatch.setattr(G, '_meta_output', lambda b, x: calls.append(tuple(x.shape)) or real(b, x))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    gate = RandomGate(bn, nn.Linear(4, 4), combine='cat', seed=0)
    stats = sd_clone(bn)
    probe_out = G._meta_output(bn, torch.randn(3, 4))
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
    out = G._meta_output(nd, torch.randn(3, 4))
    assert out.shape == (3, 4) and not out.is_meta
    assert sd_equal(sd_clone(nd), stats)       # ran on a throwaway copy


# ---- sampling: k of N, uniform or p; own generator; step-indexed seeds
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


def test_choices_do_not_touch_global_rng():
    gate = RandomGate(*[nn.Linear(2, 2) for _ in range(4)], k=2, combine='sum', per_sample=True, seed=0)
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with torch.no_grad():
        for step in range(5): gate.sample(step=step); gate(torch.ones(6, 2))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_same_seed_same_choices_regardless_of_global_rng():
    def choices(global_seed):
        torch.manual_seed(global_seed)
        g = RandomGate(*[nn.Linear(2, 2) for _ in range(5)], k=2, combine='sum', seed=11)
        out = []
        with torch.no_grad():
            for step in range(20): g.sample(step=step); g(torch.ones(1, 2)); out.append(g.last_choice)
        return out
    a, b = choices(0), choices(1)
    assert a == b and len(set(a)) > 3


def test_held_choice_is_same_for_repeated_calls_in_a_step():
    g = RandomGate(*[nn.Linear(3, 3) for _ in range(6)], combine='sum', seed=0)
    with torch.no_grad():
        for step in range(10):
            g.sample(step=step); g(torch.ones(1, 3)); c = g.last_choice
            for _ in range(3): g(torch.ones(1, 3)); assert g.last_choice == c


# ---- scaling, identity, per-sample, eval modes
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


# ---- optimizer hygiene (torch.optim)
@pytest.mark.parametrize('make_opt', [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)], ids=['sgd_mom', 'adamw'])
@pytest.mark.parametrize('set_to_none', [True, False])
def test_off_branch_params_do_not_move(make_opt, set_to_none):
    torch.manual_seed(0)
    g = RandomGate(*[nn.Linear(4, 4) for _ in range(3)], combine='sum', seed=0)
    opt = make_opt(g.parameters())
    x = torch.randn(8, 4)
    for step in range(40):   # every branch gets optimizer state (momentum / Adam moments)
        g.sample(step=step); g(x).pow(2).sum().backward()
        clear_off_grads(g); opt.step(); opt.zero_grad(set_to_none=set_to_none)
    for step in range(40, 60):
        before = [[q.detach().clone() for q in b.parameters()] for b in g.branches]
        g.sample(step=step); g(x).pow(2).sum().backward()
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
        g.sample(step=step); g(torch.randn(2, 3)).sum().backward()
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


# ---- fix_gates / export_subnet
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


# ---- BatchNorm recalibration
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


# ---- GateCallback
from fastai.basics import Learner, DataLoaders, MSELossFlat, SGD, Adam, Callback, CancelFitException


def dls(n=256, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g); y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2]
    cut = n * 3 // 4
    return DataLoaders.from_dsets(list(zip(x[:cut], y[:cut])), list(zip(x[cut:], y[cut:])), bs=bs, shuffle=False, num_workers=0)


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
    for g in G.gates(net).values(): assert g._held_seed is None and g._override is None and g._keep_graph is None


def test_fixed_gate_in_training_reports_its_off_branches():
    "After fix_gates, a training step's off branches are the unchosen ones (not a stale sampled set)."
    g = RandomGate(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), combine='sum', seed=0, ddp=True)
    g.sample(step=0); g(torch.randn(2, 3))
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
