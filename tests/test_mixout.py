"""`Mixout`, `EMATargetCallback` and `mixout_encoder` (`weightdrop.mixout`) in the workflows users run: exact mixing and
gradients, checkpoints both ways, fits after fits, lr_find then fit, ULMFiT's encoder; bad arguments; and the
reference implementation's defects, pinned. Exact properties use `torch.equal`; statistical ones seeded generators and
6-sigma bounds from the sample size."""
import copy, io, math
import pytest, torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from hypothesis import given, strategies as st
from fastai.basics import Learner, SGD
from fastai.callback.schedule import SchedLin
from weightdrop.core import is_hijacked
from weightdrop.dropout import WeightDropout
from weightdrop.awdlstm import AWD_LSTM
from weightdrop.synth import synth_dls
from weightdrop.callbacks import ResampleCallback, DropScheduler, EMATargetCallback
from weightdrop.mixout import Mixout, mixout_encoder
from hijack_checks import SETTINGS, x_, first, check_error, MAKERS, bad_probs, check_bad_argument

def _sig(p, n, k=6): return k * math.sqrt(p * (1 - p) / n)

def moved(m, seed=0):
    "Move every mixed-out weight of `m` away from its target, so that kept and dropped entries differ."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in m.layer_names:
            r = m.raw_weight(n)
            r.add_(torch.randn(r.shape, generator=g, dtype=r.dtype))
    return m

LAYERS = {'linear': (lambda: nn.Linear(5, 4), lambda: x_(2, 5)),
          'conv2d': (lambda: nn.Conv2d(2, 3, 3), lambda: x_(1, 2, 5, 5)),
          'embedding': (lambda: nn.Embedding(10, 4), lambda: torch.arange(8)),
          'lstm': (lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True), lambda: x_(5, 2, 3))}

