"""weightdrop.callbacks in the workflows users run: fits after fits, lr_find then fit, fits stopped mid-batch, schedules
beside fastai's, Monte-Carlo predictions on a language model; bad arguments; and what fastai gets wrong that we pin."""
import copy, gc, pickle, statistics, time, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.basics import Learner, DataLoaders, DataLoader, Callback, CancelFitException, SGD
from fastai.torch_core import set_seed
from fastai.callback.schedule import SchedLin, SchedCos, combine_scheds
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout
from weightdrop.noise import WeightNoise
from weightdrop.validate import Checked, check_nonneg
from weightdrop.callbacks import ResampleCallback, DropScheduler, record_hps, hijackers

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

class Boom(Exception): pass

def regression_learner(cbs=(), shuffle=True, n=64, seed=0):
    "A small MLP with DropConnect on both Linears; data that it can fit. Seeded: the data order too."
    set_seed(seed)
    x = torch.randn(n, 8); y = x @ torch.randn(8, 1)
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=8, shuffle=shuffle), DataLoader(ds[:16], bs=8), device='cpu')
    model = nn.Sequential(WeightDropout(nn.Linear(8, 16), 0.5), nn.ReLU(), WeightDropout(nn.Linear(16, 1), 0.3))
    return Learner(dls, model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05, cbs=list(cbs))

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

def record_masks(learn):
    "Which weights of the first layer are dropped, at every training call, in order."
    seen = []
    def hook(mod, args):
        if mod.training: seen.append(mod.weight.detach() == 0)
    learn.model[0].wrapped().register_forward_pre_hook(hook)
    return seen

def plain_mlp_eval(model, x):
    "The MLP computed by hand from the raw weights: the eval reference."
    l1, l2 = model[0], model[2]
    h = F.relu(F.linear(x, l1.weight_raw, l1.wrapped().bias))
    return F.linear(h, l2.weight_raw, l2.wrapped().bias)

def assert_no_graph_on_modules(model):
    "Between calls, no tensor attribute of any submodule keeps an autograd graph alive."
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, torch.Tensor): assert v.grad_fn is None, f'{name}.{attr} keeps a graph alive'

def assert_eval_ready(learn, x):
    "eval outputs are exactly the raw-weight MLP's, through the module and through fastai's get_preds."
    model = learn.model
    assert_no_graph_on_modules(model)
    model.eval()
    with torch.no_grad(): assert torch.equal(model(x), plain_mlp_eval(model, x))
    with learn.no_bar(): preds, _ = learn.get_preds()
    with torch.no_grad(): ref = plain_mlp_eval(model, torch.stack([b for b, _ in learn.dls.valid.dataset]))
    assert torch.equal(preds, ref)

class FailAt(Callback):
    "Raise `exc` at `event` of training batch number `n`; `event='forward'` raises inside the second layer's forward."
    order = 60
    def __init__(self, exc, event='after_pred', n=3): self.exc, self.event, self.n = exc, event, n
    def _maybe(self, event):
        if self.training and event == self.event and self.iter == self.n: raise self.exc
    def before_batch(self):
        if self.training and self.event == 'forward' and self.iter == self.n:
            def hook(mod, args): handle.remove(); raise self.exc
            handle = self.learn.model[2].wrapped().register_forward_pre_hook(hook)
    def after_pred(self): self._maybe('after_pred')
    def after_backward(self): self._maybe('after_backward')
    def before_step(self): self._maybe('before_step')

CASES = [(CancelFitException(), 'after_pred'), (CancelFitException(), 'after_backward'),
         (Boom('mid-batch'), 'after_pred'), (Boom('mid-batch'), 'before_step'), (Boom('in the model'), 'forward'),
         (KeyboardInterrupt(), 'after_backward'), (KeyboardInterrupt(), 'forward')]
IDS = ['cancel-after_pred', 'cancel-after_backward', 'exception-after_pred', 'exception-before_step',
       'exception-in-forward', 'ctrl_c-after_backward', 'ctrl_c-in-forward']

def stop_fit(learn, exc, event):
    "Fit until `exc` stops it, as the user sees it: a cancel returns, anything else propagates."
    if isinstance(exc, CancelFitException): quiet_fit(learn, 2, cbs=FailAt(exc, event))
    else:
        with pytest.raises(type(exc)): quiet_fit(learn, 2, cbs=FailAt(exc, event))

