"""The hijacking core (`weightdrop.core`): any module, mask lifetimes, ties, conversions, copies, checkpoints, functional
calls, faults inside a call, and the checks at its boundary. Exact properties use `torch.equal`; statistical ones use
seeded generators and 6-sigma binomial bounds."""
import copy, io, pickle, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel
from hypothesis import given, strategies as st
from weightdrop.core import WeightHijacker, is_hijacked
from weightdrop.dropout import WeightDropout, EmbeddingDropout
from weightdrop.noise import WeightNoise
from weightdrop.awdlstm import AWD_LSTM
from hijack_checks import SETTINGS, x_ as _x, first as _first, snapshot, check_error, lstm, Boom, raise_in_forward
from capabilities import require_autocast, require_compile, require_export

class User(nn.Module):
    "A user's own module with submodules and a bare parameter."
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))
    def forward(self, x): return self.dec(self.enc(x).tanh()) * self.scale

def make_wrapper(kind):
    return {'dropout': lambda m, **kw: WeightDropout(m, 0.5, **kw), 'noise': lambda m, **kw: WeightNoise(m, 0.1, **kw)}[kind]

# ---- behaviour

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

def test_is_hijacked_follows_wrap_and_unwrap():
    net = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4))
    assert not is_hijacked(net[0]) and not is_hijacked(net, '0.weight')
    w = WeightDropout(net[1], 0.5)
    assert is_hijacked(net[1]) and is_hijacked(net, '1.weight_hh_l0') and not is_hijacked(net, '1.weight_ih_l0')
    assert not is_hijacked(net, 'nope.weight') and not is_hijacked(net, '0.weight')
    w.unwrap()
    assert not is_hijacked(net[1]) and '_weightdrop_hijacked' not in vars(net[1])   # unwrap mirrors wrapping

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
def test_converted_weight_is_shown_at_once(conv):
    """fastai's WeightDropout shows a stale effective weight after `.double()` or `.half()` until the next call;
    PyTorch-NLP's GRU loses `_flat_weights` after `.to(device)`. Here the module, its flat weights and the held draws
    follow the conversion at once, and the next call trains in the new dtype."""
    for w in (WeightDropout(nn.LSTM(3, 4), 0.5, hold_mask=True), WeightDropout(nn.GRU(3, 4, num_layers=2), 0.5),
              WeightNoise(nn.Linear(3, 4), 0.1, hold_mask=True), EmbeddingDropout(nn.Embedding(5, 3), 0.5, hold_mask=True)):
        rnn = isinstance(w.wrapped(), nn.RNNBase)
        inp = lambda dt: torch.tensor([1, 2]) if isinstance(w, EmbeddingDropout) else _x(2, 1, 3).to(dt) if rnn else _x(2, 3).to(dt)
        w(inp(torch.float32)); w.resample()
        {'double': lambda: w.double(), 'half': lambda: w.half(), 'bfloat16': lambda: w.bfloat16(), 'float': lambda: w.float(),
         'to_double': lambda: w.to(torch.float64), 'to_cpu': lambda: w.to('cpu')}[conv]()
        raws = [w.raw_weight(n) for n in w.layer_names]
        for n, raw in zip(w.layer_names, raws):
            shown = w.wrapped().get_parameter(n) if not w.move_raw else getattr(w.wrapped(), n)
            assert shown.dtype == raw.dtype and torch.equal(shown.detach(), raw.detach())
        assert all(d.dtype == raws[0].dtype for d in w._held.values())
        if rnn: assert all(fw is getattr(w.module, n) for fw, n in zip(w.module._flat_weights, w.module._flat_weights_names))
        if raws[0].dtype in (torch.float32, torch.float64):
            _first(w(inp(raws[0].dtype))).sum().backward()
            assert all(r.grad is not None and r.grad.dtype == r.dtype for r in raws)

