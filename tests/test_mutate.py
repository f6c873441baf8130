"Tests for weightdrop.mutate: mutate_, mutate, update_weights_, shrink_perturb and the saved-tensor check."
import copy, fnmatch, math
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given, settings, strategies as st, HealthCheck
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

class RandomDraws(TorchDispatchMode):
    "Record (op, elements, device, dtype) of every random op."
    def __init__(self): super().__init__(); self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(s in func.__name__ for s in ('rand', 'uniform', 'normal', 'bernoulli', 'exponential', 'geometric',
                                            'binomial', 'multinomial')):
            self.ops.append((func.__name__, out.numel(), out.device, out.dtype))
        return out
    @property
    def n(self): return sum(n for _, n, *_ in self.ops)

# ---- behaviour

@pytest.mark.parametrize('p', [0., 0.01, 0.3, 1.])
@pytest.mark.parametrize('dist', ['normal', 'uniform'])
def test_fraction_and_moments(p, dist):
    "The mutated fraction and the noise moments are those of the dense formula."
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

@pytest.mark.parametrize('p,n', [(1e-7, 10**7), (2e-6, 10**6), (0.5, 101)])
def test_count_is_binomial_at_extreme_p(p, n):
    "Tiny and mid p: the number of mutated elements has the Binomial(n, p) mean and variance."
    g, draws = torch.Generator().manual_seed(4), 1000
    c = torch.tensor([bernoulli_positions(n, p, g).numel() for _ in range(draws)], dtype=torch.float64)
    mean, var = n * p, n * p * (1 - p)
    assert abs(c.mean().item() - mean) < 6 * math.sqrt(var / draws)
    assert abs(c.var().item() - var) < 6 * var * math.sqrt(2 / draws) + 6 * math.sqrt(mean / draws)

@pytest.mark.parametrize('p', [0.001, 0.01, 0.3])
def test_random_draws_grow_with_p_times_n(p):
    "The cost grows with p*N, not N (counted in random numbers drawn, not timed); the dense formula draws 2N."
    n = 1_000_000
    w = torch.zeros(n)
    with RandomDraws() as rd: mutate_([w], p, 1., generator=torch.Generator().manual_seed(0))
    expected = n * p
    assert rd.n <= 2 * expected + 12 * math.sqrt(expected) + 64, (rd.n, expected)
    with RandomDraws() as rd, torch.no_grad():
        w.data += torch.randn_like(w) * (torch.rand(w.size()) < p).int()
    assert rd.n == 2 * n

