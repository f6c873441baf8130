"""`Recompute`, `WeightDropout(recompute=True)` and `WeightNoise(recompute=True)` (`weightdrop.recompute`): gradients
bit for bit those of the stored path, nothing weight-sized kept by the graph, every promise of the core kept, the
checks at the boundary, and the defects of stored masks it pins. Exact properties use `torch.equal`; memory is
counted through `saved_tensors_hooks`."""
import copy, io
import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from fastai.basics import Learner, SGD
from weightdrop.core import WeightHijacker, is_hijacked
from weightdrop.dropout import WeightDropout
from weightdrop.noise import WeightNoise
from weightdrop.recompute import Recompute, check_recomputable, RECOMPUTABLE
from weightdrop.callbacks import ResampleCallback
from weightdrop.synth import synth_dls
from hijack_checks import check_error, raise_in_forward, Boom

LAYERS = {
    'linear': (lambda: nn.Linear(7, 5), (3, 7)),
    'linear_3d_input': (lambda: nn.Linear(7, 5), (2, 3, 7)),
    'linear_wide': (lambda: nn.Linear(33, 17, bias=False), (4, 33)),
    'conv1d': (lambda: nn.Conv1d(3, 4, 3, stride=2), (2, 3, 9)),
    'conv1d_dilated': (lambda: nn.Conv1d(4, 4, 3, dilation=2, groups=4, padding='same'), (1, 4, 11)),
    'conv2d': (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode='reflect'), (2, 4, 6, 6)),
    'conv2d_strided': (lambda: nn.Conv2d(3, 5, (2, 3), stride=2, bias=False), (3, 3, 8, 7)),
    'conv3d': (lambda: nn.Conv3d(2, 4, 2), (1, 2, 4, 4, 4)),
    'embedding': (lambda: nn.Embedding(10, 4), [[1, 2], [3, 3]]),
    'embedding_padding_idx': (lambda: nn.Embedding(10, 4, padding_idx=1, scale_grad_by_freq=True), [1, 2, 3, 3, 1]),
    'embedding_sparse': (lambda: nn.Embedding(10, 4, sparse=True), [1, 2, 3, 3]),
}

def make_input(spec, dtype, seed=0):
    if isinstance(spec, list): return torch.tensor(spec)
    return torch.randn(*spec, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()

def step(make, spec, recompute, dtype=torch.float32, gen=True, hold=False, per='element', names=None, p=0.4):
    "Output and every gradient of one forward+backward; the same seeds whichever the path."
    torch.manual_seed(0)
    wd = WeightDropout(make().to(dtype), p, names, per=per, hold_mask=hold, recompute=recompute,
                       generator=torch.Generator().manual_seed(3) if gen else None)
    x = make_input(spec, dtype)
    torch.manual_seed(5)                       # the global generator, for gen=False
    out = wd(x)
    out.pow(2).sum().backward()
    return [out] + ([x.grad] if x.is_floating_point() else []) + [q.grad.to_dense() for q in wd.parameters()]

def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b): assert torch.equal(u, v)