def learner(cbs=(), p=0.5, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(Mixout(nn.Linear(6, 16), p), nn.ReLU(), Mixout(nn.Linear(16, 1), p))
    return Learner(synth_dls(), model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05, cbs=list(cbs))

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

def mixes(learn): return [m for m in learn.model.modules() if isinstance(m, Mixout)]

# ---- behaviour

@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_training_right_after_wrapping_is_the_plain_module(layer):
    "w == u: every mask gives w itself, so the training output is the plain module's, bit for bit."
    make, x = LAYERS[layer]
    torch.manual_seed(0)
    plain = make(); m = Mixout(copy.deepcopy(plain), 0.9)
    for _ in range(3): assert torch.equal(first(m(x())), first(plain(x())))

@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_dropped_entries_are_the_target_kept_ones_the_formula(p):
    "In float64: dropped entries equal u bit for bit, kept ones (w - p*u)/(1-p) to 1e-12, at a binomial rate."
    m = moved(Mixout(nn.Linear(300, 200, dtype=torch.float64), p, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad(): m(torch.zeros(1, 300, dtype=torch.float64))
    eff, w, u = m.module.weight, m.weight_raw.detach(), m.weight_target
    dropped = eff == u
    assert torch.allclose(eff[~dropped], ((w - p * u) / (1 - p))[~dropped], rtol=1e-12, atol=1e-12)
    assert abs(dropped.double().mean().item() - p) < _sig(p, w.numel())

def test_dyadic_values_are_exact_in_float32():
    "p=0.5 and weights in eighths: every step is exact, so kept entries equal 2w - u with =="
    m = Mixout(nn.Linear(64, 64), 0.5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    w, u = torch.randint(-64, 64, (64, 64), generator=g) / 8., torch.randint(-64, 64, (64, 64), generator=g) / 8. + 1 / 16
    with torch.no_grad(): m.weight_raw.copy_(w); m.set_target({'weight': u}); m(torch.zeros(1, 64))
    eff = m.module.weight
    dropped = eff == u
    assert torch.equal(eff[~dropped], (2 * w - u)[~dropped]) and 0 < dropped.sum() < 64 * 64

def test_mean_over_draws_is_the_weight():
    "Each entry's draws have std |w-u| sqrt(p/(1-p)): the mean of n draws is within 6 of those / sqrt(n) of w."
    p, n = 0.8, 3000
    m = moved(Mixout(nn.Linear(10, 7, dtype=torch.float64), p, generator=torch.Generator().manual_seed(3)))
    w, u = m.weight_raw.detach(), m.weight_target
    with torch.no_grad(): mean = sum(m.effective_weight('weight', m.weight_raw) for _ in range(n)) / n
    assert ((mean - w).abs() <= 6 * (w - u).abs() * math.sqrt(p / (1 - p) / n) + 1e-12).all()

@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('hold', [False, True])
def test_gradient_is_mask_times_the_effective_weights_gradient(layer, hold):
    "grad_raw == mask * grad_eff bit for bit (p=0.5: the mask is 0 or 2), zero where the target was used; none on the target."
    make, x = LAYERS[layer]
    torch.manual_seed(0)
    m = moved(Mixout(make(), 0.5, hold_mask=hold, generator=torch.Generator().manual_seed(4)))
    xb = x()
    first(m(xb)).pow(2).sum().backward()
    ref = copy.deepcopy(m).unwrap()
    for n in m.layer_names: setattr(ref, n, nn.Parameter(getattr(m.module, n).clone()))
    first(ref(xb)).pow(2).sum().backward()
    for n in m.layer_names:
        eff, u = getattr(m.module, n), m.target_weight(n)
        mask = torch.where(eff == u, 0., 2.)
        assert torch.equal(m.raw_weight(n).grad, getattr(ref, n).grad * mask), n
        assert u.grad is None and not u.requires_grad

def test_target_never_changes_under_optimizer_steps():
    m = Mixout(nn.LSTM(4, 8), 0.7)
    u0 = m.weight_hh_l0_target.clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)
    for i in range(5):
        m(x_(6, 2, 4, seed=i))[0].pow(2).sum().backward(); opt.step(); opt.zero_grad()
    assert torch.equal(m.weight_hh_l0_target, u0) and not torch.equal(m.weight_hh_l0_raw, u0)
    assert all(p is not m.weight_hh_l0_target for p in m.parameters())

def test_eval_is_the_plain_module_with_the_trained_weights():
    m = moved(Mixout(nn.LSTM(3, 5, bidirectional=True), 0.9))
    plain = copy.deepcopy(m).unwrap()
    m.eval(); plain.eval()
    x = x_(4, 2, 3)
    with torch.no_grad(): assert torch.equal(m(x)[0], plain(x)[0])

def test_state_dict_round_trip_bit_for_bit(tmp_path):
    m = moved(Mixout(nn.LSTM(3, 4, num_layers=2), 0.5))
    torch.save(m.state_dict(), tmp_path / 'm.pth')
    other = Mixout(nn.LSTM(3, 4, num_layers=2), 0.5)
    other.load_state_dict(torch.load(tmp_path / 'm.pth'))
    sd, sd2 = m.state_dict(), other.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert other.weight_hh_l1_target is other._buffers['weight_hh_l1_target']

def test_plain_and_weight_dropout_checkpoints_set_the_targets():
    pretrained = nn.LSTM(3, 4, bidirectional=True)
    for sd in (pretrained.state_dict(), WeightDropout(copy.deepcopy(pretrained), 0.5).state_dict()):
        m = moved(Mixout(nn.LSTM(3, 4, bidirectional=True), 0.5))
        m.load_state_dict(sd)
        for n in m.layer_names:
            assert torch.equal(m.target_weight(n), pretrained.get_parameter(n))
            assert torch.equal(m.raw_weight(n), pretrained.get_parameter(n))
            assert m.target_weight(n).data_ptr() != m.raw_weight(n).data_ptr()   # a copy: training leaves it alone

def test_load_with_assign_keeps_target_and_raw_apart():
    m = Mixout(nn.Linear(3, 2), 0.5)
    m.load_state_dict(nn.Linear(3, 2).state_dict(), assign=True)
    assert m.weight_target.data_ptr() != m.weight_raw.data_ptr() and isinstance(m.weight_raw, nn.Parameter)

def test_failed_load_leaves_raw_and_target_unchanged():
    m = moved(Mixout(nn.Linear(3, 2), 0.5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match='left unchanged'): m.load_state_dict(nn.Linear(3, 5).state_dict())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())

def test_deepcopy_pickle_averaged_model_and_half():
    m = moved(Mixout(nn.LSTM(3, 4), 0.5))
    buf = io.BytesIO(); torch.save(m, buf)
    for c in (copy.deepcopy(m), torch.load(io.BytesIO(buf.getvalue()), weights_only=False), AveragedModel(m).module):
        assert torch.equal(c.weight_hh_l0_target, m.weight_hh_l0_target)
        assert c.weight_hh_l0_target.data_ptr() != m.weight_hh_l0_target.data_ptr()
    d = copy.deepcopy(m).double()
    assert d.weight_hh_l0_target.dtype == torch.float64 and d(x_(2, 1, 3).double())[0].dtype == torch.float64

def test_unwrap_gives_the_plain_module_without_targets():
    lin = nn.Linear(3, 2); w = lin.weight
    m = Mixout(lin, 0.5)
    assert m.unwrap() is lin and lin.weight is w and not is_hijacked(lin)
    assert list(lin.state_dict()) == ['weight', 'bias'] and 'weight_target' not in m._buffers

def test_set_target_from_an_averaged_model_in_place():
    m = Mixout(nn.Linear(4, 3), 0.5)
    buf, ema = m.weight_target, AveragedModel(nn.Linear(4, 3))
    m.set_target(ema)
    assert m.weight_target is buf and torch.equal(buf, ema.module.weight)

def test_hold_mask_and_resample_control_the_redraws():
    m = moved(Mixout(nn.Linear(32, 32), 0.5, hold_mask=True, generator=torch.Generator().manual_seed(0)))
    def mask():
        with torch.no_grad(): m(torch.zeros(1, 32))
        return m.module.weight == m.weight_target
    a = mask(); assert torch.equal(mask(), a)
    m.resample(); assert not torch.equal(mask(), a)
    m.hold_mask = False; assert not torch.equal(mask(), mask())

def test_resample_callback_one_mask_per_batch_and_fit_then_fit():
    learn = learner([ResampleCallback(seed=0)])
    seen = []
    learn.model[0].wrapped().register_forward_pre_hook(
        lambda mod, a: seen.append((mod.training, (mod.weight == learn.model[0].weight_target).clone())))
    targets = [m.weight_target.clone() for m in mixes(learn)]
    quiet_fit(learn, 1); quiet_fit(learn, 1)
    train = [s for t, s in seen if t]
    assert len(train) == 2 * len(learn.dls.train)
    assert not any(torch.equal(a, b) for a, b in zip(train, train[1:]))
    assert all(torch.equal(m.weight_target, u) for m, u in zip(mixes(learn), targets))
    assert not any(m.hold_mask for m in mixes(learn))   # the callback gave the setting back

def test_drop_scheduler_schedules_p():
    learn = learner([DropScheduler({'p': SchedLin(0.8, 0.2)})])
    quiet_fit(learn, 2)
    ps = learn.recorder.hps['p']
    assert ps[0] == pytest.approx(0.8) and all(a > b for a, b in zip(ps, ps[1:])) and ps[-1] < 0.3

def test_lr_find_then_fit_equals_fit(tmp_path):
    def final(lr_find_first):
        learn = learner([ResampleCallback(seed=0), EMATargetCallback(0.9)])
        learn.path = tmp_path
        with learn.no_bar(), learn.no_logging():
            if lr_find_first: learn.lr_find(num_it=10, show_plot=False)
            learn.fit(2)
        return {k: v.clone() for k, v in learn.model.state_dict().items()}
    plain, found = final(False), final(True)
    assert list(plain) == list(found) and all(torch.equal(plain[k], found[k]) for k in plain)

def test_ema_callback_targets_are_the_average_of_the_steps():
    "decay=0.5 over the steps of each epoch, from the fit's starting weights, by hand; a second fit starts afresh."
    learn = learner([ResampleCallback(seed=0), EMATargetCallback(decay=0.5)])
    m = learn.model[0]
    for fit in range(2):
        ema, steps = m.weight_raw.detach().clone(), []
        class Watch(EMATargetCallback.__mro__[1]):   # a plain fastai Callback
            order = 100
            def after_step(self): steps.append(m.weight_raw.detach().clone())
        quiet_fit(learn, 1, cbs=Watch())
        for w in steps: ema = 0.5 * ema + 0.5 * w
        assert torch.allclose(m.weight_target, ema, atol=1e-6), fit

def test_mc_preds_draws_and_eval_is_exact():
    learn = learner([ResampleCallback(seed=0)])
    quiet_fit(learn, 1)
    mean, std = learn.mc_preds(n=3, seed=0)
    assert (std > 0).any()
    with learn.no_bar(): preds, _ = learn.get_preds()
    model = copy.deepcopy(learn.model).eval()
    for i in (0, 2): model[i] = model[i].unwrap()
    with torch.no_grad(): ref = model(torch.stack([x for x, _ in learn.dls.valid.dataset]))
    assert torch.equal(preds, ref)

def test_mixout_encoder_both_orders_and_fastai_keys(tmp_path):
    "ULMFiT: wrap then load, or load then wrap: the targets are the language model's weights; keys stay fastai's."
    lm = moved(WeightDropout(nn.LSTM(4, 6, batch_first=True), 0.5))
    enc_lm = AWD_LSTM(30, 4, 6, 2); enc_lm.rnns[0] = lm
    torch.save(enc_lm.state_dict(), tmp_path / 'enc.pth')
    a, b = AWD_LSTM(30, 4, 6, 2), AWD_LSTM(30, 4, 6, 2)
    keys = list(a.state_dict())
    mixout_encoder(a, 0.5).load_state_dict(torch.load(tmp_path / 'enc.pth'))
    b.load_state_dict(torch.load(tmp_path / 'enc.pth')); mixout_encoder(b, 0.5)
    for enc in (a, b):
        assert [k for k in enc.state_dict() if not k.endswith('_target')] == keys
        assert torch.equal(enc.rnns[0].weight_hh_l0_target, lm.weight_hh_l0_raw)
    # a Mixout checkpoint without its targets loads into the plain WeightDropout encoder
    plain = AWD_LSTM(30, 4, 6, 2)
    plain.load_state_dict({k: v for k, v in a.state_dict().items() if not k.endswith('_target')})
    for e in (a, plain): e.eval(); e.reset()
    xb = torch.randint(0, 30, (2, 5))
    with torch.no_grad(): assert torch.equal(a(xb), plain(xb))

def test_mixout_encoder_keeps_the_optimizers_parameters():
    learn_params = lambda e: {n: p for n, p in e.named_parameters()}
    enc = AWD_LSTM(30, 4, 6, 2)
    before = learn_params(enc)
    mixout_encoder(enc, 0.5)
    assert learn_params(enc) == before

def _saved_bytes(fn, keep):
    "What `fn`'s graph saves, in bytes, leaving out tensors sharing storage with `keep` (parameters, inputs)."
    ptrs, n = {t.untyped_storage().data_ptr() for t in keep}, [0]
    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs: n[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): out = fn()
    return out, n[0]

@pytest.mark.parametrize('hold', [False, True])
@pytest.mark.parametrize('layer', ['linear', 'conv2d', 'embedding'])
def test_recompute_gives_the_stored_paths_outputs_and_gradients_and_saves_no_mixed_weight(layer, hold):
    "With `recompute=True` the graph keeps no mask and no mixed weight; the mask made again in backward gives the same gradients, bit for bit."
    make, inp = LAYERS[layer]
    results, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = moved(Mixout(make(), 0.5, hold_mask=hold, generator=torch.Generator().manual_seed(3), recompute=recompute))
        if hold: m.resample()
        x = inp()
        if x.is_floating_point(): x.requires_grad_()
        out, n = _saved_bytes(lambda: m(x), [*m.parameters(), *m.buffers(), *m._held.values(), x])   # a held mask lives on anyway
        out.pow(2).sum().backward()
        results.append([out, m.weight_raw.grad] + ([x.grad] if x.requires_grad else []) + [p.grad for p in m.module.parameters()])
        saved.append(n)
    for a, b in zip(*results): assert (a is None and b is None) or torch.equal(a, b)
    w = m.weight_raw.numel() * 4
    assert saved[1] < w   # recompute keeps nothing weight-sized
    if not (hold and layer == 'embedding'): assert saved[0] >= w   # the stored path keeps the mixed weight or the mask
    # (an embedding's backward needs only its indices, and a held mask lives on the wrapper anyway)

def test_recompute_fit_then_fit_ends_where_the_stored_path_does():
    "A seeded fastai fit, then another, with recomputed masks ends with the stored path's weights and targets, bit for bit."
    ends = []
    for recompute in (False, True):
        learn = learner([ResampleCallback(seed=0)])
        for m in mixes(learn): m.recompute = recompute
        quiet_fit(learn, 1); quiet_fit(learn, 1)
        ends.append({k: v.clone() for k, v in learn.model.state_dict().items()})
    assert list(ends[0]) == list(ends[1]) and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])

def test_mixout_encoder_keeps_recompute_and_refuses_it_on_lstms():
    lin = WeightDropout(nn.Linear(4, 4), 0.5, recompute=True)
    enc = mixout_encoder(nn.Sequential(lin), 0.5)
    assert isinstance(enc[0], Mixout) and enc[0].recompute
    lstm = nn.LSTM(3, 4)
    check_error(lambda: Mixout(lstm, 0.5, recompute=True), lstm, 'recompute')

# ---- bad input

@SETTINGS
@given(p=bad_probs, which=st.sampled_from(sorted(MAKERS)))
def test_bad_p(p, which):
    check_bad_argument(Mixout, 'p', 0.3, p, MAKERS[which])

@pytest.mark.parametrize('target,words', [
    (lambda: nn.Linear(4, 3), 'wrong shapes'), (lambda: nn.LSTM(3, 4), "no weight ['weight']"),
    (lambda: {'weight': torch.ones(4, 3, dtype=torch.long)}, 'not floating point'),
    (lambda: torch.ones(4, 3), 'must be None, an nn.Module'), (lambda: [nn.Linear(3, 4)], 'must be None, an nn.Module')])
def test_bad_target(target, words):
    lin = nn.Linear(3, 4)
    msg = check_error(lambda: Mixout(lin, 0.5, target=target()), lin, 'target')
    assert words in msg
    m = Mixout(nn.Linear(3, 4), 0.5)
    msg = check_error(lambda: m.set_target(target()), m, 'source')
    assert words in msg

def test_bad_target_names_every_mismatch():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    msg = check_error(lambda: Mixout(m, 0.5, ['0.weight', '1.weight'], target=nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))),
                      m, 'target')
    assert "'0.weight': ((5, 3), (4, 3))" in msg and "'1.weight': ((2, 5), (2, 4))" in msg

