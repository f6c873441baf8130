"""Property-based bad-input tests: malformed constructions and calls of WeightDropout, EmbeddingDropout and WeightNoise.

Every failure must be a specific exception (TypeError/ValueError/RuntimeError) whose message names the argument and says
what to do instead, and after it the module must be exactly as before: same parameter and state-dict keys, every tensor
`torch.equal`, same Parameter objects, no marker left behind.
"""
import math, re
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout, EmbeddingDropout
from weightdrop.noise import WeightNoise

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIX_WORDS = ('pass', 'available', 'leave', 'use ', 'wrap', 'call', 'list each', 'name at least', 'pick', 'unwrap')

def snapshot(m:nn.Module):
    "Everything a failed call must leave as it was."
    return dict(params=[(n, p, p.detach().clone()) for n, p in m.named_parameters()],
                state={k: v.clone() for k, v in m.state_dict().items()},
                attrs={id(s): sorted(vars(s)) for s in m.modules()},
                resting={id(s): {k: v for k, v in vars(s).items() if isinstance(v, torch.Tensor)} for s in m.modules()})

def assert_unchanged(m:nn.Module, snap):
    now = snapshot(m)
    assert [n for n, *_ in now['params']] == [n for n, *_ in snap['params']]
    for (_, p0, v0), (_, p1, _) in zip(snap['params'], now['params']):
        assert p1 is p0 and torch.equal(p1.detach(), v0)
    assert list(now['state']) == list(snap['state'])
    assert all(torch.equal(now['state'][k], v) for k, v in snap['state'].items())
    assert now['attrs'] == snap['attrs']
    for k, d in snap['resting'].items():
        assert all(now['resting'][k][a] is t for a, t in d.items())

def check_error(fn, module, arg, types=(TypeError, ValueError)):
    "`fn()` raises one of `types`, naming `arg` and a fix, and leaves `module` exactly as it was."
    snap = snapshot(module)
    with pytest.raises(types) as ei: fn()
    msg = str(ei.value)
    assert arg in msg, msg
    assert any(w in msg for w in FIX_WORDS), msg
    assert_unchanged(module, snap)
    return msg

def lstm(): return nn.LSTM(3, 4, num_layers=2, bidirectional=True)
MAKERS = {'lstm': lstm, 'linear': lambda: nn.Linear(3, 4), 'gru_cell': lambda: nn.GRUCell(3, 4),
          'conv': lambda: nn.Conv1d(2, 3, 3)}

def make_wrapper(kind):
    return {'dropout': lambda m, **kw: WeightDropout(m, 0.5, **kw), 'noise': lambda m, **kw: WeightNoise(m, 0.1, **kw)}[kind]

bad_probs = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float('nan')), st.just(float('inf')),
                      st.just(1), st.just(-1), st.text(max_size=3), st.none(), st.booleans(), st.just(torch.tensor(0.5)),
                      st.lists(st.floats(0, 0.9), min_size=1, max_size=2), st.just(0.5j))

@SETTINGS
@given(p=bad_probs, which=st.sampled_from(sorted(MAKERS)))
def test_bad_weight_p(p, which):
    m = MAKERS[which]()
    check_error(lambda: WeightDropout(m, p), m, 'weight_p')
    wd = WeightDropout(MAKERS[which](), 0.3)
    check_error(lambda: setattr(wd, 'weight_p', p), wd, 'weight_p')
    assert wd.weight_p == 0.3

@SETTINGS
@given(p=bad_probs)
def test_bad_embed_p(p):
    emb = nn.Embedding(6, 3)
    check_error(lambda: EmbeddingDropout(emb, p), emb, 'embed_p')
    ed = EmbeddingDropout(nn.Embedding(6, 3), 0.2)
    check_error(lambda: setattr(ed, 'embed_p', p), ed, 'embed_p')
    assert ed.embed_p == 0.2

bad_stds = st.one_of(st.floats(max_value=-1e-9), st.just(float('nan')), st.just(float('inf')), st.just(-1),
                     st.text(max_size=3), st.none(), st.booleans(), st.just(torch.tensor(0.1)))

@SETTINGS
@given(std=bad_stds, which=st.sampled_from(sorted(MAKERS)))
def test_bad_std(std, which):
    m = MAKERS[which]()
    check_error(lambda: WeightNoise(m, std), m, 'std')
    wn = WeightNoise(MAKERS[which](), 0.1)
    check_error(lambda: setattr(wn, 'std', std), wn, 'std')
    assert wn.std == 0.1

bad_choice = st.one_of(st.text(max_size=8), st.none(), st.integers(), st.just(['row']), st.just('ROW'))