# ---- behaviour

def test_resample_one_mask_per_batch_held_over_calls():
    "Every call in a training batch sees the batch's mask; each batch draws a new one; validation sees raw weights."
    learn = regression_learner([ResampleCallback(seed=0)])
    seen = []
    learn.model[0].wrapped().register_forward_hook(lambda m, i, o: seen.append((m.training, m.weight.detach().clone())))
    class CallTwice(Callback):
        def after_pred(self):
            if self.training: self.learn.model(*self.xb)
    quiet_fit(learn, 1, cbs=CallTwice())
    train = [w for t, w in seen if t]
    assert len(train) == 16
    assert all(torch.equal(a, b) for a, b in zip(train[::2], train[1::2]))
    assert not any(torch.equal(a, b) for a, b in zip(train[:-2:2], train[2::2]))
    assert all(torch.equal(w, learn.model[0].weight_raw.detach()) for t, w in seen if not t)

def test_resample_seeded_fits_draw_new_masks_each_fit():
    "Two fits of one Learner with `ResampleCallback(seed=0)`: the second draws its own masks, not the first's again."
    learn = regression_learner([ResampleCallback(seed=0)])
    seen = record_masks(learn)
    quiet_fit(learn, 1); quiet_fit(learn, 1)
    assert len(seen) == 16
    assert not any(torch.equal(a, b) for a, b in zip(seen[:8], seen[8:]))

def test_resample_fine_tune_draws_new_masks_in_the_unfrozen_fit():
    "`fine_tune` (a frozen fit, then an unfrozen one) draws fresh masks in the second fit."
    learn = regression_learner([ResampleCallback(seed=0)])
    seen = record_masks(learn)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 0.01, freeze_epochs=1)
    assert len(seen) == 16
    assert not any(torch.equal(a, b) for a, b in zip(seen[:8], seen[8:]))
    assert learn.cbs.filter(lambda c: isinstance(c, ResampleCallback))[0].step == 16

def run_fits(seed, n_fits=3):
    learn = regression_learner([ResampleCallback(seed=seed)])
    seen = record_masks(learn)
    for _ in range(n_fits): quiet_fit(learn, 1)
    return seen, {k: v.clone() for k, v in learn.model.state_dict().items()}

def test_resample_same_seed_fresh_learner_replays_every_fit():
    "A fresh Learner with the same seed replays the whole sequence of fits: every mask, and the final weights, bit for bit."
    (masks, sd), (masks2, sd2) = run_fits(1), run_fits(1)
    assert len(masks) == len(masks2) == 24
    assert all(torch.equal(a, b) for a, b in zip(masks, masks2))
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    other, _ = run_fits(2)
    assert not any(torch.equal(a, b) for a, b in zip(masks, other))

def test_resample_lr_find_then_fit_equals_fit(tmp_path):
    "lr_find restores the weights; the fit after it ends with the weights of the same fit without lr_find, bit for bit."
    def final(lr_find_first):
        learn = regression_learner([ResampleCallback(seed=0)], shuffle=False)
        learn.path = tmp_path
        with learn.no_bar(), learn.no_logging():
            if lr_find_first: learn.lr_find(num_it=10, show_plot=False)
            learn.fit(2)
        return {k: v.clone() for k, v in learn.model.state_dict().items()}
    plain, found = final(False), final(True)
    assert all(torch.equal(plain[k], found[k]) for k in plain)

def test_resample_step_resumes_the_sequence():
    "A run resumed in a new Learner from the checkpoint and `step` of the first fit draws the masks the second fit drew."
    learn = regression_learner([ResampleCallback(seed=0)], shuffle=False)
    seen = record_masks(learn)
    quiet_fit(learn, 1)
    ckpt = copy.deepcopy(learn.model.state_dict())
    quiet_fit(learn, 1)
    resumed_cb = ResampleCallback(seed=0); resumed_cb.step = 8
    resumed = regression_learner([resumed_cb], shuffle=False)
    resumed.model.load_state_dict(ckpt)
    seen2 = record_masks(resumed)
    quiet_fit(resumed, 1)
    assert all(torch.equal(a, b) for a, b in zip(seen[8:], seen2)) and len(seen2) == 8