def test_flat_weights_follow_dtype_and_device_moves():
    "pytorch/pytorch#32346, #32929: a PyTorch release broke weight drop through `_flat_weights`."
    wd = WeightDropout(nn.LSTM(4, 5, num_layers=2), 0.5).double()
    lstm = wd.module
    assert all(fw is getattr(lstm, n) for fw, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    assert all(fw.dtype == torch.float64 for fw in lstm._flat_weights)
    wd(_x(3, 2, 4).double())[0].sum().backward()
    assert wd.weight_hh_l1_raw.grad.dtype == torch.float64

def test_autocast_leaves_no_stale_weight():
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4); w = WeightDropout(copy.deepcopy(plain), 0.5)
    x = _x(4, 2, 3)
    require_autocast(plain, x)   # oneDNN on some CPUs has no bf16 LSTM primitive
    with torch.autocast('cpu', dtype=torch.bfloat16): out = w(x)[0]
    out.float().sum().backward()
    assert w.weight_hh_l0_raw.grad.dtype == torch.float32
    assert w.module.weight_hh_l0.dtype == torch.float32 and not w.module.weight_hh_l0.requires_grad
    w.eval(); plain.eval()
    with torch.no_grad(): assert torch.equal(w(x)[0], plain(x)[0])

@pytest.mark.parametrize('make', [lambda lin: WeightDropout(lin, 0.5, generator=torch.Generator().manual_seed(0)),
                                  lambda lin: WeightNoise(lin, 0.1, generator=torch.Generator().manual_seed(0))],
                         ids=['WeightDropout', 'WeightNoise'])
def test_bf16_autocast_linear_trains_the_fp32_raw_weight(make):
    """Under bf16 autocast the wrapped layer computes in bf16, the raw weight and its gradient stay fp32, and the
    gradient is exactly the plain layer's at the same effective weight, passed back through the draw."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8); x = _x(5, 16)
    require_autocast(lin, x)
    w = make(copy.deepcopy(lin)); w.hold_mask = True; w.resample()
    with torch.autocast('cpu', dtype=torch.bfloat16): out = w(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    raw = w.weight_raw
    assert raw.dtype == raw.grad.dtype == torch.float32 and w.module.weight.dtype == torch.float32
    draw = w._held['weight']
    plain = copy.deepcopy(lin)
    with torch.no_grad(): plain.weight.copy_(w.combine(raw.detach(), draw))
    with torch.autocast('cpu', dtype=torch.bfloat16): ref = plain(x)
    assert torch.equal(out, ref)
    ref.float().sum().backward()
    expected = plain.weight.grad * draw if isinstance(w, WeightDropout) else plain.weight.grad
    assert torch.equal(raw.grad, expected) and torch.equal(w.module.bias.grad, plain.bias.grad)

def _roundtrips(m):
    buf = io.BytesIO(); torch.save(m, buf); buf.seek(0)
    return [copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False), AveragedModel(m).module]

@pytest.mark.parametrize('moment', ['fresh', 'after_training_forward', 'after_reset'])
@pytest.mark.parametrize('hold', [False, True])
def test_copies_and_saves_at_any_moment(moment, hold):
    """fastai's WeightDropout fails `copy.deepcopy` when fresh or reset (a non-leaf tensor sits on the module), so
    `AveragedModel` fails; `parametrize` fails `deepcopy` after a training forward and refuses `torch.save(module)`;
    PyTorch-NLP's patched-forward closure can't be pickled. Here deepcopy, pickle, torch.save and AveragedModel work at
    every moment, inside a model too, and the copies compute what the original does."""
    cases = [(WeightDropout(nn.LSTM(3, 4, bidirectional=True), 0.5, hold_mask=hold), _x(4, 2, 3)),
             (nn.Sequential(WeightNoise(nn.Linear(3, 4), 0.2, hold_mask=hold), nn.ReLU()), _x(2, 3)),
             (EmbeddingDropout(nn.Embedding(6, 3), 0.5, hold_mask=hold), torch.tensor([1, 2, 3]))]
    for m, x in cases:
        out = _first(m(x)) if moment != 'fresh' else None   # graph alive, no backward yet
        if moment == 'after_reset': m.apply(lambda s: s.reset() if isinstance(s, WeightHijacker) else None)
        for c in _roundtrips(m):
            assert list(c.state_dict()) == list(m.state_dict())
            assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), m.state_dict().values()))
            for s in c.modules():
                assert all(t.grad_fn is None for t in vars(s).values() if isinstance(t, torch.Tensor))
            c.eval(); m.eval()
            with torch.no_grad(): assert torch.equal(_first(c(x)), _first(m(x)))
            m.train()
        swa = AveragedModel(m); swa.update_parameters(m)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(swa.module.parameters(), m.parameters()))
        if out is not None: out.sum().backward()
    model = AWD_LSTM(50, 6, 8, 2)   # fastai's AWD_LSTM, built on WeightDropout, fails the same way
    copy.deepcopy(model); model.reset(); copy.deepcopy(model)

def test_state_dict_layout_and_plain_interchange():
    """fastai's layout (`<name>_raw`, `module.<other>`); loads from and into a plain module both ways. `parametrize`
    renames the key to `parametrizations.<name>.original`, so its state dict won't load into or from a plain module."""
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
    plain2 = nn.LSTM(3, 4, num_layers=2); plain2.load_state_dict(back.state_dict())