@SETTINGS
@given(v=bad_choice)
def test_bad_per_and_mode(v):
    if v in ('element', 'row'): v = v + 's'
    m = lstm()
    check_error(lambda: WeightDropout(m, 0.5, per=v), m, 'per')
    wd = WeightDropout(lstm(), 0.5, per='row')
    check_error(lambda: setattr(wd, 'per', v), wd, 'per')
    assert wd.per == 'row'
    if v in ('additive', 'multiplicative'): v = v + 's'
    check_error(lambda: WeightNoise(m, 0.1, mode=v), m, 'mode')
    wn = WeightNoise(lstm(), 0.1, mode='multiplicative')
    check_error(lambda: setattr(wn, 'mode', v), wn, 'mode')
    assert wn.mode == 'multiplicative'

def _no_glob(s): return not any(c in s for c in '*?[')

bad_names = st.one_of(
    st.just([]), st.just(()),
    st.lists(st.sampled_from(['weight_hh_l0', 'weight_ih_l0']), min_size=2, max_size=3).filter(lambda l: len(set(l)) < len(l)),
    st.text(min_size=1, max_size=12).filter(_no_glob).map(lambda s: 'x' + s),     # no such parameter
    st.lists(st.text(min_size=1, max_size=6).filter(_no_glob).map(lambda s: 'nope_' + s), min_size=1, max_size=3, unique=True),
    st.integers(), st.just({'weight_hh_l0': 1}), st.just(['weight_hh_l0', 3]), st.just(b'weight_hh_l0'),
    st.just('module.weight_hh_l0'), st.just('weight_hh_l9*'))

@SETTINGS
@given(names=bad_names, kind=st.sampled_from(['dropout', 'noise']))
def test_bad_layer_names(names, kind):
    m = lstm()
    msg = check_error(lambda: make_wrapper(kind)(m, layer_names=names), m, 'layer_names')
    if isinstance(names, str) and names.startswith('x'): assert "available: ['weight_ih_l0'" in msg

not_modules = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.just(torch.zeros(3, 3)),
                        st.just([nn.Linear(2, 2)]), st.just(nn.Linear), st.just(lambda x: x), st.just(nn.Parameter(torch.ones(2))))

@SETTINGS
@given(obj=not_modules, kind=st.sampled_from(['dropout', 'noise', 'embedding']))
def test_not_a_module(obj, kind):
    make = {'dropout': lambda: WeightDropout(obj, 0.5), 'noise': lambda: WeightNoise(obj, 0.1),
            'embedding': lambda: EmbeddingDropout(obj, 0.1)}[kind]
    with pytest.raises(TypeError) as ei: make()
    msg = str(ei.value)
    assert ('emb' if kind == 'embedding' else 'module') in msg and any(w in msg for w in FIX_WORDS), msg

class IntWeights(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3, dtype=dtype), requires_grad=dtype.is_complex)
        self.bias = nn.Parameter(torch.zeros(3))
    def forward(self, x): return x @ self.weight.real.float().T + self.bias

@SETTINGS
@given(dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]),
       kind=st.sampled_from(['dropout', 'noise']), pattern=st.sampled_from([None, 'weight', 'w*', '*']))
def test_non_float_parameters(dtype, kind, pattern):
    m = IntWeights(dtype)
    msg = check_error(lambda: make_wrapper(kind)(m, layer_names=pattern), m, 'layer_names')
    assert 'floating-point' in msg and str(dtype) in msg

@SETTINGS
@given(make=st.sampled_from([nn.ReLU, nn.Identity, nn.Sequential, lambda: nn.Dropout(0.5), lambda: nn.MaxPool1d(2)]),
       kind=st.sampled_from(['dropout', 'noise']))
def test_modules_without_parameters(make, kind):
    m = make()
    msg = check_error(lambda: make_wrapper(kind)(m), m, 'layer_names')
    assert 'available: []' in msg

@SETTINGS
@given(kind=st.sampled_from(['dropout', 'noise']), how=st.sampled_from(['wrapper', 'inner_same', 'inner_glob', 'nested_raw']))
def test_wrapped_module_wrapped_again(kind, how):
    first = make_wrapper(kind)(lstm())
    first(torch.randn(2, 1, 3))
    if how == 'wrapper':
        check_error(lambda: make_wrapper(kind)(first), first, 'module', types=TypeError)
    elif how == 'inner_same':
        check_error(lambda: make_wrapper(kind)(first.module, layer_names='weight_hh_l0'), first, 'layer_names')
    elif how == 'inner_glob':   # the glob reaches only moved-away weights: nothing left to match
        check_error(lambda: make_wrapper(kind)(first.module, layer_names='weight_hh*'), first, 'layer_names')
    else:
        outer = nn.Sequential(first)
        check_error(lambda: make_wrapper(kind)(outer, layer_names='*weight_hh*'), outer, 'layer_names')