def test_resample_leaves_the_modules_generator_alone():
    "Seeded draws lend each module a generator for the draw only: the user's generator is not consumed or replaced."
    learn = regression_learner([ResampleCallback(seed=0)])
    gen = torch.Generator().manual_seed(5); state = gen.get_state()
    learn.model[2].generator = gen
    quiet_fit(learn, 1)
    assert learn.model[2].generator is gen and torch.equal(gen.get_state(), state)

@pytest.mark.parametrize('exc,event', CASES, ids=IDS)
def test_fastai_fit_stopped_leaves_model_eval_ready(exc, event):
    "A fit cancelled or crashed mid-batch (no ResampleCallback): eval outputs are the raw-weight outputs, and the next fit trains."
    learn = regression_learner()
    stop_fit(learn, exc, event)
    assert_eval_ready(learn, torch.randn(5, 8))
    before = learn.model[0].weight_raw.detach().clone()
    quiet_fit(learn, 1)
    assert not torch.equal(learn.model[0].weight_raw.detach(), before)

def test_resample_callback_fit_does_not_warn():
    learn = regression_learner([ResampleCallback(seed=0)])
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='You are shadowing')
        quiet_fit(learn, 1)

def test_record_hps_merges_one_fit_and_drops_older_fits():
    "fastai's one-cycle record and a drop-rate schedule side by side; a later fit's record carries nothing of the earlier one."
    learn = regression_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 0.01, cbs=DropScheduler({'weight_p': SchedLin(0., 0.4)}))
        assert sorted(learn.recorder.hps) == ['lr', 'mom', 'weight_p']
        assert [len(v) for v in learn.recorder.hps.values()] == [8, 8, 8]
        learn.fit(1, cbs=DropScheduler({'weight_p': SchedLin(0.4, 0.)}))   # as many batches as the one-cycle fit
    assert list(learn.recorder.hps) == ['weight_p']
    assert learn.recorder.hps['weight_p'][0] == pytest.approx(0.4)

def test_record_hps_without_recorder_does_nothing():
    learn = regression_learner()
    learn.remove_cb(learn.recorder)
    record_hps(learn, {'weight_p': [0.1]})
    assert not hasattr(learn, 'recorder')

class Scaled(WeightHijacker):
    "A user's hijacker whose setting is a validated `Checked` attribute rather than a property."
    scale = Checked(check_nonneg)
    def __init__(self, module, scale): super().__init__(module); self.scale = scale
    def sample(self, raw): return torch.empty_like(raw).fill_(1 + self.scale)
    def combine(self, raw, draw): return raw * draw

def test_drop_scheduler_sets_a_checked_attribute():
    "DropScheduler schedules any float setting behind a validating attribute, not only properties."
    torch.manual_seed(0)
    x = torch.randn(32, 4); ds = list(zip(x, x.sum(1, keepdim=True)))
    dls = DataLoaders(DataLoader(ds, bs=8), DataLoader(ds[:8], bs=8), device='cpu')
    learn = Learner(dls, nn.Sequential(Scaled(nn.Linear(4, 1), 0.)), loss_func=nn.MSELoss(), opt_func=SGD, lr=0.01)
    quiet_fit(learn, 1, cbs=DropScheduler({'scale': SchedLin(0., 0.3)}))
    assert learn.recorder.hps['scale'] == pytest.approx([0., 0.075, 0.15, 0.225])
    with pytest.raises(ValueError, match=r"scheds\['scale'\] gives -0.1 at pct=0.0: scale must be finite and >= 0"):
        quiet_fit(learn, 1, cbs=DropScheduler({'scale': SchedLin(-0.1, 0.3)}))
    assert learn.model[0].scale == pytest.approx(0.225)   # the last batch's, as the refused fit found it

def test_mc_preds_inside_no_bar_draws_no_bar(capsys):
    "fastai's `learn.no_bar()` silences mc_preds' progress bar too; without it the bar shows."
    learn = regression_learner()
    with learn.no_bar(): learn.mc_preds(n=3, seed=0)
    assert capsys.readouterr().out == ''
    learn.mc_preds(n=3, seed=0)
    assert capsys.readouterr().out != ''
    assert hasattr(learn, 'progress')            # the learner's own bar is back