def test_functional_call_restores_resting_tensors():
    "`torch.func.functional_call` swaps plain tensors in; afterwards the modules hold what they held before."
    for w, x in ((WeightDropout(nn.LSTM(3, 4), 0.5), _x(2, 1, 3)), (EmbeddingDropout(nn.Embedding(6, 3), 0.5), torch.tensor([1]))):
        w(x)
        held = lambda: [(getattr(w.wrapped(), n), w.wrapped()._parameters.get(n)) for n in w.layer_names]
        before = held()
        params = {k: torch.zeros_like(v) for k, v in w.named_parameters()}
        out = _first(functional_call(w, params, (x,)))
        assert torch.equal(out, _first(functional_call(w, params, (x,))))   # computed with the swapped-in zeros
        assert held() == before

def test_failed_load_with_assign_restores_objects():
    "Even with `assign=True`, a failed load leaves the very same Parameter objects with the same values."
    w = WeightDropout(nn.LSTM(3, 4), 0.5)
    objs = [p for p in w.parameters()]; vals = [p.detach().clone() for p in objs]
    sd = {k: v + 1 for k, v in w.state_dict().items()}; sd.pop('module.bias_hh_l0')
    with pytest.raises(RuntimeError, match='left unchanged'): w.load_state_dict(sd, assign=True)
    assert all(a is b and torch.equal(a.detach(), v) for a, b, v in zip(w.parameters(), objs, vals))
    assert all(fw is getattr(w.module, n) for fw, n in zip(w.module._flat_weights, w.module._flat_weights_names))
    w(_x(2, 1, 3))[0].sum().backward()
    assert objs[0].grad is not None

@pytest.mark.parametrize('kind', ['linear', 'lstm'])
def test_torch_compile_keeps_fresh_masks_and_exact_gradients(kind):
    "Under `torch.compile` (AOTAutograd, as inductor uses it) each call draws a new mask, the gradient rule holds exactly and eval uses the raw weight."
    torch.manual_seed(0)
    if kind == 'linear': m, x, name = WeightDropout(nn.Linear(16, 8), 0.5), torch.randint(-3, 4, (5, 16)).float(), 'weight'
    else: m, x, name = WeightDropout(nn.LSTM(4, 6), 0.5), _x(5, 2, 4), 'weight_hh_l0'
    require_compile(nn.Linear(16, 8) if kind == 'linear' else nn.LSTM(4, 6), x)
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

# ---- tying

V, D = 12, 4