def held_bytes(f, keep=()):
    "`f()`, and the bytes of the storages autograd saved while it ran, less those of `keep` (which exist anyway)."
    skip, kept = {t.untyped_storage().data_ptr() for t in keep}, {}
    def count(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip: kept[s.data_ptr()] = s.nbytes()
        return t
    with saved_tensors_hooks(count, lambda t: t): out = f()
    return out, sum(kept.values())

# ---- behaviour

@pytest.mark.parametrize('layer', list(LAYERS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_gradients_bit_identical_to_stored_masks(layer, dtype):
    "Output, input gradient, raw-weight and bias gradients equal the stored path's, for a fresh or held mask, any generator."
    make, spec = LAYERS[layer]
    for kw in (dict(), dict(gen=False), dict(hold=True), dict(hold=True, gen=False), dict(per='row'), dict(p=0.9)):
        assert_same(step(make, spec, False, dtype, **kw), step(make, spec, True, dtype, **kw))

def noise_step(make, spec, recompute, mode, dtype=torch.float32, gen=True, hold=False):
    "`step` for `WeightNoise`: output and every gradient of one forward+backward, the same seeds whichever the path."
    torch.manual_seed(0)
    wn = WeightNoise(make().to(dtype), 0.3, mode, hold_mask=hold, recompute=recompute,
                     generator=torch.Generator().manual_seed(3) if gen else None)
    x = make_input(spec, dtype)
    torch.manual_seed(5)
    out = wn(x)
    out.pow(2).sum().backward()
    return [out] + ([x.grad] if x.is_floating_point() else []) + [q.grad.to_dense() for q in wn.parameters()]

@pytest.mark.parametrize('layer', list(LAYERS))
@pytest.mark.parametrize('mode', WeightNoise.modes)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_weight_noise_gradients_bit_identical_to_stored_noise(layer, mode, dtype):
    "WeightNoise through the same mixin: output and every gradient equal the stored path's, fresh or held noise, any generator."
    make, spec = LAYERS[layer]
    for kw in (dict(), dict(gen=False), dict(hold=True), dict(hold=True, gen=False)):
        assert_same(noise_step(make, spec, False, mode, dtype, **kw), noise_step(make, spec, True, mode, dtype, **kw))

@pytest.mark.parametrize('mode', WeightNoise.modes)
def test_weight_noise_stack_holds_no_weight_size_per_layer(mode):
    "Eight noisy Linear(128, 128): the stored path keeps the noisy weight (and a multiplicative draw) per layer, the "
    "recomputed one what plain layers keep."
    def saved(recompute):
        torch.manual_seed(0)
        m = nn.Sequential(*[WeightNoise(nn.Linear(128, 128), 0.1, mode, recompute=recompute) for _ in range(8)])
        x = torch.randn(4, 128, requires_grad=True)
        return held_bytes(lambda: m(x), [*m.parameters(), x])[1]
    stored, recomputed = saved(False), saved(True)
    assert stored - recomputed == 8 * (1 if mode == 'additive' else 2) * 128 * 128 * 4
    assert recomputed == 7 * 4 * 128 * 4

def test_weight_and_bias_both_recomputed():
    make, spec = LAYERS['conv2d']
    assert_same(step(make, spec, False, names=['weight', 'bias']), step(make, spec, True, names=['weight', 'bias']))

@pytest.mark.parametrize('layer', list(LAYERS))
def test_graph_holds_nothing_weight_sized(layer):
    "What autograd saves during a recomputed call is exactly what the plain layer saves; the stored path saves more."
    make, spec = LAYERS[layer]
    def saved(kind):
        torch.manual_seed(0)
        m = make() if kind == 'plain' else WeightDropout(make(), 0.5, recompute=kind == 'recomputed')
        x = make_input(spec, torch.float32)
        return held_bytes(lambda: m(x), [*m.parameters(), x])[1]
    weight = make().weight
    plain, stored, recomputed = saved('plain'), saved('stored'), saved('recomputed')
    assert recomputed == plain
    assert stored - plain >= weight.numel() * weight.element_size()   # the mask, and for matmuls the dropped weight

def test_stack_holds_no_weight_size_per_layer():
    "Eight Linear(128, 128) layers: the stored path keeps two weight sizes per layer, the recomputed one none."
    def saved(recompute):
        torch.manual_seed(0)
        m = nn.Sequential(*[WeightDropout(nn.Linear(128, 128), 0.5, recompute=recompute) for _ in range(8)])
        x = torch.randn(4, 128, requires_grad=True)
        return held_bytes(lambda: m(x), [*m.parameters(), x])[1]
    stored, recomputed = saved(False), saved(True)
    assert stored - recomputed == 8 * 2 * 128 * 128 * 4
    assert recomputed == 7 * 4 * 128 * 4   # each later layer's input, as plain layers keep it

def test_module_shows_raw_weights_between_calls():
    "After a recomputed call the module holds the raw weight (detached), not the dropped one that would stay alive."
    wd = WeightDropout(nn.Linear(4, 3), 0.5, recompute=True)
    wd(torch.randn(2, 4)).sum().backward()
    assert not isinstance(wd.module.weight, nn.Parameter)
    assert wd.module.weight.data_ptr() == wd.weight_raw.data_ptr() and not wd.module.weight.requires_grad

def test_eval_and_zero_p_are_the_plain_module():
    torch.manual_seed(0)
    lin, x = nn.Linear(6, 4), torch.randn(3, 6)
    wd = WeightDropout(copy.deepcopy(lin), 0.5, recompute=True)
    wd.eval(); assert torch.equal(wd(x), lin(x))
    wd.train(); wd.weight_p = 0.
    out = wd(x); assert torch.equal(out, lin(x))
    out.sum().backward(); lin(x).sum().backward()
    assert torch.equal(wd.weight_raw.grad, lin.weight.grad)

def test_no_grad_draws_what_the_stored_path_draws():
    outs = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(6, 4), 0.5, recompute=rc, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(): wd.weight_raw.fill_(1.)
        with torch.no_grad(): outs.append(wd(torch.ones(2, 6)))
    assert torch.equal(*outs)

def test_rng_streams_continue_as_without_recompute():
    "Backward draws nothing from the streams: the global generator and a given one end where the stored path leaves them."
    ends = []
    for rc in (False, True):
        torch.manual_seed(1)
        g = torch.Generator().manual_seed(2)
        a = WeightDropout(nn.Linear(5, 5), 0.5, recompute=rc)                 # global generator
        b = WeightDropout(nn.Linear(5, 5), 0.5, recompute=rc, generator=g)
        b(a(torch.randn(2, 5))).sum().backward()
        ends.append((torch.rand(3), torch.rand(3, generator=g), a.weight_raw.grad, b.weight_raw.grad))
    assert_same(*ends)

def test_draws_and_option_changes_between_forward_and_backward():
    "Draws from the generator, a new weight_p or per, a resample(): backward still makes the forward's masks again."
    grads = []
    for rc in (False, True):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(6, 6), 0.3, recompute=rc, generator=g)
        held = WeightDropout(nn.Linear(6, 6), 0.3, recompute=rc, hold_mask=True, generator=g)
        out = held(wd(torch.randn(3, 6)))
        torch.rand(10, generator=g); torch.rand(10)
        wd.weight_p, held.weight_p, wd.per = 0.7, 0.6, 'row'
        held.resample()
        out.sum().backward()
        grads.append([wd.weight_raw.grad, held.weight_raw.grad])
    assert_same(*grads)

def test_backward_twice_with_retain_graph():
    grads = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(6, 6), 0.5, recompute=rc)
        x = torch.randn(3, 6, requires_grad=True)
        out = wd(x).pow(2).sum()
        out.backward(retain_graph=True); out.backward()
        grads.append([x.grad, wd.weight_raw.grad])
    assert_same(*grads)

def test_partial_backward_then_full():
    "A gradient of the input alone (the mask's token never taken), then the full backward: both exact."
    res = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(6, 6), 0.5, recompute=rc)
        x = torch.randn(3, 6, requires_grad=True)
        out = wd(x).pow(2).sum()
        gx, = torch.autograd.grad(out, x, retain_graph=True)
        out.backward()
        res.append([gx, wd.weight_raw.grad])
    assert_same(*res)

