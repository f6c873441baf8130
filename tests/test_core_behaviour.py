"""Issue 2's must-haves for the hijacking core and its layers, beyond what the notebooks already show.

Exact properties use `torch.equal`; statistical ones use seeded generators and 6-sigma binomial bounds.
"""
import copy, io, math, pickle
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout, EmbeddingDropout
from weightdrop.noise import WeightNoise

def _x(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def _first(out): return out[0] if isinstance(out, tuple) else out

class User(nn.Module):
    "A user's own module with submodules and a bare parameter."
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))
    def forward(self, x): return self.dec(self.enc(x).tanh()) * self.scale

MODULES = {  # name: (make, input, layer_names)
    'lstm_proj_bidir': (lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3), _x(5, 2, 4), None),
    'gru': (lambda: nn.GRU(4, 6, num_layers=2), _x(5, 2, 4), None),
    'rnn_tanh': (lambda: nn.RNN(4, 6, bidirectional=True), _x(5, 2, 4), None),
    'lstm_cell': (lambda: nn.LSTMCell(4, 6), _x(2, 4), 'weight_*'),
    'gru_cell': (lambda: nn.GRUCell(4, 6), _x(2, 4), 'weight_*'),
    'linear': (lambda: nn.Linear(4, 6), _x(2, 4), None),
    'conv1d': (lambda: nn.Conv1d(4, 3, 3), _x(2, 4, 9), None),
    'conv2d': (lambda: nn.Conv2d(4, 3, 3), _x(2, 4, 7, 7), None),
    'embedding': (lambda: nn.Embedding(10, 4), torch.tensor([[1, 2, 3]]), None),
    'user': (User, _x(2, 4), ['*.weight', 'dec.bias', 'scale']),
}
WRAPPERS = {'dropout': lambda m, names: WeightDropout(m, 0.5, names),
            'dropout_row_held': lambda m, names: WeightDropout(m, 0.5, names, per='row', hold_mask=True),
            'noise_add': lambda m, names: WeightNoise(m, 0.3, 'additive', names),
            'noise_mul_held': lambda m, names: WeightNoise(m, 0.3, 'multiplicative', names, hold_mask=True)}

@pytest.mark.parametrize('wrap', sorted(WRAPPERS))
@pytest.mark.parametrize('kind', sorted(MODULES))
def test_wraps_any_module(kind, wrap):
    "Training reaches every raw weight through the transform; eval equals the unwrapped module exactly."
    make, x, names = MODULES[kind]
    torch.manual_seed(0); plain = make()
    torch.manual_seed(0); w = WRAPPERS[wrap](make(), names)
    _first(w(x)).pow(2).sum().backward()
    for raw_name in w.raw_names:
        g = w.get_parameter(raw_name).grad
        assert g is not None and torch.isfinite(g).all(), raw_name
    plain.eval(); w.eval()
    with torch.no_grad(): assert torch.equal(_first(w(x)), _first(plain(x)))

def test_glob_selection_with_biases():
    w = WeightDropout(nn.LSTM(3, 4, num_layers=2), 0.5, ['weight_hh_*', 'bias_*'])
    assert w.layer_names == ['weight_hh_l0', 'weight_hh_l1', 'bias_ih_l0', 'bias_hh_l0', 'bias_ih_l1', 'bias_hh_l1']  # pattern by pattern
    assert sorted(w.state_dict()) == sorted(['module.weight_ih_l0', 'module.weight_ih_l1'] + [n + '_raw' for n in w.layer_names])
    with torch.no_grad(): w(_x(3, 2, 3))
    assert all((getattr(w.module, n) == 0).any() for n in w.layer_names)

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

def _get(m, name):
    path, _, attr = name.rpartition('.')
    return getattr(m.get_submodule(path) if path else m, attr)

@pytest.mark.parametrize('p', [0.5, 0.75])   # dyadic: 1/(1-p) is exact in floating point, so equality is exact
@pytest.mark.parametrize('per,hold', [('element', False), ('element', True), ('row', False), ('row', True)])
def test_exact_gradient_guarantee(p, per, hold):
    "grad_raw == mask * grad_eff / (1-p), bit for bit, and zero where dropped (fastai2#427 shipped zero gradients)."
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

def test_weight_noise_exact_gradient():
    for mode in ('additive', 'multiplicative'):
        wn = WeightNoise(nn.Linear(4, 3, bias=False), 0.5, mode, hold_mask=True, generator=torch.Generator().manual_seed(0))
        x = torch.randint(-3, 4, (5, 4)).float()
        wn(x).sum().backward()
        g_eff = x.sum(0).expand(3, 4)
        assert torch.equal(wn.weight_raw.grad, g_eff if mode == 'additive' else g_eff * wn._held['weight'])