class TinyLM(nn.Module):
    "An embedding and a weight-dropped decoder that share one weight, tied in either order."
    def __init__(self, tie_first:bool, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, lin = nn.Embedding(V, D), nn.Linear(D, V)
        if tie_first: lin.weight = self.emb.weight
        self.dec = WeightDropout(lin, 0.5, hold_mask=True, generator=torch.Generator().manual_seed(seed))
        if not tie_first: self.dec.module.weight = self.emb.weight
    def forward(self, x): return self.dec(self.emb(x))

@pytest.mark.parametrize('tie_first', [True, False], ids=['tie_then_wrap', 'wrap_then_tie'])
def test_tied_decoder_trains_one_shared_weight(tie_first):
    """A language model ties its weight-dropped decoder to the embedding. A plain wrapper overwrites the tie with its own
    raw weight at the next call (the embedding gets no gradient through the decoder, and `parameters()` hands the
    optimizer a plain tensor); fastai's WeightDropout refuses the assignment. Here the tie holds through training: one
    Parameter, whose gradient is the sum over both uses, and a checkpoint round trip keeps it."""
    model = TinyLM(tie_first)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randint(0, V, (16,), generator=torch.Generator().manual_seed(1)), torch.arange(16) % V
    for step in range(3):
        model.dec.resample()
        w = model.emb.weight.detach().clone().requires_grad_()   # the reference: both uses of one tensor, by hand
        bias, mask = model.dec.module.bias.detach(), model.dec._held['weight']
        F.cross_entropy(F.linear(F.embedding(x, w), w * mask, bias), y).backward()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert model.dec.weight_raw is model.emb.weight
        assert torch.allclose(model.emb.weight.grad, w.grad, atol=1e-6, rtol=1e-5)
        assert model.emb.weight.grad[~torch.isin(torch.arange(V), x)].abs().sum() > 0   # unused words: the decoder's share
        opt.step()
    params = dict(model.named_parameters())
    assert list(params) == ['emb.weight', 'dec.module.bias'] and all(isinstance(p, nn.Parameter) for p in params.values())
    assert sorted(model.state_dict()) == ['dec.module.bias', 'dec.weight_raw', 'emb.weight']
    buf = io.BytesIO(); torch.save(model.state_dict(), buf); buf.seek(0)
    back = TinyLM(tie_first, seed=1); back.load_state_dict(torch.load(buf))
    assert back.dec.raw_weight('weight') is back.emb.weight
    model.eval(); back.eval()
    with torch.no_grad(): assert torch.equal(back(x), model(x))
    clone = copy.deepcopy(model)
    assert clone.dec.weight_raw is clone.emb.weight

def test_tie_is_adopted_by_every_entry_point():
    "A tie made after wrapping is seen by resample(), state_dict(), .to(), load_state_dict() and unwrap(), not only a call."
    for use in ('resample', 'state_dict', 'to', 'load', 'unwrap'):
        emb, dec = nn.Embedding(V, D), WeightDropout(nn.Linear(D, V), 0.5)
        dec.module.weight = emb.weight
        if use == 'resample': dec.resample()
        elif use == 'state_dict': assert torch.equal(dec.state_dict()['weight_raw'], emb.weight.detach())
        elif use == 'to': dec.double(); emb.double()
        elif use == 'load': dec.load_state_dict(dec.state_dict())
        else:
            assert dec.unwrap().weight is emb.weight
            continue
        assert dec.weight_raw is emb.weight, use
        assert 'weight' not in dec.module._parameters and not isinstance(dec.module.weight, nn.Parameter)

# ---- inference mode

@pytest.mark.parametrize('kind', ['dropout', 'embedding', 'noise'])
def test_mc_loop_in_inference_mode_between_training_steps(kind):
    """A held mask drawn under `torch.inference_mode()` (an MC-dropout loop that calls `resample()`) is an inference
    tensor: the next training step failed with "Inference tensors cannot be saved for backward". Now it trains, with the
    held mask and the exact gradient."""
    if kind == 'embedding': m, x = EmbeddingDropout(nn.Embedding(10, 3), 0.5, hold_mask=True), torch.tensor([1, 2, 2, 5])
    elif kind == 'dropout': m, x = WeightDropout(nn.Linear(4, 3), 0.5, hold_mask=True), torch.randint(-3, 4, (5, 4)).float()
    else: m, x = WeightNoise(nn.Linear(4, 3), 0.5, hold_mask=True), torch.randint(-3, 4, (5, 4)).float()
    raw = m.raw_weight('weight')
    m(x).sum().backward()
    m.eval(); m.mc_dropout = True
    with torch.inference_mode():
        for _ in range(3): m.resample(); m(x)
    m.mc_dropout = False; m.train()
    held = m._held['weight'].clone()
    raw.grad = None
    m(x).sum().backward()
    assert torch.equal(m._held['weight'], held)   # still the mask held since the last resample()
    if kind == 'embedding': expected = torch.bincount(x, minlength=10)[:, None].float() * held * torch.ones(1, 3)
    elif kind == 'dropout': expected = held * (torch.ones(5, 3).t() @ x)
    else: expected = torch.ones(5, 3).t() @ x   # additive noise: the gradient passes through
    assert torch.equal(raw.grad, expected)

# ---- faults inside a call

def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

def assert_same_state(model, before):
    "state_dict has exactly the keys and the values it had, and holds no tensor with autograd history."
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(before)
    for k, v in sd.items():
        assert v.grad_fn is None, f'{k} is a transient tensor with autograd history'
        assert torch.equal(v.detach(), before[k]), f'{k} changed'

def assert_no_graph_on_modules(model):
    "Between calls, no tensor attribute of any submodule keeps an autograd graph alive."
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, torch.Tensor): assert v.grad_fn is None, f'{name}.{attr} keeps a graph alive'

