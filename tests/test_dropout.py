"""`WeightDropout` and `EmbeddingDropout` (`weightdrop.dropout`): exact gradients, drop rates and scaling, the checks at
their boundary, and the anchors' weight-dropout defects they pin. Exact properties use `torch.equal`; statistical ones
use seeded generators and 6-sigma binomial bounds."""
import copy, math
import pytest
import torch
from torch import nn
from hypothesis import given, strategies as st
from weightdrop.dropout import WeightDropout, EmbeddingDropout
from weightdrop.awdlstm import AWD_LSTM
from capabilities import require_dtype
from hijack_checks import SETTINGS, x_ as _x, first as _first, check_error, MAKERS, bad_probs, bad_choice, check_bad_argument

def _sig(p, n, k=6): return k * math.sqrt(p * (1 - p) / n)

class User(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 6), nn.Linear(6, 3)
    def forward(self, x): return self.dec(self.enc(x).tanh())

def _get(m, name):
    path, _, attr = name.rpartition('.')
    return getattr(m.get_submodule(path) if path else m, attr)

# ---- behaviour

def _exact_grad_case(make, x, p, per, hold, names=None):
    "Gradient of the raw weight vs mask * gradient of the effective weight / (1-p), on a reference given the mask."
    torch.manual_seed(0)
    w = WeightDropout(make(), p, names, per=per, hold_mask=hold, generator=torch.Generator().manual_seed(1))
    _first(w(x)).pow(2).sum().backward()
    ref = copy.deepcopy(w).unwrap()
    for n in w.layer_names:   # hand the reference the effective weights as leaves
        path, _, attr = n.rpartition('.')
        setattr(ref.get_submodule(path) if path else ref, attr, nn.Parameter(_get(w.module, n).clone()))
    ref.zero_grad(set_to_none=True)
    _first(ref(x)).pow(2).sum().backward()
    for n, raw_name in zip(w.layer_names, w.raw_names):
        eff, g_eff = _get(w.module, n), _get(ref, n).grad
        kept = (eff != 0).to(eff.dtype)   # raw weights are never exactly 0 here
        assert torch.equal(w.get_parameter(raw_name).grad, g_eff * kept / (1 - p)), n
        assert (w.get_parameter(raw_name).grad[eff == 0] == 0).all()

@pytest.mark.parametrize('p', [0.5, 0.75])   # dyadic: 1/(1-p) is exact in floating point, so equality is exact
@pytest.mark.parametrize('per,hold', [('element', False), ('element', True), ('row', False), ('row', True)])
def test_raw_gradient_is_mask_times_effective_gradient(p, per, hold):
    """grad_raw == mask * grad_eff / (1-p), bit for bit, and zero where dropped. fastai's WeightDropout dropped
    `raw_w.data` for months (fastai/fastai2#427), which stops the gradient: the raw LSTM weights never trained."""
    _exact_grad_case(lambda: nn.LSTM(4, 6, bidirectional=True), _x(5, 3, 4), p, per, hold)
    _exact_grad_case(lambda: nn.Linear(4, 6), _x(3, 4), p, per, hold)
    _exact_grad_case(User, _x(3, 4), p, per, hold, ['enc.weight', 'dec.weight'])

def test_embedding_dropout_exact_gradient():
    emb = nn.Embedding(20, 4)
    ed = EmbeddingDropout(emb, 0.5, hold_mask=True, generator=torch.Generator().manual_seed(0))
    words = torch.arange(20)
    ed(words).pow(2).sum().backward()
    mask = ed._held['weight']
    assert set(mask.flatten().tolist()) <= {0., 2.} and mask.shape == (20, 1)
    w = emb.weight.detach()
    assert torch.equal(emb.weight.grad, 2 * (w * mask) * mask)   # d/dw sum((w*m)^2) = 2 (w m) m

