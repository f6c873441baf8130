"Tests for weightdrop.mutate_callbacks: WeightUpdateCallback and MutateCallback in fastai training loops."
import re
import pytest
import torch
from torch import nn
from fastai.basics import DataLoaders, Learner, MSELossFlat, set_seed
from fastai.callback.core import Callback
from fastai.callback.schedule import SchedLin
from weightdrop.mutate import graph_refs
from weightdrop.mutate_callbacks import WeightUpdateCallback, MutateCallback

def state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

def learner(cbs, model=None, seed=0):
    "Six training batches of 16 per epoch, two validation batches."
    set_seed(seed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g); y = x[:, :2] * 2
    dls = DataLoaders.from_dsets(list(zip(x[:96], y[:96])), list(zip(x[96:], y[96:])), bs=16)
    return Learner(dls, mlp() if model is None else model, loss_func=MSELossFlat(), cbs=cbs)

# ---- behaviour

def test_weight_update_every_n_training_batches_and_chosen_epochs():
    cb = WeightUpdateCallback({'*.bias': lambda b: b * 0}, every=4)
    learner(cb).fit(3, 1e-2)
    assert [it for _, it in cb.applied] == [3, 7, 11, 15]            # after the 4th, 8th, 12th and 16th steps
    cb = WeightUpdateCallback({'*.bias': lambda b: b * 0}, every='epoch', epochs=lambda e: e % 2 == 0)
    learn = learner(cb); learn.fit(3, 1e-2)
    assert [e for e, _ in cb.applied] == [0, 2]
    assert (learn.model[2].bias == 0).all()                          # the last epoch ended with the rule

def test_mutate_callback_schedule_logged_and_seeded():
    runs = []
    for _ in range(2):
        cb = MutateCallback(SchedLin(0.2, 0.), SchedLin(0.1, 0.01), every='batch', seed=3)
        learn = learner(cb); learn.fit(2, 1e-2)
        runs.append(state(learn.model))
        hp = learn.recorder.hps
        assert len(hp['mutate_p']) == 12 and hp['mutate_p'][0] == pytest.approx(0.2)
        assert hp['mutate_strength'][6] == pytest.approx(0.1 + (0.01 - 0.1) * 6 / 12)
    assert same(*runs)

def test_mutate_callback_record_sits_beside_one_cycle_and_replaces_an_earlier_fits():
    "fit_one_cycle then fit: the second fit's record holds its own series, not the first fit's learning rates."
    learn = learner(MutateCallback(SchedLin(0.1, 0.), 0.01, every='batch', seed=0))
    learn.fit_one_cycle(2, 1e-2)
    hp = learn.recorder.hps
    assert sorted(hp) == ['lr', 'mom', 'mutate_p', 'mutate_strength'] and len(hp['lr']) == len(hp['mutate_p']) == 12
    learn.fit(1, 1e-2)
    assert sorted(learn.recorder.hps) == ['mutate_p', 'mutate_strength'] and len(learn.recorder.hps['mutate_p']) == 6

def test_mutate_callback_epochs_only():
    cb = MutateCallback(0.5, 0.1, every='epoch', epochs=[1]); learn = learner(cb)
    w = [learn.model[0].weight.clone()]
    class Snap(Callback):
        order = cb.order + 1   # the weight at the end of each epoch, after MutateCallback acted
        def after_epoch(self): w.append(self.learn.model[0].weight.clone())
    learn.fit(3, 0., cbs=Snap())
    assert [e for e, _ in cb.applied] == [1]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])   # lr 0

def test_mutate_callback_mapping_p_mutates_only_its_layers():
    model = mlp(); ref = state(model)
    learn = learner(MutateCallback({'0.*': 0.5}, 0.01, seed=0), model); learn.fit(1, 0.)
    assert not torch.equal(model[0].weight, ref['0.weight'])
    assert torch.equal(model[2].weight, ref['2.weight']) and torch.equal(model[2].bias, ref['2.bias'])
    assert 'mutate_p' not in (getattr(learn.recorder, 'hps', None) or {})   # a mapping has no single value to plot

