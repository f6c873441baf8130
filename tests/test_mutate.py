"Tests for weightdrop.mutate and weightdrop.mutate_callbacks: distribution, reproducibility, dtypes, autograd safety."
import copy, math
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from weightdrop.mutate import (mutate_, mutate, update_weights_, shrink_perturb, bernoulli_positions, graph_refs,
                               mutation_plan)

def state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

# ---------------------------------------------------------------- distribution (exactly the dense formula's)

@pytest.mark.parametrize('p', [0., 0.01, 0.3, 1.])
@pytest.mark.parametrize('dist', ['normal', 'uniform'])
def test_fraction_and_moments(p, dist):
    n, s = 300_000, 0.5
    w = torch.zeros(n)
    mutate_([w], p, s, generator=torch.Generator().manual_seed(11), dist=dist)
    d = w[w != 0].double()
    assert abs(d.numel() / n - p) <= 6 * math.sqrt(p * (1 - p) / n) + 1e-12
    if p == 0: return
    k = d.numel()
    var = s ** 2 if dist == 'normal' else s ** 2 / 3
    mu4 = 3 * var ** 2 if dist == 'normal' else s ** 4 / 5
    assert abs(d.mean().item()) < 6 * math.sqrt(var / k)
    assert abs(d.var().item() - var) < 6 * math.sqrt((mu4 - var ** 2) / k)
    if dist == 'uniform': assert d.abs().max() <= s

@pytest.mark.parametrize('p', [0.02, 0.3])
def test_elements_chosen_independently(p):
    "Every position has rate p and two neighbouring positions are chosen independently (joint rate p^2)."
    g, n_draws, n = torch.Generator().manual_seed(3), 3000, 16
    hits = torch.zeros(n_draws, n)
    for i in range(n_draws):
        w = torch.zeros(n)
        mutate_([w], p, 1., generator=g)
        hits[i] = (w != 0).float()
    rate = hits.mean(0)
    assert ((rate - p).abs() < 6 * math.sqrt(p * (1 - p) / n_draws)).all()
    joint = (hits[:, :-1] * hits[:, 1:]).mean().item()   # 15 * n_draws pairs, dependent but each with rate p^2
    assert abs(joint - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n_draws)

def test_positions_cover_whole_tensor():
    "Successes reach the end of the tensor: the gap walk is not truncated."
    pos = bernoulli_positions(1_000_000, 0.001, torch.Generator().manual_seed(0))
    assert pos.max() > 990_000 and pos.min() < 10_000
    assert bool((pos.diff() > 0).all())

class RandomDraws(TorchDispatchMode):
    "Count the elements drawn by random ops."
    def __init__(self): super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(s in func.__name__ for s in ('rand', 'uniform', 'normal', 'bernoulli', 'exponential', 'geometric', 'binomial', 'multinomial')):
            self.n += out.numel()
        return out

@pytest.mark.parametrize('p', [0.001, 0.01, 0.3])
def test_random_draws_grow_with_p_times_n(p):
    "The issue: the cost grows with p*N, not N (counted in random numbers drawn, not timed)."
    n = 1_000_000
    w = torch.zeros(n)
    with RandomDraws() as rd: mutate_([w], p, 1., generator=torch.Generator().manual_seed(0))
    expected = n * p
    assert rd.n <= 2 * expected + 12 * math.sqrt(expected) + 64, (rd.n, expected)
    with RandomDraws() as rd, torch.no_grad():
        w.data += torch.randn_like(w) * (torch.rand(w.size()) < p).int()
    assert rd.n == 2 * n   # the dense formula

# ---------------------------------------------------------------- reproducibility, buffers, dtype, selection