def test_drop_rate_per_row_and_embedding():
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.75):   # dyadic scales: the kept rows are exactly raw/(1-p)
        w = WeightDropout(nn.Linear(8, 4096), p, per='row', generator=g)
        with torch.no_grad(): w(_x(1, 8))
        rows = (w.module.weight == 0).all(1)
        assert abs(rows.float().mean().item() - p) < _sig(p, 4096)
        ed = EmbeddingDropout(nn.Embedding(4096, 8), p, generator=g)
        with torch.no_grad(): out = ed(torch.arange(4096))
        dropped = (out == 0).all(1)
        assert abs(dropped.float().mean().item() - p) < _sig(p, 4096)
        assert torch.equal(out[~dropped], ed.emb.weight.detach()[~dropped] / (1 - p))

def test_scheduled_weight_p_takes_effect_at_the_next_call():
    "A schedule sets `weight_p` per batch; the next call drops at the new rate, and 0 turns dropout off exactly."
    wd = WeightDropout(nn.Linear(256, 256), 0.5, generator=torch.Generator().manual_seed(0))
    for p in (0.25, 0.75, 0.):
        wd.weight_p = p
        with torch.no_grad(): wd(torch.zeros(1, 256))
        frac = (wd.module.weight == 0).float().mean().item()
        assert abs(frac - p) < _sig(p, 256 * 256) + 1e-12
    assert torch.equal(wd.module.weight, wd.weight_raw.detach())

# ---- bad input

@SETTINGS
@given(p=bad_probs, which=st.sampled_from(sorted(MAKERS)))
def test_bad_weight_p(p, which):
    check_bad_argument(WeightDropout, 'weight_p', 0.3, p, MAKERS[which])

@SETTINGS
@given(p=bad_probs)
def test_bad_embed_p(p):
    check_bad_argument(EmbeddingDropout, 'embed_p', 0.2, p, lambda: nn.Embedding(6, 3))

@SETTINGS
@given(v=bad_choice)
def test_bad_per(v):
    if v in ('element', 'row'): v = v + 's'
    check_bad_argument(lambda m, **kw: WeightDropout(m, 0.5, **kw), 'per', 'row', v)

def test_embedding_wrapped_again():
    emb = nn.Embedding(6, 3); ed = EmbeddingDropout(emb, 0.2)
    check_error(lambda: EmbeddingDropout(emb, 0.2), ed, 'emb')
    check_error(lambda: EmbeddingDropout(ed, 0.2), ed, 'emb', types=TypeError)
    check_error(lambda: WeightDropout(emb, 0.2), ed, 'layer_names')
    emb2 = nn.Embedding(6, 3); wd = WeightDropout(emb2, 0.2)   # weight moved to the wrapper
    check_error(lambda: EmbeddingDropout(emb2, 0.2), wd, 'emb')

# ---- pinned defects

def test_fastai_bidir_reverse_weights_are_dropped():
    """fastai's WeightDropout drops only `weight_hh_l0`: with `bidir=True`, `weight_hh_l0_reverse` gets no dropout at
    all; PyTorch-NLP's never drops the `_reverse` directions either. Here every hidden weight of every layer and
    direction is dropped at the requested rate, in AWD_LSTM too."""
    g = torch.Generator().manual_seed(0)
    wd = WeightDropout(nn.LSTM(4, 8, bidirectional=True), 0.5, generator=g)
    assert wd.layer_names == ['weight_hh_l0', 'weight_hh_l0_reverse']
    gru = WeightDropout(nn.GRU(4, 8, num_layers=2, bidirectional=True), 0.5, generator=g)
    assert gru.layer_names == ['weight_hh_l0', 'weight_hh_l0_reverse', 'weight_hh_l1', 'weight_hh_l1_reverse']
    with torch.no_grad(): wd(_x(3, 2, 4)); gru(_x(3, 2, 4))
    for m in (wd, gru):
        for n in m.layer_names:
            w = getattr(m.module, n)
            assert abs((w == 0).float().mean().item() - 0.5) < _sig(0.5, w.numel()), n
    model = AWD_LSTM(50, 6, 8, 2, bidir=True, weight_p=0.5)
    assert all('weight_hh_l0_reverse' in r.layer_names for r in model.rnns)

