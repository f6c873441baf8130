"""Bad input to mutate_, mutate, update_weights_ and the callbacks: a specific exception naming the argument and the fix,
and the parameters exactly unchanged after the failed call."""
import math
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from weightdrop.mutate import mutate_, mutate, update_weights_, shrink_perturb

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
def snapshot(m): return {k: v.clone() for k, v in m.state_dict().items()}
def unchanged(m, snap): return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())

def refused(call, exc, *words):
    m = net(); snap = snapshot(m)
    with pytest.raises(exc) as e: call(m)
    msg = str(e.value)
    for w in words: assert w in msg, (w, msg)
    assert unchanged(m, snap)
    return msg

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
    refused(lambda m: mutate_(m, p, 0.1), TypeError, 'p must be a number in [0, 1]', 'p=0.1')

@SETTINGS
@given(s=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float('nan')), st.just(float('inf'))))
def test_strength_bad_value(s):
    refused(lambda m: mutate_(m, 0.5, s), ValueError, 'strength must be finite and >= 0', 'strength=0.01')

@SETTINGS
@given(s=wrong_types)
def test_strength_wrong_type(s):
    refused(lambda m: mutate_(m, 0.5, s), TypeError, 'strength must be a number >= 0')

@SETTINGS
@given(p=bad_rates, pat=st.sampled_from(['*', '0.*', '*.bias']))
def test_p_mapping_bad_value(p, pat):
    refused(lambda m: mutate_(m, {pat: p}, 0.1), ValueError, f"p[{pat!r}] must be in [0, 1]")

@SETTINGS
@given(pat=st.text(alphabet='abcxyz_.', min_size=1, max_size=8))
def test_pattern_matching_nothing(pat):
    names = ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
    if any(__import__('fnmatch').fnmatchcase(n, pat) for n in names): return
    refused(lambda m: mutate_(m, {pat: 0.5}, 0.1), ValueError, 'match no parameter', "the names are ['0.weight'")
    refused(lambda m: mutate_(m, 0.5, 0.1, include=pat), ValueError, 'include', 'match no parameter')
    refused(lambda m: update_weights_(m, {pat: lambda w: w}), ValueError, 'rules', 'match no parameter', '0.weight')

@pytest.mark.parametrize('pat,exc', [(1, TypeError), ('', ValueError), (None, TypeError), (('a', 'b'), TypeError)])
def test_bad_pattern_keys(pat, exc):
    refused(lambda m: mutate_(m, {pat: 0.5}, 0.1), exc, 'p')
    refused(lambda m: update_weights_(m, {pat: lambda w: w}), exc, 'rules')

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

# ---------------------------------------------------------------- callbacks

@pytest.mark.parametrize('kw,exc,word', [
    (dict(every=0), ValueError, 'every must be'), (dict(every='step'), ValueError, 'every must be'),
    (dict(every=True), ValueError, 'every must be'),
    (dict(every='batch', event='after_loss'), ValueError, 'not a safe point'),
    (dict(every='epoch', event='after_step'), ValueError, 'not a safe point'),
    (dict(epochs='first'), TypeError, 'epochs must be'), (dict(epochs=[0.5]), TypeError, 'epochs must be'),
])
def test_callback_bad_args(kw, exc, word):
    from weightdrop.mutate_callbacks import WeightUpdateCallback, MutateCallback
    with pytest.raises(exc, match=word): WeightUpdateCallback({'*': lambda w: w}, **kw)
    with pytest.raises(exc, match=word): MutateCallback(0.1, 0.1, **kw)

def test_mutate_callback_bad_seed_and_schedule_before_training():
    from fastai.basics import DataLoaders, Learner, MSELossFlat
    from fastai.callback.schedule import SchedLin
    from weightdrop.mutate_callbacks import MutateCallback
    with pytest.raises(TypeError, match='seed must be an int'): MutateCallback(0.1, 0.1, seed='0')
    x = torch.randn(32, 3); dls = DataLoaders.from_dsets(list(zip(x, x[:, :2])), list(zip(x, x[:, :2])), bs=8)
    m = nn.Sequential(nn.Linear(3, 2)); snap = snapshot(m)
    for cb, word in ((MutateCallback(SchedLin(0.5, -0.5), 0.1), 'at pct=1.0: p must be in [0, 1]'),
                     (MutateCallback(0.1, {'nope.*': 0.1}), "strength: pattern(s) ['nope.*'] match no parameter")):
        with pytest.raises(ValueError, match=word.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(').replace(')', r'\)').replace('*', r'\*')):
            Learner(dls, m, loss_func=MSELossFlat(), cbs=cb).fit(1, 1e-2)
        assert unchanged(m, snap)