def test_mc_preds_reads_a_shuffled_loader_in_order():
    "Every pass reads the items in the dataset's order, so with no dropout the mean is the plain prediction and the spread 0."
    learn = regression_learner()
    for m in hijackers(learn.model): m.weight_p = 0.
    with learn.no_bar():
        mean, std, targs = learn.mc_preds(dl=learn.dls.train, n=3, with_targs=True)
        plain, ptargs = learn.get_preds(dl=learn.dls.train.new(shuffle=False))
    assert torch.equal(targs, ptargs)                                   # the dataset's order, every pass
    assert torch.equal(mean, torch.stack([plain] * 3).mean(0)) and std.abs().max() < 1e-6

# Soak

def graph_size(t):
    "Number of autograd nodes behind `t`: the work of one backward, counted instead of timed."
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        seen.add(f); todo += [g for g, _ in f.next_functions]
    return len(seen)

class Soak(Callback):
    "Time every training batch; count live tensors and the RSS at a few batches."
    order = 99
    def __init__(self, probes): self.probes, self.times, self.counts, self.rss, self.graphs, self.nodes = probes, [], {}, {}, 0, {}
    def before_batch(self): self.t0 = time.perf_counter()
    def after_loss(self):
        if self.training and len(self.times) + 1 in self.probes: self.nodes[len(self.times) + 1] = graph_size(self.learn.loss_grad)
    def after_batch(self):
        if not self.training: return
        self.times.append(time.perf_counter() - self.t0)
        i = len(self.times)
        if i in self.probes:
            self.learn.loss_grad = self.learn.pred = None   # this batch's graph may be freed; a leaked one would stay
            gc.collect()
            with warnings.catch_warnings():   # isinstance on some deprecated torch objects warns
                warnings.simplefilter('ignore')
                self.counts[i] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
            self.losses_at = getattr(self, 'losses_at', {}); self.losses_at[i] = len(self.learn.recorder.losses)
            with open('/proc/self/statm') as f: self.rss[i] = int(f.read().split()[1]) * 4096
        self.graphs += sum(getattr(m.wrapped(), n).grad_fn is not None
                           for m in self.learn.model.modules() if isinstance(m, WeightHijacker) for n in m.layer_names)

class LastStep(nn.Module):
    "Take the LSTM's output at the last time step."
    def forward(self, out): return out[0][:, -1]

@pytest.mark.slow
def test_soak_2000_steps_no_leak():
    "2,000 steps of a WeightDropout LSTM with ResampleCallback: live tensors and RSS stay flat, step time does not creep."
    n, probes = 2000, (200, 1000, 2000)
    torch.manual_seed(0)
    x = torch.randn(n * 8, 12, 6); y = x[:, :, 0].sum(1, keepdim=True)
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=8, shuffle=True), DataLoader(ds[:16], bs=8), device='cpu')
    model = nn.Sequential(WeightDropout(nn.LSTM(6, 32, batch_first=True), 0.5), LastStep(), nn.Linear(32, 1))
    soak = Soak(probes)
    learn = Learner(dls, model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.01, cbs=[ResampleCallback(seed=0), soak])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        quiet_fit(learn, 1)
    finally: torch.set_num_threads(threads)
    assert len(soak.times) == n and soak.graphs == 0
    # fastai's Recorder keeps one smoothed-loss tensor per batch on purpose; every other tensor must stay put
    growth = {i: soak.counts[i] - soak.counts[200] - (soak.losses_at[i] - soak.losses_at[200]) for i in probes}
    assert all(abs(g) <= 5 for g in growth.values()), (soak.counts, soak.losses_at)
    # One step's graph is ~ 8*12*32*4 B * dozens of saved tensors; 1,800 leaked graphs would be hundreds of MB
    assert soak.rss[2000] - soak.rss[200] < 40e6, soak.rss
    # the step does not creep: each backward has exactly as much work at step 2,000 as at step 200 (counted, not timed)
    assert soak.nodes[2000] == soak.nodes[1000] == soak.nodes[200] > 10, soak.nodes
    print('median step ms, steps 200-400 vs last 200:',
          1e3 * statistics.median(soak.times[200:400]), 1e3 * statistics.median(soak.times[-200:]))

# ---- bad input

def state(learn):
    "Everything a failed call must leave alone: weights, training mode, and each wrapper's settings."
    mods = hijackers(learn.model)
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

not_an_int = st.one_of(st.floats(allow_nan=False), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.just(1.0), st.just(b'1'))
not_a_bool = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.just(None), st.lists(st.booleans(), max_size=2),
                       st.integers())