def test_seeded_repeatable_and_global_rng_untouched():
    a, b = bn_net(), bn_net()
    torch.manual_seed(123); before = torch.get_rng_state()
    mutate_(a, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    mutate_(b, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    assert same(a.state_dict(), b.state_dict())
    assert torch.equal(torch.get_rng_state(), before)
    c = bn_net(); mutate_(c, 0.3, 0.1, generator=torch.Generator().manual_seed(8))
    assert not same(a.state_dict(), c.state_dict())

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dt):
    net = nn.Linear(64, 64).to(dt); w0 = net.weight.clone()
    mutate_(net, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    assert net.weight.dtype == dt and net.weight.device == w0.device
    frac = (net.weight != w0).float().mean().item()
    assert abs(frac - 0.5) < 6 * math.sqrt(0.25 / 4096)

def test_non_contiguous_parameter():
    base = torch.zeros(300, 200); w = base.t()        # a non-contiguous view
    assert not w.is_contiguous()
    mutate_([w], 1., 1., generator=torch.Generator().manual_seed(0))
    assert (base != 0).all()                          # written through to the tensor itself

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

def test_mutate_returns_copy_parent_unchanged_even_mid_graph():
    "A child is a new model: its parent, and a graph the parent's forward left alive, are untouched."
    parent = mlp(); ref = state(parent)
    loss = parent(torch.randn(2, 3)).sum()
    child = mutate(parent, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    assert same(parent.state_dict(), ref) and child is not parent
    assert not torch.equal(child[0].weight, parent[0].weight)
    loss.backward()                                           # the parent's graph is intact
    assert parent[2].weight.grad is not None

def test_mutate_between_steps_of_a_training_loop():
    "In a plain loop, mutate_ is refused between forward and backward, then lands after the step."
    m, x = mlp(), torch.randn(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(3):
        loss = m(x).pow(2).mean()
        with pytest.raises(RuntimeError, match='saved for backward'): mutate_(m, 1., 0.1)
        loss.backward()
        ref = copy.deepcopy(m); ref.zero_grad(); ref(x).pow(2).mean().backward()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(m.parameters(), ref.parameters()))
        opt.step(); opt.zero_grad()
        before = state(m)
        mutate_(m, 1., 0.1, generator=torch.Generator().manual_seed(step))
        assert all((v != before[k]).all() for k, v in m.state_dict().items())

def test_first_layer_weight_not_saved_allowed():
    "The first Linear's weight isn't saved when the input needs no grad: PyTorch's own check agrees."
    m = mlp(); loss = m(torch.randn(4, 3)).sum()
    assert graph_refs(m[0].weight) == 0 and graph_refs(m[2].weight) == 1
    w0 = m[0].weight.clone()
    mutate_(m, 1., 0.1, include='0.*'); loss.backward()
    assert (m[0].weight != w0).all()

def test_frozen_weight_saved_for_input_grad_detected():
    lin = nn.Linear(3, 2); lin.weight.requires_grad_(False)
    x = torch.randn(4, 3, requires_grad=True); loss = lin(x).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(lin, 1., 0.1)
    loss.backward()
    w0 = lin.weight.clone(); mutate_(lin, 1., 0.1)
    assert (lin.weight != w0).all()

def test_retain_graph_keeps_it_live_and_del_releases():
    m = mlp(); loss = m(torch.randn(4, 3)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(m, 1., 0.1)
    del loss
    mutate_(m, 1., 0.1)
    assert graph_refs(m[2].weight) == 0

def test_no_grad_forward_saves_nothing():
    m = mlp(); before = state(m)
    with torch.no_grad(): m(torch.randn(4, 3))
    assert [graph_refs(p) for p in m.parameters()] == [0] * 4
    update_weights_(m, {'*': lambda w: w * 2})
    assert all(torch.equal(v, before[k] * 2) for k, v in m.state_dict().items())

def test_update_weights_same_check_and_check_graph_off():
    m = mlp(); loss = m(torch.randn(4, 3)).sum(); before = state(m)
    with pytest.raises(RuntimeError, match='update_weights_ after loss.backward'):
        update_weights_(m, {'*': lambda w: w * 0})
    assert same(m.state_dict(), before)
    update_weights_(m, {'*': lambda w: w * 0}, check_graph=False)     # opt-out: then PyTorch's own error follows
    with pytest.raises(RuntimeError, match='modified by an inplace operation'): loss.backward()

def test_lstm_weights_saved_by_a_graph_are_detected():
    lstm = nn.LSTM(4, 4); out = lstm(torch.randn(5, 2, 4))[0].sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(lstm, 1., 0.1)
    out.backward()
    w0 = lstm.weight_hh_l0.clone(); mutate_(lstm, 1., 0.1)
    assert (lstm.weight_hh_l0 != w0).all()

def test_saved_non_leaf_view_detected():
    "A non-leaf tensor (a view of a leaf) saved by a graph is detected too: no gradient accumulator to discount."
    base = torch.randn(4, 3, requires_grad=True)
    v = base[:2]
    out = (v * v).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_([v], 1., 0.1)
    out.backward()
    assert torch.equal(base.grad[:2], 2 * base[:2].detach()) and (base.grad[2:] == 0).all()

def test_update_weights_values_and_leaf():
    m = mlp(); w0 = m[0].weight.clone(); b0 = m[0].bias.clone(); w2 = m[2].weight.clone()
    update_weights_(m, {'0.*': lambda w: w + 1e-3 * w})
    assert torch.equal(m[0].weight, w0 + 1e-3 * w0) and torch.equal(m[0].bias, b0 + 1e-3 * b0)
    assert torch.equal(m[2].weight, w2)
    assert m[0].weight.requires_grad and m[0].weight.is_leaf

def test_update_weights_rules_compose_in_order():
    m = mlp(); w0 = m[0].weight.clone()
    update_weights_(m, {'*': lambda w: w + 1, '0.weight': lambda w: w * 2})
    assert torch.equal(m[0].weight, (w0 + 1) * 2)

def test_shrink_perturb_moments():
    torch.manual_seed(0)
    lin = nn.Linear(200, 200); w0 = lin.weight.clone()
    update_weights_(lin, {'weight': shrink_perturb(0.3, 0.02, torch.Generator().manual_seed(1))})
    eps = ((lin.weight - 0.3 * w0) / 0.02).double()
    n = eps.numel()
    assert abs(eps.mean()) < 6 / math.sqrt(n) and abs(eps.var() - 1) < 6 * math.sqrt(2 / n)

@pytest.mark.gpu
def test_cuda_params_cuda_generator():
    net = bn_net().cuda(); ref = copy.deepcopy(net)
    mutate_(net, 0.3, 0.1, generator=torch.Generator(device='cuda').manual_seed(0))
    assert not torch.equal(net[0].weight, ref[0].weight)
    with pytest.raises(ValueError, match="generator is on cpu but parameter '0.weight' is on cuda"):
        mutate_(net, 0.3, 0.1, generator=torch.Generator().manual_seed(0))
    net.half(); mutate_(net, 0.3, 0.1, generator=torch.Generator(device='cuda').manual_seed(0))

# ---- bad input

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

def refused(call, exc, *words):
    "`call(model)` raises `exc` with each of `words` in its message, and leaves the model exactly as it was."
    m = small_net(); snap = state(m)
    with pytest.raises(exc) as e: call(m)
    for w in words: assert w in str(e.value), (w, str(e.value))
    assert same(m.state_dict(), snap)

bad_rates = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (0 <= v <= 1)),
    st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False),
    st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=False),
    st.just(float('nan')))