def test_seeded_repeatable_and_global_rng_untouched():
    a, b = bn_net(), bn_net()
    torch.manual_seed(123); before = torch.get_rng_state()
    mutate_(a, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    mutate_(b, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    assert same(a.state_dict(), b.state_dict())
    assert torch.equal(torch.get_rng_state(), before)
    c = bn_net(); mutate_(c, 0.3, 0.1, generator=torch.Generator().manual_seed(8))
    assert not same(a.state_dict(), c.state_dict())

def test_buffers_untouched_biases_mutated():
    net, ref = bn_net(), bn_net()
    net[1].running_mean.fill_(0.5); ref[1].running_mean.fill_(0.5)
    mutate_(net, 1., 0.1)
    for k, v in net.state_dict().items():
        if k.startswith('1.running') or k.startswith('1.num_batches'): assert torch.equal(v, ref.state_dict()[k])
        else: assert (v != ref.state_dict()[k]).all(), k

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dt):
    net = nn.Linear(64, 64).to(dt); w0 = net.weight.clone()
    mutate_(net, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    assert net.weight.dtype == dt and net.weight.device == w0.device
    frac = (net.weight != w0).float().mean().item()
    assert abs(frac - 0.5) < 6 * math.sqrt(0.25 / 4096)

def test_non_contiguous_parameter():
    w = torch.zeros(200, 300).t()        # non-contiguous view
    assert not w.is_contiguous()
    mutate_([w], 1., 1., generator=torch.Generator().manual_seed(0))
    assert (w != 0).all()

def test_per_layer_mapping_include_exclude():
    net, ref = bn_net(), bn_net()
    mutate_(net, {'3.bias': 1., '3.*': 0.}, {'*': 0.1})
    assert (net[3].bias != ref[3].bias).all() and torch.equal(net[3].weight, ref[3].weight)
    assert torch.equal(net[0].weight, ref[0].weight)         # matched by no pattern of p: left alone
    net = bn_net()
    mutate_(net, 1., 0.1, include='*.weight', exclude='1.*')
    assert (net[0].weight != ref[0].weight).all() and (net[3].weight != ref[3].weight).all()
    assert torch.equal(net[1].weight, ref[1].weight) and torch.equal(net[0].bias, ref[0].bias)

def test_strength_mapping_per_layer_scale():
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100)); ref = copy.deepcopy(net)
    mutate_(net, 1., {'0.*': 0.01, '1.*': 1.}, generator=torch.Generator().manual_seed(0))
    s0 = (net[0].weight - ref[0].weight).std().item(); s1 = (net[1].weight - ref[1].weight).std().item()
    assert abs(s0 - 0.01) < 6 * 0.01 * math.sqrt(2 / 10_000) and abs(s1 - 1) < 6 * math.sqrt(2 / 10_000)

def test_shared_parameter_mutated_once():
    lin = nn.Linear(50, 50); net = nn.Sequential(lin, lin)
    assert len(mutation_plan(net, 1., 0.1)) == 2     # weight and bias, once each

def test_stacked_population_tensors():
    "Plain tensors (e.g. torch.func.stack_module_state rows) mutate in place."
    pop = {'w': torch.zeros(8, 10, 10)}
    mutate_({'w': pop['w'][2:]}, 1., 1.)
    assert (pop['w'][:2] == 0).all() and (pop['w'][2:] != 0).all()

