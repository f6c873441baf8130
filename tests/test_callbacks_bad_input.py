"""Bad arguments to ResampleCallback, DropScheduler and Learner.mc_preds: a specific exception naming the argument and
the fix, and the model, its wrappers and their settings exactly as they were. Issue #6, "Bad input for callbacks"."""
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.basics import Learner, DataLoaders, DataLoader, SGD
from fastai.callback.schedule import SchedLin, SchedCos, SchedNo, combine_scheds
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout
from weightdrop.noise import WeightNoise
from weightdrop.callbacks import ResampleCallback, DropScheduler

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def make_learner(hijack=True, cbs=()):
    "A small MLP with DropConnect on the first Linear and weight noise on the second."
    torch.manual_seed(0)
    x = torch.randn(32, 8); y = x @ torch.randn(8, 1)
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=8, shuffle=True), DataLoader(ds[:16], bs=8), device='cpu')
    l1, l2 = nn.Linear(8, 16), nn.Linear(16, 1)
    if hijack: l1, l2 = WeightDropout(l1, 0.5), WeightNoise(l2, 0.1)
    learn = Learner(dls, nn.Sequential(l1, nn.ReLU(), l2), loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05, cbs=list(cbs))
    if hijack: learn.model[2].generator = torch.Generator().manual_seed(1)   # restored by identity and by state
    return learn

def state(learn):
    "Everything a failed call must leave alone: weights, training mode, and each wrapper's settings."
    mods = [m for m in learn.model.modules() if isinstance(m, WeightHijacker)]
    return dict(sd={k: v.detach().clone() for k, v in learn.model.state_dict().items()}, training=learn.model.training,
                wrappers=[(m.hold_mask, m.generator, m.generator.get_state() if m.generator is not None else None,
                           m.mc_dropout, m.training, getattr(m, 'weight_p', None), getattr(m, 'std', None)) for m in mods])

def assert_unchanged(learn, before):
    after = state(learn)
    assert list(after['sd']) == list(before['sd'])
    for k in before['sd']: assert torch.equal(after['sd'][k], before['sd'][k]), f'{k} changed'
    assert after['training'] == before['training']
    for a, b in zip(after['wrappers'], before['wrappers']):
        assert a[0] == b[0] and a[1] is b[1] and a[3:] == b[3:], (a, b)
        assert (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(a[2], b[2]))

def fit(learn, cbs):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cbs)

not_an_int = st.one_of(st.floats(allow_nan=False), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.just(1.0), st.just(b'1'))
not_a_bool = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.just(None), st.lists(st.booleans(), max_size=2),
                       st.integers())

# ResampleCallback

@FEW
@given(seed=not_an_int)
def test_resample_seed_wrong_type(seed):
    with pytest.raises(TypeError, match=r'seed must be an int or None'): ResampleCallback(seed=seed)

def test_resample_shared_masks_without_seed():
    with pytest.raises(ValueError, match=r'shared_masks=True needs a seed.*seed=0'): ResampleCallback(shared_masks=True)

@FEW
@given(shared=not_a_bool)
def test_resample_shared_masks_wrong_type(shared):
    with pytest.raises(TypeError, match=r'shared_masks must be a bool'): ResampleCallback(seed=0, shared_masks=shared)

def test_resample_on_model_without_hijackers():
    learn = make_learner(hijack=False)
    before = state(learn)
    with pytest.raises(ValueError, match=r'no weight-changing module.*WeightDropout'): fit(learn, ResampleCallback(seed=0))
    assert_unchanged(learn, before)

# DropScheduler

@FEW
@given(scheds=st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                        st.just(SchedLin(0., .5)), st.just({})))
def test_drop_scheduler_scheds_not_a_dict(scheds):
    with pytest.raises(TypeError, match=r'scheds must be a non-empty dict'): DropScheduler(scheds)

@FEW
@given(value=st.one_of(st.none(), st.floats(allow_nan=False), st.text(max_size=4), st.integers()))
def test_drop_scheduler_value_not_a_schedule(value):
    with pytest.raises(TypeError, match=r"scheds\['weight_p'\] must be a schedule"): DropScheduler({'weight_p': value})