def test_outer_hooks_see_what_is_saved_as_usual():
    "Tensors not made from a draw go through the hooks around the call: `save_on_cpu` still works, gradients exact."
    res = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(6, 6), 0.5, recompute=rc)
        x = torch.randn(3, 6, requires_grad=True)
        with torch.autograd.graph.save_on_cpu(): out = wd(x)
        out.sum().backward()
        res.append([x.grad, wd.weight_raw.grad])
    assert_same(*res)

def test_deepcopy_pickle_and_state_dict_with_a_graph_alive():
    "deepcopy and torch.save while a recomputed graph waits for backward; that backward is still exact; checkpoints round trip."
    res = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Conv1d(2, 3, 3), 0.5, recompute=rc, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 2, 6)
        out = wd(x)
        twin = copy.deepcopy(wd)
        buf = io.BytesIO(); torch.save(wd, buf); buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        out.sum().backward()
        sd = wd.state_dict()
        for m in (twin, loaded):
            assert m.recompute is rc and list(m.state_dict()) == list(sd)
            m.load_state_dict(sd)
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), sd.values()))
        twin(x).sum().backward(); loaded(x).sum().backward()
        res.append([wd.weight_raw.grad, twin.weight_raw.grad, loaded.weight_raw.grad])
    assert_same(*res)

def test_load_state_dict_between_forward_and_backward_refuses_rather_than_lie():
    "load_state_dict copies into the raw weight in place: the recomputed backward refuses, as autograd does for saved tensors."
    wd = WeightDropout(nn.Linear(3, 3), 0.5, recompute=True)
    out = wd(torch.randn(2, 3))
    wd.load_state_dict(wd.state_dict())
    with pytest.raises(RuntimeError, match='modified in place between forward and backward'): out.sum().backward()

def test_unwrap_gives_the_plain_module():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3); ref = copy.deepcopy(lin)
    wd = WeightDropout(lin, 0.5, recompute=True)
    wd(torch.randn(2, 4)).sum().backward()
    m = wd.unwrap()
    assert m is lin and isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, ref.weight)

def test_functional_call_equals_stored():
    res = []
    for rc in (False, True):
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(5, 4), 0.5, recompute=rc, generator=torch.Generator().manual_seed(1))
        before = wd.module.weight
        params = {k: v.detach().clone().requires_grad_() for k, v in wd.named_parameters()}
        out = torch.func.functional_call(wd, params, (torch.randn(2, 5),))
        out.sum().backward()
        assert wd.module.weight is before                    # the module holds what it held before the call
        res.append([out, params['weight_raw'].grad, params['module.bias'].grad])
    assert_same(*res)