def lstm_model(cls=WeightDropout, **kw):
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
    return cls(lstm, 0.5, **kw) if cls is WeightDropout else cls(lstm, 0.3, **kw)

def plain_lstm_eval(wrapper, x):
    "What an unwrapped nn.LSTM with the raw weights computes: the reference for eval."
    ref = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
    sd = {k.replace('module.', ''): v for k, v in wrapper.state_dict().items()}
    ref.load_state_dict({(k[:-4] if k.endswith('_raw') else k): v for k, v in sd.items()})
    with torch.no_grad(): return ref(x)[0]

X = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))

@pytest.mark.parametrize('exc', [Boom('in forward'), KeyboardInterrupt()], ids=['exception', 'KeyboardInterrupt'])
@pytest.mark.parametrize('cls,hold', [(WeightDropout, False), (WeightDropout, True), (WeightNoise, False)])
def test_fault_inside_wrapped_forward(exc, cls, hold):
    "An exception or Ctrl-C inside the wrapped LSTM's forward, mid-batch: raws bit-identical, state_dict clean, eval and the next step work."
    m = lstm_model(cls, hold_mask=hold)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train(); m(X)[0].sum().backward(); opt.step(); opt.zero_grad()   # one good step first
    before = state(m)
    raw_objs = [m.raw_weight(n) for n in m.layer_names]
    raise_in_forward(m.wrapped(), exc)
    with pytest.raises(type(exc)): m(X)
    assert [m.raw_weight(n) for n in m.layer_names] == raw_objs    # the very Parameters the optimizer holds
    assert all(isinstance(p, nn.Parameter) for p in raw_objs)
    assert_same_state(m, before)
    assert_no_graph_on_modules(m)
    m.eval()
    with torch.no_grad(): out = m(X)[0]
    assert torch.equal(out, plain_lstm_eval(m, X))
    m.train()
    loss = m(X)[0].pow(2).sum(); loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in raw_objs)
    opt.step()
    assert all(not torch.equal(m.raw_weight(n), before[r]) for n, r in zip(m.layer_names, m.raw_names))

def test_fault_while_drawing_the_second_weight():
    "An exception while the wrapper replaces its 2nd of 2 weights: the 1st is put back, nothing transient stays."
    m = lstm_model(hold_mask=False)
    assert len(m.layer_names) == 2
    before = state(m)
    calls, orig = [], m.transform
    def flaky(raw):
        calls.append(1)
        if len(calls) == 2: raise Boom('second draw')
        return orig(raw)
    m.transform = flaky
    m.train()
    with pytest.raises(Boom): m(X)
    del m.transform
    assert_same_state(m, before)
    assert_no_graph_on_modules(m)
    for n in m.layer_names:        # the module holds the raw values, not a half-dropped weight
        assert torch.equal(getattr(m.wrapped(), n), m.raw_weight(n).detach())
    m.eval()
    with torch.no_grad(): assert torch.equal(m(X)[0], plain_lstm_eval(m, X))