wrong_types = st.one_of(st.booleans(), st.text(max_size=5), st.none(), st.lists(st.floats(0, 1), max_size=3),
                        st.just(torch.tensor(0.5)), st.just(1j))

@SETTINGS
@given(p=bad_rates)
def test_p_out_of_range(p):
    refused(lambda m: mutate_(m, p, 0.1), ValueError, 'p must be in [0, 1]', 'p=0.1')

@SETTINGS
@given(p=wrong_types)
def test_p_wrong_type(p):
    refused(lambda m: mutate_(m, p, 0.1), TypeError, 'p must be a float in [0, 1]', 'p=0.1',
            'or a mapping of glob patterns to such numbers')

@SETTINGS
@given(s=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float('nan')), st.just(float('inf'))))
def test_strength_bad_value(s):
    refused(lambda m: mutate_(m, 0.5, s), ValueError, 'strength must be finite and >= 0', 'strength=0.01')

@SETTINGS
@given(s=wrong_types)
def test_strength_wrong_type(s):
    refused(lambda m: mutate_(m, 0.5, s), TypeError, 'strength must be a non-negative float', 'or a mapping')

@SETTINGS
@given(p=bad_rates, pat=st.sampled_from(['*', '0.*', '*.bias']))
def test_p_mapping_bad_value(p, pat):
    refused(lambda m: mutate_(m, {pat: p}, 0.1), ValueError, f"p[{pat!r}] must be in [0, 1]")

@SETTINGS
@given(pat=st.text(alphabet='abcxyz_.', min_size=1, max_size=8))
def test_pattern_matching_nothing(pat):
    names = ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
    if any(fnmatch.fnmatchcase(n, pat) for n in names): return
    refused(lambda m: mutate_(m, {pat: 0.5}, 0.1), ValueError, 'match no parameter', "the names are ['0.weight'")
    refused(lambda m: mutate_(m, 0.5, 0.1, include=pat), ValueError, 'include', 'match no parameter')
    refused(lambda m: update_weights_(m, {pat: lambda w: w}), ValueError, 'rules', 'match no parameter', '0.weight')

@pytest.mark.parametrize('pat,exc', [(1, TypeError), ('', ValueError), (None, TypeError), (('a', 'b'), TypeError)])
def test_bad_pattern_keys(pat, exc):
    refused(lambda m: mutate_(m, {pat: 0.5}, 0.1), exc, 'p')
    refused(lambda m: update_weights_(m, {pat: lambda w: w}), exc, 'rules')

def test_empty_mapping():
    refused(lambda m: mutate_(m, {}, 0.1), ValueError, 'p is an empty mapping')

@pytest.mark.parametrize('inc', [3, [1, 2], '', ['*', '']])
def test_bad_include_exclude(inc):
    refused(lambda m: mutate_(m, 0.5, 0.1, include=inc), (TypeError, ValueError), 'include')
    refused(lambda m: mutate_(m, 0.5, 0.1, exclude=inc), (TypeError, ValueError), 'exclude')