@FEW
@given(seed=not_an_int)
def test_resample_seed_wrong_type(seed):
    with pytest.raises(TypeError, match=r'seed must be an int or None'): ResampleCallback(seed=seed)

def test_resample_shared_masks_without_seed():
    with pytest.raises(ValueError, match=r'shared_masks=True needs a seed.*seed=0'): ResampleCallback(shared_masks=True)

@FEW
@given(shared=not_a_bool)
def test_resample_shared_masks_wrong_type(shared):
    with pytest.raises(TypeError, match=r'shared_masks must be True or False'): ResampleCallback(seed=0, shared_masks=shared)

@pytest.mark.parametrize('step,exc', [(-1, ValueError), (1.5, TypeError), (True, TypeError), ('3', TypeError)])
def test_resample_bad_step(step, exc):
    cb = ResampleCallback(seed=0)
    with pytest.raises(exc, match=r'step must be'): cb.step = step
    assert cb.step == 0

def test_resample_on_model_without_hijackers():
    learn = make_learner(hijack=False)
    before = state(learn)
    with pytest.raises(ValueError, match=r'no weight-changing module.*WeightDropout'): quiet_fit(learn, 1, cbs=ResampleCallback(seed=0))
    assert_unchanged(learn, before)

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
        quiet_fit(learn, 1, cbs=DropScheduler({name: SchedLin(0., .3)}))
    assert_unchanged(learn, before)

@FEW
@given(key=st.one_of(st.integers(), st.tuples(st.integers()), st.none(), st.floats(allow_nan=False)))
def test_drop_scheduler_non_string_name(key):
    with pytest.raises(TypeError, match=r'scheds keys must be attribute names'): DropScheduler({key: SchedLin(0., .3)})

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
        quiet_fit(learn, 1, cbs=DropScheduler({name: sched}))
    assert_unchanged(learn, before)

@pytest.mark.parametrize('value', ['0.5', None, [0.1]])
def test_drop_scheduler_schedule_returns_non_number(value):
    learn = make_learner()
    before = state(learn)
    with pytest.raises(ValueError, match=r"scheds\['weight_p'\] gives .* weight_p must be a float"):
        quiet_fit(learn, 1, cbs=DropScheduler({'weight_p': lambda pct: value}))
    assert_unchanged(learn, before)

def test_drop_scheduler_out_of_range_in_the_middle():
    "One-cycle-style schedule: fine at both ends, 1.2 at its peak. It must fail before the first step."
    learn = make_learner()
    before = state(learn)
    peaked = combine_scheds([0.5, 0.5], [SchedCos(0.1, 1.2), SchedCos(1.2, 0.1)])
    with pytest.raises(ValueError, match=r"scheds\['weight_p'\]"): quiet_fit(learn, 1, cbs=DropScheduler({'weight_p': peaked}))
    assert_unchanged(learn, before)

def test_drop_scheduler_error_leaves_resample_settings():
    learn = make_learner(cbs=[ResampleCallback(seed=0)])
    before = state(learn)
    with pytest.raises(ValueError, match=r"scheds"): quiet_fit(learn, 1, cbs=DropScheduler({'weight_p': SchedLin(0., 1.5)}))
    assert_unchanged(learn, before)

@FEW
@given(n=st.one_of(st.integers(max_value=1), st.floats(allow_nan=False), st.text(max_size=3), st.booleans(), st.none()))
def test_mc_preds_bad_n(n):
    learn = make_learner()
    before = state(learn)
    with pytest.raises((ValueError, TypeError), match=r'n must be (an int )?>= 2'): learn.mc_preds(n=n)
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

# ---- pinned defects

@pytest.mark.parametrize('exc,event', CASES, ids=IDS)
def test_stopped_fit_gives_the_user_settings_back(exc, event):
    """fastai calls no callback when a fit ends with anything but a CancelFitException (a bug in a callback or the
    model, Ctrl-C), so a callback's changes to the model outlive the fit. However the fit ended, the wrappers have the
    user's hold_mask and generator, eval is exact, and a brand-new Learner on the same model starts from them."""
    gen = torch.Generator().manual_seed(5)
    learn = regression_learner([ResampleCallback(seed=0)])
    learn.model[2].generator = gen
    stop_fit(learn, exc, event)
    mods = [learn.model[0], learn.model[2]]
    assert [m.hold_mask for m in mods] == [False, False]
    assert mods[0].generator is None and mods[1].generator is gen
    assert '_do_epoch_train' not in learn.__dict__           # the guard is gone with the fit
    assert_eval_ready(learn, torch.randn(5, 8))
    fresh = Learner(learn.dls, learn.model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05, cbs=ResampleCallback(seed=1))
    quiet_fit(fresh, 1)
    assert [m.hold_mask for m in mods] == [False, False]
    assert mods[0].generator is None and mods[1].generator is gen