def test_bad_mixout_encoder_leaves_it_unchanged():
    enc = AWD_LSTM(30, 4, 6, 2)
    check_error(lambda: mixout_encoder(enc, 0.5, target=AWD_LSTM(30, 4, 8, 2)), enc, 'target')
    check_error(lambda: mixout_encoder(enc, 1.5), enc, 'p')
    assert all(type(r) is WeightDropout for r in enc.rnns)
    with pytest.raises(ValueError, match='encoder: no WeightDropout'): mixout_encoder(nn.Linear(2, 2), 0.5)

def test_bad_ema_callback():
    with pytest.raises(ValueError, match=r'decay must be in \[0, 1\]'): EMATargetCallback(1.5)
    with pytest.raises(TypeError, match='decay must be a float'): EMATargetCallback('0.9')
    learn = Learner(synth_dls(), nn.Linear(6, 1), loss_func=nn.MSELoss(), cbs=EMATargetCallback())
    with pytest.raises(ValueError, match='the model has no Mixout'): quiet_fit(learn, 1)

def test_unwrapped_mixout_refuses_set_target():
    m = Mixout(nn.Linear(2, 2), 0.5); m.unwrap()
    with pytest.raises(RuntimeError, match='was unwrapped'): m.set_target()

# ---- pinned defects