def test_fastai_embedding_dropout_eval_scale_never_writes_weights():
    "fastai's EmbeddingDropout multiplies the real weights in place in its eval path with `scale` (corrupts or raises)."
    emb = nn.Embedding(10, 4); w0 = emb.weight.detach().clone()
    ed = EmbeddingDropout(emb, 0.3).eval()
    words = torch.tensor([1, 2, 3])
    with torch.no_grad(): out = ed(words, scale=2.)
    assert torch.equal(out, 2. * w0[words]) and torch.equal(emb.weight.detach(), w0)
    out = ed(words, scale=2.)   # with grad enabled fastai raises (in-place on a leaf that requires grad)
    out.sum().backward()
    assert torch.equal(emb.weight.detach(), w0) and emb.weight.grad is not None

def test_half_and_bfloat16_masks():
    "fastai/fastai2#197: `bernoulli` not implemented for Half."
    for dt in (torch.float16, torch.bfloat16):
        require_dtype(nn.Linear(64, 64), torch.ones(2, 64, dtype=dt))
        wd = WeightDropout(nn.Linear(64, 64), 0.5, generator=torch.Generator().manual_seed(0)).to(dt)
        with torch.no_grad(): out = wd(torch.ones(2, 64, dtype=dt))
        w = wd.module.weight
        assert out.dtype == dt and w.dtype == dt
        kept = w != 0
        assert torch.equal(w[kept], wd.weight_raw.detach()[kept] * 2)
        assert abs((~kept).float().mean().item() - 0.5) < _sig(0.5, w.numel())

def test_variational_mask_not_applied_in_eval():
    "salesforce/awd-lstm-lm#72: the variational (row) mask keeps dropping at eval."
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5); plain = copy.deepcopy(lstm).eval()
    wd = WeightDropout(lstm, 0.5, per='row', hold_mask=True)
    x = _x(3, 2, 4)
    wd(x); wd.resample(); wd.eval()
    with torch.no_grad(): assert torch.equal(wd(x)[0], plain(x)[0])
    assert torch.equal(wd.module.weight_hh_l0, wd.weight_hh_l0_raw.detach())

def test_parametrize_one_mask_per_weight_per_lstm_call(monkeypatch):
    "`parametrize` without `cached()` runs the parametrization 4 times per LSTM forward (4 masks, the last one used)."
    import weightdrop.dropout as D
    draws, keep_mask = [], D._keep_mask
    monkeypatch.setattr(D, '_keep_mask', lambda *a, **k: draws.append(1) or keep_mask(*a, **k))
    for per in ('element', 'row'):
        draws.clear()
        wd = WeightDropout(nn.LSTM(4, 5, num_layers=2, bidirectional=True), 0.5, per=per)
        wd(_x(3, 2, 4))
        assert len(draws) == len(wd.layer_names) == 4

def test_keras_tf_dropconnect_scale_once_and_drop_p():
    """Several Keras/TF DropConnect packages rescale twice or invert keep/drop. With p=0.75 (a dyadic scale, so exact in
    floating point) 75% of the weights are dropped and every kept one is exactly 4x the raw weight."""
    for per in ('element', 'row'):
        wd = WeightDropout(nn.Linear(256, 256), 0.75, per=per, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(): wd(torch.zeros(1, 256))
        eff, raw = wd.module.weight, wd.weight_raw.detach()
        kept = eff != 0
        assert torch.equal(eff[kept], raw[kept] * 4)
        n = eff.numel() if per == 'element' else eff.shape[0]
        assert abs((~kept).float().mean().item() - 0.75) < _sig(0.75, n)

def test_naming_hazard_drops_weights_not_samples():
    "In EfficientNet-style code 'drop_connect' means stochastic depth (dropping whole samples); here it drops weights."
    wd = WeightDropout(nn.Linear(64, 64, bias=False), 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): out = wd(_x(32, 64))
    assert (out != 0).any(1).all()                     # no sample's output is zeroed
    m = wd.module.weight != 0
    assert (m.any(1) & ~m.all(1)).float().mean() > 0.99   # zeros are scattered inside rows, not whole units or samples