def test_fit_stopped_in_validation_keeps_the_learner_usable():
    "A crash outside the training phase: the settings were given back at its end, the learner pickles, and fits again."
    learn = regression_learner([ResampleCallback(seed=0)])
    class FailInValidation(Callback):
        def after_pred(self):
            if not self.training: raise Boom('in validation')
    with pytest.raises(Boom): quiet_fit(learn, 1, cbs=FailInValidation())
    assert [m.hold_mask for m in hijackers(learn.model)] == [False, False]
    pickle.loads(pickle.dumps(learn))
    quiet_fit(learn, 1)
    assert '_do_epoch_train' not in learn.__dict__

def lm_learner():
    from fastai.text.all import TfmdLists, LMDataLoader, language_model_learner, awd_lstm_lm_config
    from weightdrop.awdlstm import AWD_LSTM
    g = torch.Generator().manual_seed(0)
    ids = [TfmdLists([torch.randint(2, 40, (600,), generator=g)], tfms=[]) for _ in range(2)]
    dls = DataLoaders(*[LMDataLoader(o, bs=4, seq_len=10, shuffle=i == 0) for i, o in enumerate(ids)])
    dls.vocab = ['xxunk', 'xxpad'] + [f'w{i}' for i in range(2, 40)]
    torch.manual_seed(0)
    return language_model_learner(dls, AWD_LSTM, config={**awd_lstm_lm_config, 'emb_sz': 16, 'n_hid': 24, 'n_layers': 2},
                                  pretrained=False)

def test_mc_preds_on_language_model_validation_set():
    """fastai's language-model `get_preds` joins the stream chunks along the sequence, then "reorders" them by chunk
    index along the streams: an IndexError on the validation set. `mc_preds` works on it with the default `dl`."""
    learn = lm_learner()
    with learn.no_bar():
        mean, std, targs = learn.mc_preds(n=3, seed=0, with_targs=True)
        again = learn.mc_preds(n=3, seed=0)[0]
    tokens = torch.cat([y for _, y in learn.dls.valid], dim=1)     # the streams, in order
    assert torch.equal(targs, tokens)
    assert mean.shape == (*tokens.shape, 40) and torch.equal(mean, again)
    assert torch.allclose(mean.sum(-1), torch.ones(tokens.shape)) and (std > 0).any()

def test_mc_preds_text_classifier_one_model_per_pass():
    """A text classifier calls its LSTMs once per BPTT chunk, so with a fresh mask per call one pass of `mc_preds` mixed
    several models within a passage, and a passage's prediction changed with the batch it was read in. Each pass holds
    one draw of the masks for all its calls: the batch size changes nothing."""
    from fastai.text.all import text_classifier_learner, awd_lstm_clas_config, CrossEntropyLossFlat
    from weightdrop.awdlstm import AWD_LSTM
    g = torch.Generator().manual_seed(0)
    ds = [(torch.randint(2, 40, (30,), generator=g), torch.tensor(i % 3)) for i in range(12)]   # 3 chunks of 10, no padding
    dls = DataLoaders(DataLoader(ds, bs=4, shuffle=True), DataLoader(ds, bs=4), device='cpu')
    dls.vocab = ['xxunk', 'xxpad'] + [f'w{i}' for i in range(2, 40)]
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, AWD_LSTM, seq_len=10, n_out=3, pretrained=False, loss_func=CrossEntropyLossFlat(),
                                    config={**awd_lstm_clas_config, 'emb_sz': 16, 'n_hid': 24, 'n_layers': 2})
    with learn.no_bar():
        by4 = learn.mc_preds(dl=DataLoader(ds, bs=4), n=3, seed=0)
        by12 = learn.mc_preds(dl=DataLoader(ds, bs=12), n=3, seed=0)
    assert (by4[1] > 0).all()
    torch.testing.assert_close(by4, by12, atol=1e-6, rtol=0)