@pytest.mark.parametrize('exc', [Boom('in embedding'), KeyboardInterrupt()], ids=['exception', 'KeyboardInterrupt'])
def test_fault_inside_embedding_dropout(exc):
    "EmbeddingDropout keeps the weight on the embedding: after a fault the embedding holds its own Parameter again, scale is forgotten."
    torch.manual_seed(0)
    emb = nn.Embedding(20, 4)
    weight = emb.weight
    ed = EmbeddingDropout(emb, 0.3)
    before = state(ed)
    words = torch.randint(0, 20, (2, 7))
    raise_in_forward(ed.emb, exc)
    with pytest.raises(type(exc)): ed(words, scale=2.0)
    assert ed.emb.weight is weight and isinstance(ed.emb.weight, nn.Parameter)
    assert_same_state(ed, before)
    ed.eval()
    assert torch.equal(ed(words), F.embedding(words, weight))   # no leftover scale
    ed.train(); ed(words).sum().backward()
    assert weight.grad is not None

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
    assert all(not getattr(w.module, n).requires_grad for n in w.layer_names)   # detached tensors, never a graph

# ---- bad input

def test_lazy_module_is_refused_untouched_then_wrapped_after_its_first_call():
    "A lazy layer has no weight shape to draw for: wrapping it is refused and leaves it as it was; after one call it wraps and trains."
    lazy = nn.LazyLinear(4); w = lazy.weight
    with pytest.raises(ValueError, match="layer_names: parameter 'weight' of the lazy LazyLinear has no shape yet; call") :
        WeightDropout(lazy, 0.5)
    assert lazy.weight is w and 'weight' in lazy._parameters and not is_hijacked(lazy)
    lazy(_x(2, 3))
    wd = WeightDropout(lazy, 0.5)
    wd(_x(2, 3)).sum().backward()
    assert wd.weight_raw.shape == (4, 3) and wd.weight_raw.grad is not None

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
    assert ('emb' if kind == 'embedding' else 'module') in msg and any(w in msg for w in ('pass', 'wrap')), msg

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

@SETTINGS
@given(attr=st.one_of(st.sampled_from(['forward', 'training', 'layer_names', 'weight_hh_l0_raw', 'resample', '_x', 'a b', 'class',
                                       '', 'hold_mask', 'state_dict']), st.integers(), st.none()))
def test_bad_module_attr(attr):
    m = lstm()
    check_error(lambda: WeightHijacker(m, module_attr=attr), m, 'module_attr')

bad_generators = st.one_of(st.integers(), st.text(max_size=3), st.just(torch.default_generator.initial_seed()))
bad_flags = st.one_of(st.integers(0, 5), st.text(max_size=3), st.just(None))

@SETTINGS
@given(gen=bad_generators, flag=bad_flags)
def test_bad_generator_and_flags(gen, flag):
    m = lstm()
    check_error(lambda: WeightDropout(m, 0.5, generator=gen), m, 'generator')
    check_error(lambda: WeightDropout(m, 0.5, hold_mask=flag), m, 'hold_mask')
    check_error(lambda: WeightHijacker(m, move_raw=flag), m, 'move_raw')

@SETTINGS
@given(gen=bad_generators, flag=bad_flags, kind=st.sampled_from(['dropout', 'noise', 'embedding']))
def test_setters_check_like_the_constructor(gen, flag, kind):
    """`wd.hold_mask = 'yes'` and `wd.generator = 5` were accepted and failed later inside torch. Every option is checked
    when it is set, with the constructor's message, and a refused value leaves the wrapper exactly as it was."""
    w = EmbeddingDropout(nn.Embedding(5, 3), 0.2) if kind == 'embedding' else make_wrapper(kind)(lstm())
    for name, bad in (('generator', gen), ('hold_mask', flag), ('mc_dropout', flag)):
        check_error(lambda: setattr(w, name, bad), w, name)
    g = torch.Generator().manual_seed(0)
    w.hold_mask, w.generator, w.mc_dropout = True, g, True
    assert (w.hold_mask, w.generator, w.mc_dropout) == (True, g, True)

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
@given(kind=st.sampled_from(['dropout', 'noise']), call=st.sampled_from(['forward', 'resample', 'unwrap', 'load']))
def test_use_after_unwrap(kind, call):
    w = make_wrapper(kind)(lstm())
    sd = w.state_dict()
    plain = w.unwrap()
    fn = {'forward': lambda: w(torch.randn(2, 1, 3)), 'resample': w.resample, 'unwrap': w.unwrap,
          'load': lambda: w.load_state_dict(sd)}[call]
    check_error(fn, plain, 'unwrap', types=RuntimeError)