def test_mask_rows_are_drawn_independently():
    """The reference Mixout function draws the first row of its mask and repeats it over every row, so whole input
    columns of a Linear weight are mixed out together. Here every entry is drawn on its own: at p=0.5 on a 64x64
    weight, no two rows of a mask are the same, and each column's rate is binomial over its rows."""
    m = moved(Mixout(nn.Linear(64, 64), 0.5, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad(): m(torch.zeros(1, 64))
    at_target = m.module.weight == m.weight_target
    assert len({tuple(r.tolist()) for r in at_target}) == 64
    assert (at_target.float().mean(0) - 0.5).abs().max() < _sig(0.5, 64)

def test_gradient_has_the_full_scale():
    """The reference Mixout's backward returns grad * mask, leaving out the 1/(1-p) of its forward: gradients come
    out (1-p) times too small (10 times at p=0.9). Here d(out)/d(w) on kept entries is 1/(1-p) exactly."""
    p = 0.75
    m = moved(Mixout(nn.Linear(16, 16, bias=False), p, hold_mask=True, generator=torch.Generator().manual_seed(0)))
    m(torch.eye(16)).sum().backward()
    kept = m.module.weight != m.weight_target
    assert torch.equal(m.weight_raw.grad[kept], torch.full_like(m.weight_raw.grad[kept], 4.))
    assert (m.weight_raw.grad[~kept] == 0).all()

def test_target_is_saved_and_follows_the_module():
    """The reference MixLinear keeps its target as a plain tensor attribute: the state dict leaves it out (a resumed
    fine-tuning mixes toward whatever the rebuilt model was built with) and `.half()`/`.double()` leave it behind.
    Here it is a buffer: in the state dict, restored by loading, converted with the module."""
    m = moved(Mixout(nn.Linear(3, 2), 0.5)); m.set_target()
    resumed = Mixout(nn.Linear(3, 2), 0.5)
    resumed.load_state_dict(m.state_dict())
    assert torch.equal(resumed.weight_target, m.weight_target)
    assert resumed.half().weight_target.dtype == torch.float16