def test_failed_forward_leaves_raw_weights_intact():
    torch.manual_seed(0)
    wd = WeightDropout(nn.Linear(4, 3), 0.5, recompute=True)
    params = [(p, p.detach().clone()) for p in wd.parameters()]
    with pytest.raises(RuntimeError): wd(torch.randn(2, 5))          # wrong width
    raise_in_forward(wd.module, Boom())
    with pytest.raises(Boom): wd(torch.randn(2, 4))
    assert [p for p, _ in params] == list(wd.parameters()) and all(torch.equal(p, v) for p, v in params)
    assert wd.module.weight.data_ptr() == wd.weight_raw.data_ptr()   # the raw weight, not a dropped one
    wd(torch.randn(2, 4)).sum().backward()
    assert wd.weight_raw.grad is not None

def test_layers_inside_a_container():
    "A Sequential whose Linear and Conv weights are named: each recomputed, gradients exact."
    def make(): return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    names = ['0.weight', '3.weight', '3.bias']
    assert_same(step(make, (2, 2, 6), False, names=names), step(make, (2, 2, 6), True, names=names))

def fit_weights(recompute, cb=True, n_fits=(2, 1), noise=False):
    torch.manual_seed(0)
    if noise: wrap = lambda m, p: WeightNoise(m, p, 'multiplicative', recompute=recompute)
    else: wrap = lambda m, p: WeightDropout(m, p, recompute=recompute)
    model = nn.Sequential(wrap(nn.Linear(6, 16), 0.5), nn.ReLU(), wrap(nn.Linear(16, 1), 0.2))
    learn = Learner(synth_dls(), model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05,
                    cbs=ResampleCallback(seed=0) if cb else [])
    with learn.no_bar(), learn.no_logging():
        for n in n_fits: learn.fit(n)
    return learn.model.state_dict()

@pytest.mark.parametrize('noise', [False, True], ids=['WeightDropout', 'WeightNoise'])
@pytest.mark.parametrize('cb', [True, False], ids=['resample_callback', 'fresh_global_masks'])
def test_fastai_fit_then_fit_same_weights(cb, noise):
    "fit then fit, one held mask per batch (ResampleCallback(seed=0)) or a fresh one per call from the global generator."
    stored, recomputed = fit_weights(False, cb, noise=noise), fit_weights(True, cb, noise=noise)
    assert list(stored) == list(recomputed)
    for k in stored: assert torch.equal(stored[k], recomputed[k]), k

class ToyMixout(Recompute, WeightHijacker):
    "The contract's example: a keep mask M and a target u, weight (M*raw + (1-M)*u - p*u)/(1-p); three lines for recompute."
    def __init__(self, module, p, generator=None, recompute=False):
        self.p = p
        self._check_recompute(recompute, module, 'weight')
        super().__init__(module, 'weight', generator=generator)
        self.register_buffer('target', self.weight_raw.detach().clone().mul_(0.5))
    def sample(self, raw): return torch.rand(raw.shape, generator=self._generator, dtype=raw.dtype).ge_(self.p).to(raw.dtype)
    def combine(self, raw, m): return (m * raw + (1 - m) * self.target - self.p * self.target) / (1 - self.p)

def test_contract_holds_for_another_hijacker():
    "A Mixout-like subclass passes recompute=True through the mixin: exact gradients, only x kept by the graph."
    res, sizes = [], []
    for rc in (False, True):
        torch.manual_seed(0)
        mx = ToyMixout(nn.Linear(64, 64), 0.3, generator=torch.Generator().manual_seed(4), recompute=rc)
        x = torch.randn(3, 64, requires_grad=True)
        out, n = held_bytes(lambda: mx(x), [*mx.parameters(), x])
        out.pow(2).sum().backward()
        res.append([out, x.grad, mx.weight_raw.grad, mx.module.bias.grad]); sizes.append(n)
    assert_same(*res)
    assert sizes[1] == 0 and sizes[0] >= 2 * 64 * 64 * 4

# ---- bad input

@pytest.mark.parametrize('v', [1, 0, 'yes', None, torch.tensor(True)])
def test_recompute_must_be_a_bool(v):
    lin = nn.Linear(3, 3)
    check_error(lambda: WeightDropout(lin, 0.5, recompute=v), lin, 'recompute')
    wd = WeightDropout(nn.Linear(3, 3), 0.5)
    check_error(lambda: setattr(wd, 'recompute', v), wd, 'recompute')
    assert wd.recompute is False