# ---- bad input

@pytest.mark.parametrize('event', ['after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step'])
def test_unsafe_events_refused(event):
    for make in (lambda: WeightUpdateCallback({'*': lambda w: w}, 'batch', event),
                 lambda: MutateCallback(0.1, 0.1, 'batch', event)):
        with pytest.raises(ValueError, match=f"'{event}' is not a safe point for every='batch'"): make()

@pytest.mark.parametrize('kw,exc,word', [
    (dict(every=0), ValueError, 'every must be >= 1'), (dict(every='step'), ValueError, 'every must be one of'),
    (dict(every=True), TypeError, 'every must be an int'),
    (dict(every='epoch', event='after_step'), ValueError, 'not a safe point'),
    (dict(epochs='first'), TypeError, 'epochs must be'), (dict(epochs=[0.5]), TypeError, 'epochs must be'),
])
def test_callback_bad_args(kw, exc, word):
    with pytest.raises(exc, match=word): WeightUpdateCallback({'*': lambda w: w}, **kw)
    with pytest.raises(exc, match=word): MutateCallback(0.1, 0.1, **kw)

@pytest.mark.parametrize('kw,exc,word', [
    (dict(p=1.5), ValueError, 'p must be in [0, 1]'), (dict(strength=-1.), ValueError, 'strength must be finite'),
    (dict(p={'*': 'a'}), TypeError, "p['*'] must be a float"), (dict(dist='gaussian'), ValueError, 'dist must be one of'),
    (dict(seed='0'), TypeError, 'seed must be an int'), (dict(include=3), TypeError, 'include must be a glob pattern'),
])
def test_mutate_callback_refuses_bad_arguments_when_built(kw, exc, word):
    with pytest.raises(exc, match=re.escape(word)): MutateCallback(**{'p': 0.1, 'strength': 0.1, **kw})

def test_mutate_callback_setter_checks_and_keeps_the_old_value():
    cb = MutateCallback(0.1, 0.1)
    with pytest.raises(ValueError, match=re.escape('p must be in [0, 1]')): cb.p = 2.
    with pytest.raises(ValueError, match='dist must be one of'): cb.dist = 'gaussian'
    assert (cb.p, cb.dist) == (0.1, 'normal')
    cb.p = SchedLin(0.1, 0.)                                          # a schedule, as in the constructor
    assert cb.values(0.5)[0] == pytest.approx(0.05)

@pytest.mark.parametrize('cb,word', [
    (lambda: MutateCallback(SchedLin(0.5, -0.5), 0.1), 'at pct=1.0: p must be in [0, 1]'),
    (lambda: MutateCallback(0.1, {'nope.*': 0.1}), "strength: pattern(s) ['nope.*'] match no parameter"),
    (lambda: WeightUpdateCallback({'fc1.*': lambda w: w}), "rules: pattern(s) ['fc1.*'] match no parameter"),
])
def test_bad_schedule_or_pattern_refused_before_the_first_batch(cb, word):
    m = mlp(); snap = state(m)
    with pytest.raises(ValueError, match=re.escape(word)): learner(cb(), m).fit(1, 1e-2)
    assert same(m.state_dict(), snap)

# ---- pinned defects

def test_callback_changes_weights_only_when_no_graph_holds_them():
    """PyTorch: a weight changed in place between the forward and the backward corrupts the gradient (or fails the
    backward far from the cause). The callbacks act after the optimizer step, when no graph holds the weights."""
    seen = []
    def rule(w):
        seen.append(graph_refs(learn.model[2].weight))
        return w * 0.5
    learn = learner(WeightUpdateCallback({'2.weight': rule}, every='batch'))
    learn.fit(2, 1e-2)
    assert len(seen) == 12 and set(seen) == {0}