def test_strength_mapping_missing_a_mutated_param():
    refused(lambda m: mutate_(m, {'*': 0.5}, {'0.*': 0.1}), ValueError, "strength: no pattern matches '1.weight'", "'*'")

@pytest.mark.parametrize('dt', [torch.int64, torch.int32, torch.complex64])
def test_integer_and_complex_params(dt):
    good = torch.zeros(5); bad = torch.zeros(5, dtype=dt)
    with pytest.raises(TypeError, match=rf"floating-point parameters; '1' is {dt}: pass exclude=\['1'\]"):
        mutate_([good, bad], 0.5, 0.1)
    assert (good == 0).all() and (bad == 0).all()
    mutate_({'a': good, 'b': bad}, 1., 0.1, exclude='b')   # the fix works
    assert (good != 0).all() and (bad == 0).all()

@pytest.mark.parametrize('obj', [nn.ReLU(), [], {}, nn.Sequential()])
def test_nothing_to_mutate(obj):
    with pytest.raises(ValueError, match='has no parameters'): mutate_(obj, 0.5, 0.1)
    with pytest.raises(ValueError, match='has no parameters'): update_weights_(obj, {'*': lambda w: w})

@pytest.mark.parametrize('obj', [3, 'weights', None, [1.0, 2.0], {'w': [1.]}])
def test_wrong_model_type(obj):
    with pytest.raises(TypeError, match='model_or_params|not a tensor'): mutate_(obj, 0.5, 0.1)

def test_mutate_needs_module():
    with pytest.raises(TypeError, match='mutate copies a model: pass an nn.Module'): mutate([torch.zeros(3)], 0.5, 0.1)

@pytest.mark.parametrize('dist', ['gaussian', None, 1])
def test_bad_dist(dist):
    refused(lambda m: mutate_(m, 0.5, 0.1, dist=dist), ValueError, "dist must be one of ('normal', 'uniform')")

@pytest.mark.parametrize('g', [0, 'cuda', torch.manual_seed])
def test_bad_generator(g):
    refused(lambda m: mutate_(m, 0.5, 0.1, generator=g), TypeError, 'generator must be a torch.Generator')

def test_generator_on_another_device_refused():
    w = torch.zeros(10)
    wm = torch.zeros(10, device='meta')   # a parameter on another device than the generator (no GPU needed)
    with pytest.raises(ValueError, match="generator is on cpu but parameter '1' is on meta.*torch.Generator\\(device='meta'\\)"):
        mutate_([w, wm], 1., 1., generator=torch.Generator())
    assert (w == 0).all()

@pytest.mark.parametrize('rules,exc,word', [
    ({}, TypeError, 'non-empty dict'), (None, TypeError, 'rules must be'), ([('*', abs)], TypeError, 'rules must be'),
    ({'*': 3}, TypeError, "rules['*'] must be a function"),
    ({'*': lambda w: w.sum()}, ValueError, "must return a tensor of '0.weight''s shape (4, 3)"),
    ({'*': lambda w: 1.0}, ValueError, 'got float'),
    ({'2.*': lambda w: w * 2, '0.weight': lambda w: w[:1]}, ValueError, "rules['0.weight'] must return a tensor"),
])
def test_update_weights_bad_rules_atomic(rules, exc, word):
    refused(lambda m: update_weights_(m, rules), exc, word)

def test_rule_raising_leaves_all_unchanged():
    def boom(w): raise RuntimeError('rule failed')
    refused(lambda m: update_weights_(m, {'0.*': lambda w: w * 2, '2.bias': boom}), RuntimeError, 'rule failed')

@SETTINGS
@given(v=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float('nan')), st.booleans(), st.text(max_size=3)))
def test_shrink_perturb_bad_values(v):
    with pytest.raises((TypeError, ValueError), match='shrink'): shrink_perturb(v, 0.1)
    with pytest.raises((TypeError, ValueError), match='noise'): shrink_perturb(0.5, v)

# ---- pinned defects

def test_batchnorm_statistics_are_not_mutated_as_genes():
    """PyGAD's torchga takes its genes from state_dict(), so BatchNorm running statistics mutate too: mutate_ takes
    named_parameters(), so every parameter (biases included) changes and no buffer does."""
    net, ref = bn_net(), bn_net()
    for m in (net, ref): m.train(); m(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))  # real stats
    mutate_(net, 1., 0.5)
    params = dict(ref.named_parameters())
    for k, v in net.state_dict().items():
        if k in params: assert (v != params[k]).all(), k
        else: assert torch.equal(v, ref.state_dict()[k]), k