def test_mutate_returns_copy_parent_unchanged():
    parent = bn_net(); ref = state(parent)
    child = mutate(parent, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    assert same(parent.state_dict(), ref) and child is not parent
    assert not torch.equal(child[0].weight, parent[0].weight)
    loss = mlp()(torch.randn(2, 3)).sum()     # a live graph on a parent doesn't stop making children
    m = mlp(); loss = m(torch.randn(2, 3)).sum()
    mutate(m, 1., 0.1); loss.backward()

# ---------------------------------------------------------------- autograd safety

def test_raise_between_forward_and_backward_then_safe_after_backward():
    m = mlp(); x = torch.randn(4, 3)
    ref = mlp(); ref(x).sum().backward()
    loss = m(x).sum()
    before = state(m)
    with pytest.raises(RuntimeError, match=r"\['2.weight'\].*after loss.backward\(\)"):
        mutate_(m, 1., 0.1)
    assert same(m.state_dict(), before)
    loss.backward()                     # gradients are the untouched ones
    for a, b in zip(m.parameters(), ref.parameters()): assert torch.equal(a.grad, b.grad)
    mutate_(m, 1., 0.1)                 # safe: after backward, before the next forward
    assert not torch.equal(m[2].weight, before['2.weight'])
    m(x).sum().backward()               # and the next iteration runs

def test_bias_only_change_allowed_mid_graph():
    "Linear doesn't save its bias: changing only biases between forward and backward is safe and allowed."
    m = mlp(); x = torch.randn(4, 3)
    loss = m(x).sum()
    mutate_(m, 1., 0.1, include='*.bias')
    update_weights_(m, {'*.bias': lambda b: b + 1})
    loss.backward()

def test_first_layer_weight_not_saved_allowed():
    "The first Linear's weight isn't saved when the input needs no grad: PyTorch's own check agrees."
    m = mlp(); loss = m(torch.randn(4, 3)).sum()
    assert graph_refs(m[0].weight) == 0 and graph_refs(m[2].weight) == 1
    mutate_(m, 1., 0.1, include='0.*'); loss.backward()

def test_frozen_weight_saved_for_input_grad_detected():
    lin = nn.Linear(3, 2); lin.weight.requires_grad_(False)
    x = torch.randn(4, 3, requires_grad=True); loss = lin(x).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(lin, 1., 0.1)
    loss.backward()
    mutate_(lin, 1., 0.1)

def test_retain_graph_keeps_it_live_and_del_releases():
    m = mlp(); loss = m(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(m, 1., 0.1)
    del loss
    mutate_(m, 1., 0.1)

def test_no_grad_forward_saves_nothing():
    m = mlp()
    with torch.no_grad(): out = m(torch.randn(4, 3))
    mutate_(m, 1., 0.1); update_weights_(m, {'*': lambda w: w * 2})

def test_update_weights_same_check_and_check_graph_off():
    m = mlp(); loss = m(torch.randn(4, 3)).sum(); before = state(m)
    with pytest.raises(RuntimeError, match='update_weights_ after loss.backward'):
        update_weights_(m, {'*': lambda w: w * 0})
    assert same(m.state_dict(), before)
    update_weights_(m, {'*': lambda w: w * 0}, check_graph=False)     # opt-out: then PyTorch's own error follows
    with pytest.raises(RuntimeError, match='modified by an inplace operation'): loss.backward()

def test_lstm_and_conv_weights_detected():
    lstm = nn.LSTM(4, 4); out = lstm(torch.randn(5, 2, 4))[0].sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(lstm, 1., 0.1)
    out.backward(); mutate_(lstm, 1., 0.1)

# ---------------------------------------------------------------- update_weights_, shrink_perturb

def test_update_weights_in_place_optimizer_keeps_parameter():
    m = mlp(); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ids = [id(p) for p in m.parameters()]; w0 = m[0].weight.clone(); b0 = m[0].bias.clone()
    update_weights_(m, {'0.*': lambda w: w + 1e-3 * w})
    assert [id(p) for p in m.parameters()] == ids and opt.param_groups[0]['params'][0] is m[0].weight
    assert torch.equal(m[0].weight, w0 + 1e-3 * w0) and torch.equal(m[0].bias, b0 + 1e-3 * b0)
    assert m[0].weight.requires_grad and m[0].weight.is_leaf

def test_update_weights_rules_compose_in_order():
    m = mlp(); w0 = m[0].weight.clone()
    update_weights_(m, {'*': lambda w: w + 1, '0.weight': lambda w: w * 2})
    assert torch.equal(m[0].weight, (w0 + 1) * 2)

def test_update_weights_unmatched_pattern_lists_names():
    m = mlp()
    with pytest.raises(ValueError, match=r"\['fc1\.\*'\] match no parameter; the names are \['0.weight', '0.bias'"):
        update_weights_(m, {'fc1.*': lambda w: w})

def test_shrink_perturb_moments():
    torch.manual_seed(0)
    lin = nn.Linear(200, 200); w0 = lin.weight.clone()
    update_weights_(lin, {'weight': shrink_perturb(0.3, 0.02, torch.Generator().manual_seed(1))})
    eps = ((lin.weight - 0.3 * w0) / 0.02).double()
    n = eps.numel()
    assert abs(eps.mean()) < 6 / math.sqrt(n) and abs(eps.var() - 1) < 6 * math.sqrt(2 / n)

# ---------------------------------------------------------------- devices

def test_generator_wrong_type_or_device_refused():
    w = torch.zeros(10)
    with pytest.raises(TypeError, match='generator must be a torch.Generator'): mutate_([w], 1., 1., generator=0)
    wm = torch.zeros(10, device='meta')   # a parameter on another device than the generator (no GPU needed)
    with pytest.raises(ValueError, match="generator is on cpu but parameter '1' is on meta.*torch.Generator\\(device='meta'\\)"):
        mutate_([w, wm], 1., 1., generator=torch.Generator())
    assert (w == 0).all()

@pytest.mark.gpu
def test_cuda_params_cuda_generator():
    net = bn_net().cuda(); ref = copy.deepcopy(net)
    mutate_(net, 0.3, 0.1, generator=torch.Generator(device='cuda').manual_seed(0))
    assert not torch.equal(net[0].weight, ref[0].weight)
    with pytest.raises(ValueError, match="generator is on cpu but parameter '0.weight' is on cuda"):
        mutate_(net, 0.3, 0.1, generator=torch.Generator().manual_seed(0))
    net.half(); mutate_(net, 0.3, 0.1, generator=torch.Generator(device='cuda').manual_seed(0))

# ---------------------------------------------------------------- callbacks

def _learn(cbs, seed=0):
    from fastai.basics import DataLoaders, Learner, MSELossFlat, set_seed
    set_seed(seed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g); y = x[:, :2] * 2
    dls = DataLoaders.from_dsets(list(zip(x[:96], y[:96])), list(zip(x[96:], y[96:])), bs=16)
    return Learner(dls, mlp(), loss_func=MSELossFlat(), cbs=cbs)

def test_weight_update_callback_runs_after_step_and_never_mid_graph():
    from weightdrop.mutate_callbacks import WeightUpdateCallback
    seen = []
    def rule(w):
        seen.append(graph_refs(learn.model[2].weight))   # at the callback's moment, no graph holds the weight
        return w * 0.5
    learn = _learn(WeightUpdateCallback({'2.weight': rule}, every='batch')); learn.fit(2, 1e-2)
    assert len(seen) == 12 and set(seen) == {0}

def test_weight_update_callback_refuses_unsafe_events():
    from weightdrop.mutate_callbacks import WeightUpdateCallback
    for ev in ('after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step'):
        with pytest.raises(ValueError, match='not a safe point'): WeightUpdateCallback({'*': lambda w: w}, 'batch', ev)

def test_mutate_callback_schedule_logged_and_seeded():
    from fastai.callback.schedule import SchedLin
    from weightdrop.mutate_callbacks import MutateCallback
    runs = []
    for _ in range(2):
        cb = MutateCallback(SchedLin(0.2, 0.), SchedLin(0.1, 0.01), every='batch', seed=3)
        learn = _learn(cb); learn.fit(2, 1e-2); runs.append(state(learn.model))
        hp = learn.recorder.hps
        assert len(hp['mutate_p']) == 12 and hp['mutate_p'][0] == pytest.approx(0.2)
        assert hp['mutate_strength'][6] == pytest.approx(0.1 + (0.01 - 0.1) * 6 / 12)
    assert same(*runs)

def test_mutate_callback_epochs_only():
    from weightdrop.mutate_callbacks import MutateCallback
    cb = MutateCallback(0.5, 0.1, every='epoch', epochs=[1]); learn = _learn(cb); learn.fit(3, 0.)
    assert [e for e, _ in cb.applied] == [1]

@pytest.mark.parametrize('p,n', [(1e-7, 10**7), (2e-6, 10**6), (0.5, 101)])
def test_count_is_binomial_at_extreme_p(p, n):
    "Tiny and mid p: the number of mutated elements has the Binomial(n, p) mean and variance."
    g, draws = torch.Generator().manual_seed(4), 1000
    c = torch.tensor([bernoulli_positions(n, p, g).numel() for _ in range(draws)], dtype=torch.float64)
    mean, var = n * p, n * p * (1 - p)
    assert abs(c.mean().item() - mean) < 6 * math.sqrt(var / draws)
    assert abs(c.var().item() - var) < 6 * var * math.sqrt(2 / draws) + 6 * math.sqrt(mean / draws)

def test_saved_non_leaf_view_detected():
    "A non-leaf tensor (a view of a leaf) saved by a graph is detected too: no gradient accumulator to discount."
    base = torch.randn(4, 3, requires_grad=True)
    v = base[:2]
    out = (v * v).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_([v], 1., 0.1)
    out.backward()
    assert torch.equal(base.grad[:2], 2 * base[:2].detach()) and (base.grad[2:] == 0).all()