# ---- pinned defects

def test_dropped_weight_is_not_a_leaf_parameter_aliasing_raw():
    "fastai/fastai#2591 (v1): the dropped weight became a leaf Parameter aliasing the raw one."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))
    eff = wd.module.weight_hh_l0
    assert not isinstance(eff, nn.Parameter) and not eff.requires_grad
    assert eff.data_ptr() != wd.weight_hh_l0_raw.data_ptr()   # a separate tensor, not a view of the raw weight
    names = [n for n, _ in wd.named_parameters()]
    assert 'weight_hh_l0_raw' in names and 'module.weight_hh_l0' not in names

def test_optimizer_gets_only_leaf_parameters():
    "pytorch/pytorch#38198: 'can't optimize a non-leaf Tensor' with fastai's WeightDropout."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))   # after a training forward too
    params = list(wd.parameters())
    assert all(p.is_leaf for p in params)
    torch.optim.Adam(params)   # raises "can't optimize a non-leaf Tensor" if any is not a leaf

class _Warns(nn.Module):
    def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(2, 2))
    def forward(self, x):
        warnings.warn('user-facing warning from the wrapped module', UserWarning)
        return x @ self.weight

def test_fastai_user_warnings_reach_the_user():
    "fastai's WeightDropout swallows every UserWarning from the wrapped module, not just the cuDNN contiguity one."
    wd = WeightDropout(_Warns(), 0.5)
    with pytest.warns(UserWarning, match='user-facing warning'): wd(torch.ones(1, 2))

def test_flat_weights_kept_in_step_without_recompaction():
    """pytorch/pytorch#40193, salesforce/awd-lstm-lm#7: cuDNN compacts the non-flat weights on every call
    ("not part of single contiguous chunk of memory"). We keep `_flat_weights` and its weak references in step, so the
    RNN never thinks its weights changed and never re-runs `_init_flat_weights`/`flatten_parameters` per call."""
    wd = WeightDropout(nn.LSTM(4, 5, num_layers=2), 0.5)
    lstm, calls, seen = wd.module, [], []
    lstm._init_flat_weights = lambda: calls.append(1)   # would be called by `_update_flat_weights` on a mismatch
    lstm.register_forward_pre_hook(lambda m, a: seen.append((m._weights_have_changed(),
        all(fw is getattr(m, n) for fw, n in zip(m._flat_weights, m._flat_weights_names)))))
    for _ in range(3): wd(_x(3, 2, 4))
    assert calls == [] and seen == [(False, True)] * 3

@pytest.mark.gpu
def test_no_cudnn_chunk_warning_on_cuda():
    "pytorch/pytorch#40193: the cuDNN non-contiguous warning on every call (CUDA only)."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        wd(_x(3, 2, 4).cuda())
    assert not [w for w in caught if 'contiguous chunk' in str(w.message)]