def test_noise_is_drawn_in_a_few_vectorised_ops_on_the_parameters_device_and_dtype():
    """PyGAD works through numpy on the CPU, with a Python loop per gene and the global RNG: mutate_ draws with a few
    torch ops on the parameter's device, the noise in the parameter's dtype, from the given generator."""
    w = torch.zeros(100_000, dtype=torch.float64)
    torch.manual_seed(0); rng = torch.get_rng_state()
    with RandomDraws() as d: mutate_([w], 0.01, 1., generator=torch.Generator().manual_seed(0))
    assert len(d.ops) <= 4, d.ops
    assert all(dev == w.device for *_, dev, _ in d.ops)
    assert any(dt == torch.float64 for *_, dt in d.ops)
    assert torch.equal(torch.get_rng_state(), rng)

def test_update_lands_in_the_model_not_in_a_flat_copy():
    """estorch, pytorch-es and Uber deep-neuroevolution go through parameters_to_vector, a copy on the CPU: changing
    it changes nothing. update_weights_ changes the model itself."""
    m = mlp(); before = [p.clone() for p in m.parameters()]
    v = parameters_to_vector(m.parameters()); v.add_(1.)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))      # the flat copy's update is lost
    update_weights_(m, {'*': lambda w: w + 1})
    assert all(torch.equal(p, q + 1) for p, q in zip(m.parameters(), before))

def test_inplace_change_to_saved_weight_is_refused_with_a_clear_error():
    """PyTorch: a no_grad in-place change to a weight autograd saved (Linear.weight) between forward and backward
    makes backward() raise 'modified by an inplace operation', far from the cause. mutate_ raises at the change,
    naming the parameter and the fix, and leaves everything unchanged."""
    m = mlp(); loss = m(torch.randn(4, 3)).sum(); before = state(m)
    with pytest.raises(RuntimeError, match=r"\['2.weight'\] are saved for backward.*after loss.backward\(\) and before "
                                           r"the next forward"):
        mutate_(m, 1., 0.1)
    assert same(m.state_dict(), before)
    loss.backward()

def test_bias_only_change_between_forward_and_backward_is_allowed():
    """PyTorch: changing only a bias between forward and backward does not raise (Linear does not save it), and the
    gradient stays correct. mutate_ and update_weights_ allow it too (no false positive)."""
    m = mlp(); x = torch.randn(4, 3)
    loss = m(x).sum()
    mutate_(m, 1., 0.1, include='*.bias')
    update_weights_(m, {'*.bias': lambda b: b + 1})
    loss.backward()
    ref = mlp(); ref(x).sum().backward()   # the gradient of the forward that ran, with the old biases
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()))

def test_change_through_data_would_silently_corrupt_the_gradient():
    """PyTorch: .data.add_() never raises and silently computes the gradient with the new weight. mutate_ refuses
    the change, so the gradient is exactly the one of the forward that ran."""
    x = torch.randn(4, 3)
    ref = mlp(); ref(x).sum().backward()
    bad = mlp(); loss = bad(x).sum()
    bad[2].weight.data.add_(1.)                      # the anchor: no error...
    loss.backward()
    assert not torch.equal(bad[0].weight.grad, ref[0].weight.grad)   # ...and a wrong gradient
    ours = mlp(); loss = ours(x).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(ours, 1., 1.)
    loss.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), ref.parameters()))

def test_the_optimizer_keeps_tracking_the_changed_parameters():
    """PyTorch's advice: never rebind a Parameter (the optimizer would lose it); EvoTorch mutates flat vectors, not
    the module. mutate_ and update_weights_ write into the module's own Parameters: the optimizer and its state still
    hold them, and its next step moves the model's weights."""
    m = mlp(); opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(2, 3)).sum().backward(); opt.step()
    ids = [id(p) for p in m.parameters()]
    mutate_(m, 1., 0.1)
    update_weights_(m, {'0.weight': lambda w: torch.zeros_like(w)})
    assert [id(p) for p in m.parameters()] == ids
    assert all(p is q and p in opt.state for p, q in zip(opt.param_groups[0]['params'], m.parameters()))
    assert m[0].weight.requires_grad and m[0].weight.is_leaf
    opt.zero_grad(); m(torch.randn(4, 3)).sum().backward(); opt.step()
    assert not torch.equal(m[0].weight, torch.zeros_like(m[0].weight))