def test_mask_lifetimes():
    "Fresh mask per training call by default; held until resample(); eval exact; train/eval cycles."
    g = torch.Generator().manual_seed(0)
    w = WeightDropout(nn.Linear(16, 16), 0.5, generator=g)
    with torch.no_grad():
        w(_x(1, 16)); a = w.module.weight.clone(); w(_x(1, 16)); b = w.module.weight.clone()
    assert not torch.equal(a, b)
    cell = WeightDropout(nn.LSTMCell(4, 8), 0.5, hold_mask=True, generator=g)
    h = (torch.zeros(2, 8), torch.zeros(2, 8)); seen = []
    with torch.no_grad():
        for t in range(3): h = cell(_x(2, 4, seed=t), h); seen.append(cell.module.weight_hh.clone())
        cell.resample(); cell(_x(2, 4), h); seen.append(cell.module.weight_hh.clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2]) and not torch.equal(seen[2], seen[3])
    for _ in range(2):
        cell.eval()
        with torch.no_grad(): cell(_x(2, 4), h)
        assert torch.equal(cell.module.weight_hh, cell.weight_hh_raw.detach())
        cell.train()
        with torch.no_grad(): cell(_x(2, 4), h)
        assert (cell.module.weight_hh == 0).any()

def test_mc_dropout_in_eval():
    w = WeightDropout(nn.Linear(16, 16), 0.5).eval()
    w.mc_dropout = True
    with torch.no_grad(): w(_x(1, 16))
    assert (w.module.weight == 0).any()
    w.mc_dropout = False
    with torch.no_grad(): w(_x(1, 16))
    assert torch.equal(w.module.weight, w.weight_raw.detach())

@pytest.mark.parametrize('conv', ['double', 'half', 'bfloat16', 'float', 'to_double', 'to_cpu'])
def test_no_stale_weight_after_conversion(conv):
    for w in (WeightDropout(nn.LSTM(3, 4), 0.5, hold_mask=True), WeightNoise(nn.Linear(3, 4), 0.1, hold_mask=True),
              EmbeddingDropout(nn.Embedding(5, 3), 0.5, hold_mask=True)):
        inp = torch.tensor([1, 2]) if isinstance(w, EmbeddingDropout) else (_x(2, 1, 3) if isinstance(w, WeightDropout) else _x(2, 3))
        w(inp); w.resample()
        {'double': lambda: w.double(), 'half': lambda: w.half(), 'bfloat16': lambda: w.bfloat16(), 'float': lambda: w.float(),
         'to_double': lambda: w.to(torch.float64), 'to_cpu': lambda: w.to('cpu')}[conv]()
        for (owner, attr, _), raw in zip(w._slots(), w._raws()):
            shown = getattr(owner, attr)
            assert shown.dtype == raw.dtype and torch.equal(shown.detach(), raw.detach())
        assert all(d.dtype == w._raws()[0].dtype for d in w._held.values())
        if isinstance(w.wrapped(), nn.RNNBase):
            assert all(fw is getattr(w.module, n) for fw, n in zip(w.module._flat_weights, w.module._flat_weights_names))

def test_autocast_leaves_no_stale_weight():
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4); w = WeightDropout(copy.deepcopy(plain), 0.5)
    x = _x(4, 2, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16): out = w(x)[0]
    out.float().sum().backward()
    assert w.weight_hh_l0_raw.grad.dtype == torch.float32
    assert w.module.weight_hh_l0.dtype == torch.float32 and not w.module.weight_hh_l0.requires_grad
    w.eval(); plain.eval()
    with torch.no_grad(): assert torch.equal(w(x)[0], plain(x)[0])

def _roundtrips(m):
    buf = io.BytesIO(); torch.save(m, buf); buf.seek(0)
    return [copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False), AveragedModel(m).module]

@pytest.mark.parametrize('hold', [False, True])
def test_copy_and_save_right_after_training_forward(hold):
    cases = [(WeightDropout(nn.LSTM(3, 4, bidirectional=True), 0.5, hold_mask=hold), _x(4, 2, 3)),
             (WeightNoise(nn.Linear(3, 4), 0.2, hold_mask=hold), _x(2, 3)),
             (EmbeddingDropout(nn.Embedding(6, 3), 0.5, hold_mask=hold), torch.tensor([1, 2, 3]))]
    for m, x in cases:
        out = _first(m(x))   # graph alive, no backward yet
        for c in _roundtrips(m):
            assert list(c.state_dict()) == list(m.state_dict())
            assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), m.state_dict().values()))
            for (o, a, _), r in zip(c._slots(), c._raws()): assert getattr(o, a).grad_fn is None
            c.eval(); m.eval()
            with torch.no_grad(): assert torch.equal(_first(c(x)), _first(m(x)))
            m.train()
        out.sum().backward()

def test_state_dict_layout_and_plain_interchange():
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4, num_layers=2)
    w = WeightDropout(nn.LSTM(3, 4, num_layers=2), 0.5)
    assert list(w.state_dict()) == ['weight_hh_l0_raw', 'weight_hh_l1_raw', 'module.weight_ih_l0', 'module.bias_ih_l0',
                                    'module.bias_hh_l0', 'module.weight_ih_l1', 'module.bias_ih_l1', 'module.bias_hh_l1']
    w.load_state_dict(plain.state_dict())
    back = copy.deepcopy(w).unwrap()
    assert list(back.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain.state_dict().values()))
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in plain.named_parameters()]