def test_fastai_jit_trace_and_export_in_eval():
    """fastai's WeightDropout can't be `torch.jit.script`ed (`forward(*args)`). A generic wrapper forwards any arguments,
    so it can't be scripted either (and `torch.jit` is deprecated); what deployment needs is an eval graph:
    `torch.jit.trace` and `torch.export` give one that matches eager exactly."""
    wd = WeightDropout(nn.LSTM(4, 5, batch_first=True), 0.5).eval()
    x = _x(2, 3, 4)
    require_export(nn.LSTM(4, 5, batch_first=True), x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(wd, (x,))
        assert torch.equal(traced(x)[0], wd(x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # export notes the weights the wrapper assigns during the traced call
        exported = torch.export.export(wd, (x,))
    with torch.no_grad(): assert torch.equal(exported.module()(x)[0], wd(x)[0])

def test_train_eval_train_cycles():
    "salesforce/awd-lstm-lm#114, #79: TypeError 'cannot assign FloatTensor as parameter weight_hh_l0' on train→eval→train."
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5); plain = copy.deepcopy(lstm).eval()
    wd = WeightDropout(lstm, 0.5)
    x = _x(3, 2, 4)
    for _ in range(3):
        wd.train(); wd(x)[0].sum().backward()
        wd.eval()
        with torch.no_grad(): assert torch.equal(wd(x)[0], plain(x)[0])
        plain.load_state_dict(copy.deepcopy(wd).unwrap().state_dict())

@pytest.mark.gpu
def test_cuda_move_then_forward_keeps_the_lstm_weights():
    "salesforce/awd-lstm-lm#119, pytorch/pytorch#32929: `.cuda()` then forward (no attribute / MatrixRef errors)."
    wd = WeightDropout(nn.LSTM(4, 5, num_layers=2, bidirectional=True), 0.5).cuda()
    out = wd(_x(3, 2, 4).cuda())[0]
    out.sum().backward()
    assert wd.module.weight_hh_l0.is_cuda and wd.weight_hh_l0_raw.grad.is_cuda

def test_flatten_parameters_not_patched():
    "salesforce/awd-lstm-lm#86: replacing `flatten_parameters` with a no-op broke on a PyTorch upgrade."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    assert 'flatten_parameters' not in wd.module.__dict__
    assert type(wd.module).flatten_parameters is nn.LSTM.flatten_parameters
    wd.module.flatten_parameters(); wd(_x(3, 2, 4))

def test_torchnlp_wrapper_registers_child_and_eval_reaches_it():
    "PyTorch-NLP: `WeightDrop` registers no child: 0 parameters, empty state_dict, `.eval()` doesn't reach it, drops at eval."
    lstm = nn.LSTM(4, 5); plain = copy.deepcopy(lstm)
    wd = WeightDropout(lstm, 0.5)
    assert sum(p.numel() for p in wd.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(wd.state_dict()) == len(plain.state_dict())
    wd.eval(); plain.eval()
    assert not wd.module.training
    with torch.no_grad(): assert torch.equal(wd(_x(3, 2, 4))[0], plain(_x(3, 2, 4))[0])

def test_data_parallel_runs():
    "PetrochukM/PyTorch-NLP#77: DataParallel put the patched forward's arguments on different GPUs (here: DataParallel runs)."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    dp = nn.DataParallel(wd)
    out = dp(_x(3, 2, 4))[0]
    out.sum().backward()
    assert wd.weight_hh_l0_raw.grad is not None

def test_kwargs_reach_the_wrapped_module():
    "PetrochukM/PyTorch-NLP#75: kwargs dropped in the patched forward."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5).eval()
    x, h = _x(3, 2, 4), (_x(1, 2, 5, seed=1), _x(1, 2, 5, seed=2))
    with torch.no_grad():
        assert torch.equal(wd(x, hx=h)[0], wd(x, h)[0])
        assert not torch.equal(wd(x, hx=h)[0], wd(x)[0])

def test_optimizer_step_changes_what_the_rnn_computes():
    "pytorch/pytorch#65688: parametrize silently froze RNN weights. An optimizer step changes what the RNN computes with."
    torch.manual_seed(0)
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    opt = torch.optim.SGD(wd.parameters(), lr=0.5)
    x = _x(3, 2, 4)
    wd.eval()
    with torch.no_grad(): before = wd(x)[0]
    wd.train(); wd(x)[0].pow(2).sum().backward(); opt.step()
    wd.eval()
    with torch.no_grad(): after = wd(x)[0]
    assert not torch.equal(before, after)
    assert torch.equal(wd.module.weight_hh_l0, wd.weight_hh_l0_raw.detach())