UNSUPPORTED = {'lstm': (lambda: nn.LSTM(3, 4), None), 'gru': (lambda: nn.GRU(3, 4), None),
               'lstm_cell': (lambda: nn.LSTMCell(3, 4), None), 'layer_norm': (lambda: nn.LayerNorm(3), 'weight'),
               'conv_transpose': (lambda: nn.ConvTranspose1d(2, 2, 3), 'weight'),
               'embedding_max_norm': (lambda: nn.Embedding(5, 3, max_norm=1.), 'weight')}

@pytest.mark.parametrize('kind', list(UNSUPPORTED))
def test_unsupported_layers_refused_and_untouched(kind):
    make, names = UNSUPPORTED[kind]
    m = make()
    msg = check_error(lambda: WeightDropout(m, 0.5, names, recompute=True), m, 'recompute')
    assert not is_hijacked(m)
    assert 'max_norm' in msg if kind == 'embedding_max_norm' else 'Linear, Conv1d, Conv2d, Conv3d, Embedding' in msg
    wd = WeightDropout(make(), 0.5, names)       # the same module without recompute is fine, and refuses it later
    check_error(lambda: setattr(wd, 'recompute', True), wd, 'recompute')
    assert wd.recompute is False

def test_overridden_forward_refused():
    class Tied(nn.Linear):
        def forward(self, x): return x @ self.weight.T.exp()
    m = Tied(3, 3)
    check_error(lambda: WeightDropout(m, 0.5, recompute=True), m, 'recompute')

def test_module_changing_its_weight_in_place_fails_the_call():
    class Renorm(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        def forward(self, x):
            with torch.no_grad(): self.lin.weight.clamp_(-0.1, 0.1)
            return self.lin(x)
    wd = WeightDropout(Renorm(), 0.5, 'lin.weight', recompute=True)
    raw = wd.get_parameter('lin__weight_raw').detach().clone()
    with pytest.raises(RuntimeError, match='changed its dropped weight in place'): wd(torch.randn(2, 3))
    assert torch.equal(wd.get_parameter('lin__weight_raw'), raw)

def test_check_recomputable_names_the_supported_layers():
    assert RECOMPUTABLE == (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    with pytest.raises(TypeError, match="'0.weight_hh_l0'.*LSTM.weight_hh_l0"): check_recomputable(nn.Sequential(nn.LSTM(2, 2)), ['0.weight_hh_l0'])

# ---- pinned defects

def test_stored_masks_keep_two_weight_sizes_per_layer_until_backward():
    "fastai's and awd-lstm-lm's weight dropout keep the mask and the dropped weight in the graph: 2 weight sizes a layer."
    def saved(recompute):
        wd = WeightDropout(nn.Linear(256, 256), 0.5, recompute=recompute)
        x = torch.randn(2, 256, requires_grad=True)
        return held_bytes(lambda: wd(x), [*wd.parameters(), x])[1]
    assert saved(False) == 2 * 256 * 256 * 4
    assert saved(True) == 0

def test_explicit_generator_restored_where_checkpoint_restores_only_global_rngs():
    "torch.utils.checkpoint's preserve_rng_state replays the global generators only: a generator= draw comes out different. "
    "Ours replays the wrapper's own generator, even after it drew again before backward."
    res = []
    for rc in (False, True):
        g = torch.Generator().manual_seed(7)
        torch.manual_seed(0)
        wd = WeightDropout(nn.Linear(8, 8), 0.5, recompute=rc, generator=g)
        x = torch.randn(4, 8, requires_grad=True)
        out = wd(x)
        wd(x)                                  # the generator moves on before backward
        out.sum().backward()
        res.append([x.grad, wd.weight_raw.grad])
    assert_same(*res)

def test_double_backward_refused_not_silently_wrong():
    "A regenerated weight is a constant to autograd: a second-order gradient through it would be wrong, so it raises."
    wd = WeightDropout(nn.Linear(3, 3), 0.5, recompute=True)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match='first-order gradients only'):
        torch.autograd.grad(wd(x).pow(2).sum(), x, create_graph=True)

def test_weight_changed_before_backward_refused_as_autograd_does():
    "A no_grad in-place change to a weight autograd saved raises at backward; a recomputed weight does the same."
    wd = WeightDropout(nn.Linear(3, 3), 0.5, recompute=True)
    out = wd(torch.randn(2, 3))
    with torch.no_grad(): wd.weight_raw.add_(1.)
    with pytest.raises(RuntimeError, match='modified in place between forward and backward'): out.sum().backward()