@FEW
@given(name=st.text(min_size=1, max_size=8).filter(lambda n: n not in ('weight_p', 'std', 'embed_p')))
def test_drop_scheduler_unknown_name(name):
    "An attribute no wrapper can schedule fails before training, listing the ones that exist."
    learn = make_learner()
    before = state(learn)
    with pytest.raises(ValueError, match=r"scheds: no hijacked module.*available: \['std', 'weight_p'\]"):
        fit(learn, DropScheduler({name: SchedLin(0., .3)}))
    assert_unchanged(learn, before)

@FEW
@given(key=st.one_of(st.integers(), st.tuples(st.integers()), st.none(), st.floats(allow_nan=False)))
def test_drop_scheduler_non_string_name(key):
    learn = make_learner()
    before = state(learn)
    with pytest.raises(TypeError, match=r'scheds.*str'):
        fit(learn, DropScheduler({key: SchedLin(0., .3)}))
    assert_unchanged(learn, before)

out_of_range = st.one_of(st.floats(1., 10.), st.floats(-10., -1e-6))
@FEW
@given(name=st.sampled_from(['weight_p', 'std']), bad=out_of_range, good=st.floats(0., 0.9), bad_at_end=st.booleans())
def test_drop_scheduler_bad_endpoint(name, bad, good, bad_at_end):
    "A schedule that starts or ends outside the attribute's range fails before training, naming it and the first bad pct."
    if name == 'std' and bad >= 0: bad = -bad - 1e-3       # any std >= 0 is valid
    learn = make_learner()
    before = state(learn)
    sched = SchedLin(good, bad) if bad_at_end else SchedLin(bad, good)
    with pytest.raises(ValueError, match=rf"scheds\['{name}'\] gives .* at pct={'0[.][0-9]+|1[.]0' if bad_at_end else '0[.]0'}:"):
        fit(learn, DropScheduler({name: sched}))
    assert_unchanged(learn, before)

@pytest.mark.parametrize('value', ['0.5', None, [0.1]])
def test_drop_scheduler_schedule_returns_non_number(value):
    learn = make_learner()
    before = state(learn)
    with pytest.raises(ValueError, match=r"scheds\['weight_p'\] gives .* weight_p must be a float"):
        fit(learn, DropScheduler({'weight_p': lambda pct: value}))
    assert_unchanged(learn, before)

def test_drop_scheduler_out_of_range_in_the_middle():
    "One-cycle-style schedule: fine at both ends, 1.2 at its peak. It must fail before the first step."
    learn = make_learner()
    before = state(learn)
    peaked = combine_scheds([0.5, 0.5], [SchedCos(0.1, 1.2), SchedCos(1.2, 0.1)])
    with pytest.raises(ValueError, match=r"scheds\['weight_p'\]"): fit(learn, DropScheduler({'weight_p': peaked}))
    assert_unchanged(learn, before)

def test_drop_scheduler_error_leaves_resample_settings():
    learn = make_learner(cbs=[ResampleCallback(seed=0)])
    before = state(learn)
    with pytest.raises(ValueError, match=r"scheds"): fit(learn, DropScheduler({'weight_p': SchedLin(0., 1.5)}))
    assert_unchanged(learn, before)

# Learner.mc_preds

@FEW
@given(n=st.one_of(st.integers(max_value=1), st.floats(allow_nan=False), st.text(max_size=3), st.booleans(), st.none()))
def test_mc_preds_bad_n(n):
    learn = make_learner()
    before = state(learn)
    with pytest.raises((ValueError, TypeError), match=r'n must be an int >= 2'): learn.mc_preds(n=n)
    assert_unchanged(learn, before)

def test_mc_preds_without_hijackers():
    learn = make_learner(hijack=False)
    before = state(learn)
    with pytest.raises(ValueError, match=r'no weight-changing module.*WeightDropout'): learn.mc_preds(n=2)
    assert_unchanged(learn, before)

@settings(max_examples=8, deadline=None)
@given(seed=st.one_of(st.text(max_size=3), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2), st.booleans()))
def test_mc_preds_bad_seed(seed):
    learn = make_learner()
    before = state(learn)
    with pytest.raises(TypeError, match=r'seed must be an int or None'): learn.mc_preds(n=2, seed=seed)
    assert_unchanged(learn, before)

@pytest.mark.parametrize('dl', [5, 'x', [torch.zeros(8)]])
def test_mc_preds_bad_dl(dl):
    learn = make_learner()
    before = state(learn)
    with pytest.raises(TypeError, match=r'dl must be a DataLoader'): learn.mc_preds(dl=dl, n=2)
    assert_unchanged(learn, before)