def test_embedding_wrapped_again():
    emb = nn.Embedding(6, 3); ed = EmbeddingDropout(emb, 0.2)
    check_error(lambda: EmbeddingDropout(emb, 0.2), ed, 'emb')
    check_error(lambda: EmbeddingDropout(ed, 0.2), ed, 'emb', types=TypeError)
    check_error(lambda: WeightDropout(emb, 0.2), ed, 'layer_names')
    emb2 = nn.Embedding(6, 3); wd = WeightDropout(emb2, 0.2)   # weight moved to the wrapper
    check_error(lambda: EmbeddingDropout(emb2, 0.2), wd, 'emb')

@SETTINGS
@given(attr=st.one_of(st.sampled_from(['forward', 'training', 'layer_names', 'weight_hh_l0_raw', 'resample', '_x', 'a b', 'class',
                                       '', 'hold_mask', 'state_dict']), st.integers(), st.none()))
def test_bad_module_attr(attr):
    m = lstm()
    check_error(lambda: WeightHijacker(m, module_attr=attr), m, 'module_attr')

@SETTINGS
@given(gen=st.one_of(st.integers(), st.text(max_size=3), st.just(torch.default_generator.initial_seed())),
       flag=st.one_of(st.integers(2, 5), st.text(max_size=3), st.just(None)))
def test_bad_generator_and_flags(gen, flag):
    m = lstm()
    check_error(lambda: WeightDropout(m, 0.5, generator=gen), m, 'generator')
    check_error(lambda: WeightDropout(m, 0.5, hold_mask=flag), m, 'hold_mask')

def _mutations(sd):
    "Ways a state dict can fail to fit."
    keys = list(sd)
    return st.one_of(
        st.sampled_from(keys).map(lambda k: {a: v for a, v in sd.items() if a != k}),                  # a missing key
        st.text(min_size=1, max_size=8).map(lambda k: {**sd, 'extra_' + k: torch.zeros(1)}),            # an unexpected key
        st.tuples(st.sampled_from(keys), st.integers(1, 3)).map(                                         # a wrong shape
            lambda t: {**sd, t[0]: torch.zeros(*(s + t[1] for s in sd[t[0]].shape))}))

@SETTINGS
@given(data=st.data(), kind=st.sampled_from(['dropout', 'noise', 'embedding']), own=st.booleans())
def test_mismatched_state_dict(data, kind, own):
    if kind == 'embedding':
        m, donor = EmbeddingDropout(nn.Embedding(6, 3), 0.2), nn.Embedding(6, 3)
    else:
        m, donor = make_wrapper(kind)(lstm()), lstm()
    m(torch.tensor([1, 2]) if kind == 'embedding' else torch.randn(2, 1, 3))   # the module shows a transformed weight
    sd = {k: v.clone() + 1 for k, v in (m.state_dict() if own else donor.state_dict()).items()}
    bad = data.draw(_mutations(sd))
    given_copy = {k: v.clone() for k, v in bad.items()}
    check_error(lambda: m.load_state_dict(bad), m, 'state_dict', types=RuntimeError)
    assert list(bad) == list(given_copy) and all(torch.equal(bad[k], given_copy[k]) for k in bad)   # the input untouched
    m.load_state_dict(sd)   # and a fitting one still loads

@SETTINGS
@given(kind=st.sampled_from(['dropout', 'noise']), call=st.sampled_from(['forward', 'resample', 'unwrap']))
def test_use_after_unwrap(kind, call):
    w = make_wrapper(kind)(lstm())
    plain = w.unwrap()
    fn = {'forward': lambda: w(torch.randn(2, 1, 3)), 'resample': w.resample, 'unwrap': w.unwrap}[call]
    check_error(fn, plain, 'unwrap', types=RuntimeError)

@SETTINGS
@given(kind=st.sampled_from(['dropout', 'noise']), hold=st.booleans(), n_in=st.integers(1, 6).filter(lambda n: n != 3))
def test_bad_call_leaves_module_unchanged(kind, hold, n_in):
    "A forward that fails inside the module (wrong input size) leaves the wrapper exactly as before."
    w = make_wrapper(kind)(lstm(), hold_mask=hold)
    w(torch.randn(2, 1, 3))
    snap = snapshot(w)
    with pytest.raises(RuntimeError): w(torch.randn(2, 1, n_in))
    now = snapshot(w)
    assert list(now['state']) == list(snap['state']) and all(torch.equal(now['state'][k], v) for k, v in snap['state'].items())
    for (_, p0, v0), (_, p1, _) in zip(snap['params'], now['params']): assert p1 is p0 and torch.equal(p1.detach(), v0)
    lstm_mod = w.module   # the module shows plain (detached) tensors, never a graph
    for n in lstm_mod._flat_weights_names: assert not getattr(lstm_mod, n).requires_grad or isinstance(getattr(lstm_mod, n), nn.Parameter)