def test_functional_call_restores_resting_tensors():
    "(h) `torch.func.functional_call` swaps plain tensors in; afterwards the modules hold what they held before."
    for w, x in ((WeightDropout(nn.LSTM(3, 4), 0.5), _x(2, 1, 3)), (EmbeddingDropout(nn.Embedding(6, 3), 0.5), torch.tensor([1]))):
        w(x)
        before = [(getattr(o, a), o._parameters.get(a)) for o, a, _ in w._slots()]
        params = {k: torch.zeros_like(v) for k, v in w.named_parameters()}
        out = _first(functional_call(w, params, (x,)))
        assert torch.equal(out, _first(functional_call(w, params, (x,))))   # computed with the swapped-in zeros
        assert [(getattr(o, a), o._parameters.get(a)) for o, a, _ in w._slots()] == before

def test_failed_load_with_assign_restores_objects():
    "(g) even with `assign=True`, a failed load leaves the very same Parameter objects with the same values."
    w = WeightDropout(nn.LSTM(3, 4), 0.5)
    objs = [p for p in w.parameters()]; vals = [p.detach().clone() for p in objs]
    sd = {k: v + 1 for k, v in w.state_dict().items()}; sd.pop('module.bias_hh_l0')
    with pytest.raises(RuntimeError, match='left unchanged'): w.load_state_dict(sd, assign=True)
    assert all(a is b and torch.equal(a.detach(), v) for a, b, v in zip(w.parameters(), objs, vals))
    assert all(fw is getattr(w.module, n) for fw, n in zip(w.module._flat_weights, w.module._flat_weights_names))
    w(_x(2, 1, 3))[0].sum().backward()
    assert objs[0].grad is not None

def test_drop_rate_per_row_and_embedding():
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.75):   # dyadic scales: the kept rows are exactly raw/(1-p)
        w = WeightDropout(nn.Linear(8, 4096), p, per='row', generator=g)
        with torch.no_grad(): w(_x(1, 8))
        rows = (w.module.weight == 0).all(1)
        assert abs(rows.float().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / 4096)
        ed = EmbeddingDropout(nn.Embedding(4096, 8), p, generator=g)
        with torch.no_grad(): out = ed(torch.arange(4096))
        dropped = (out == 0).all(1)
        assert abs(dropped.float().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / 4096)
        assert torch.equal(out[~dropped], ed.emb.weight.detach()[~dropped] / (1 - p))

def test_unpickles_checkpoints_with_plain_per_and_mode():
    "Whole-model pickles (fastai `export`) from before `per`/`mode` were validated attributes still load."
    for w, name, val in ((WeightDropout(nn.Linear(3, 3), 0.5, per='row'), 'per', 'row'),
                         (WeightNoise(nn.Linear(3, 3), 0.1, mode='multiplicative'), 'mode', 'multiplicative')):
        w.__dict__[name] = w.__dict__.pop('_' + name)   # the old layout
        back = pickle.loads(pickle.dumps(w))
        assert getattr(back, name) == val and '_' + name in back.__dict__ and name not in back.__dict__
        with torch.no_grad(): back(_x(1, 3))

@pytest.mark.parametrize('kind', ['linear', 'lstm'])
def test_torch_compile_keeps_fresh_masks_and_exact_gradients(kind):
    "Under `torch.compile` (AOTAutograd, as inductor uses it) each call draws a new mask, the gradient rule holds exactly and eval uses the raw weight."
    torch.manual_seed(0)
    if kind == 'linear': m, x, name = WeightDropout(nn.Linear(16, 8), 0.5), torch.randint(-3, 4, (5, 16)).float(), 'weight'
    else: m, x, name = WeightDropout(nn.LSTM(4, 6), 0.5), _x(5, 2, 4), 'weight_hh_l0'
    compiled = torch.compile(m, backend='aot_eager', fullgraph=False)
    raw = m.raw_weight(name)
    outs, masks = [], []
    for _ in range(3):
        out = _first(compiled(x)); outs.append(out.detach())
        masks.append(getattr(m.module, name) != 0)   # the weight the call used, shown detached as fastai does
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(outs[0], outs[1])
    if kind == 'linear':
        raw.grad = None
        out = compiled(x); kept = m.module.weight != 0
        out.sum().backward()
        expected = torch.ones(5, 8).t() @ x * kept / 0.5   # d(sum)/d(effective weight), masked and scaled
        assert torch.equal(raw.grad, expected)
    m.eval()
    assert torch.equal(_first(compiled(x)), _first(m.module(x)))
    assert getattr(m.module, name).data_ptr() == raw.data_ptr()   # eval computes with the raw weight itself
    copy.deepcopy(m)
