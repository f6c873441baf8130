"""`Flipout` (`weightdrop.flipout`): exact structure, the moments and the decorrelation, gradients, dtypes and devices,
copies and checkpoints, a fastai workflow; bad input; and the defects of shared weight noise and of replacement layers."""
import copy, io, math, pickle
import pytest, torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call
from hypothesis import given, strategies as st
from scipy.stats import chi2, norm
from weightdrop.core import WeightHijacker
from weightdrop.noise import WeightNoise
from weightdrop.flipout import Flipout, random_signs
from hijack_checks import SETTINGS, check_bad_argument, check_error, snapshot, assert_unchanged

ALPHA = 1e-6   # chance that a correct layer fails one statistical test; the generators are seeded, so it never does

def gen(seed=0): return torch.Generator().manual_seed(seed)
def replay(g): return torch.Generator().set_state(g.get_state())
def flips(g, *shape, dtype=torch.float64): return random_signs(shape, g, dtype=dtype)   # its own tests: nbs/08_flipout
def x_(*shape, seed=1, dtype=torch.float64): return torch.randn(*shape, generator=gen(seed), dtype=dtype)

# every layer kind, with the options a conv can take: (make, input)
LAYERS = {
    'linear': (lambda: nn.Linear(5, 3), (4, 5)),
    'linear_seq': (lambda: nn.Linear(5, 3), (2, 3, 5)),   # (batch, time, features): a sign per row
    'linear_nobias': (lambda: nn.Linear(5, 3, bias=False), (4, 5)),
    'linear_unbatched': (lambda: nn.Linear(5, 3), (5,)),
    'conv1d': (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    'conv2d_groups_reflect': (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, padding_mode='reflect'),
                              (2, 4, 9, 9)),
    'conv2d_same_circular': (lambda: nn.Conv2d(2, 3, 3, padding='same', padding_mode='circular', bias=False), (3, 2, 6, 6)),
    'conv3d_replicate': (lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, padding_mode='replicate'), (2, 2, 4, 5, 4)),
    'conv2d_unbatched': (lambda: nn.Conv2d(2, 3, 3, groups=1), (2, 6, 6)),
}

def make(kind, std=0.3, seed=0, dtype=torch.float64, **kw):
    "(plain copy, Flipout around an identical layer, input)."
    torch.manual_seed(seed)
    mk, shape = LAYERS[kind]
    layer = mk().to(dtype)
    return copy.deepcopy(layer), Flipout(layer, std, generator=gen(seed), **kw), x_(*shape, dtype=dtype)

def sign_shapes(fl, x, out):
    "Where the signs go: every element of a Linear's input and output; (example, channel) of a conv's."
    if isinstance(fl.wrapped(), nn.Linear): return x.shape, out.shape
    ch = x.dim() - fl.wrapped().weight.dim() + 1
    per = lambda t: t.shape[:ch + 1] + (1,) * (t.dim() - ch - 1)
    return per(x), per(out)

def by_hand(plain, x, dW):
    "The layer's output for weight `dW` and no bias, with its padding, stride, dilation and groups, through F.*."
    if isinstance(plain, nn.Linear): return F.linear(x, dW)
    if plain.padding_mode != 'zeros':
        pad = plain._reversed_padding_repeated_twice
        x, padding = F.pad(x, pad, mode=plain.padding_mode), 0
    else: padding = plain.padding
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[plain.weight.dim()]
    return conv(x, dW, None, plain.stride, padding, plain.dilation, plain.groups)

def conv_ones_like(plain):
    "The same convolution with an all-ones kernel and no bias: sums its input over each receptive field."
    ones = copy.deepcopy(plain)
    with torch.no_grad(): ones.weight.fill_(1)
    if ones.bias is not None: ones.bias = None
    return ones

# ---- behaviour

@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_eval_and_zero_std_are_the_plain_layer_bit_for_bit(kind):
    plain, fl, x = make(kind, dtype=torch.float32)
    x = x.float()
    fl(x)   # a training call first: it leaves nothing behind
    fl.eval()
    with torch.no_grad(): assert torch.equal(fl(x), plain(x))
    fl.train(); fl.std = 0.
    assert torch.equal(fl(x), plain(x))

@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_output_is_the_formula_with_the_drawn_delta_and_signs(kind):
    "The generator draws ΔW, then the input signs, then the output signs (`random_signs`); a replay gives the formula by hand."
    plain, fl, x = make(kind, std=0.4)
    g = replay(fl.generator)
    y = fl(x)
    dW = torch.randn(plain.weight.shape, generator=g, dtype=torch.float64) * 0.4
    s_shape, r_shape = sign_shapes(fl, x, y)
    s, r = flips(g, *s_shape), flips(g, *r_shape)
    assert torch.equal(y, plain(x) + by_hand(plain, x * s, dW) * r)

def moments_check(kind, std=0.3, draws=8000):
    plain, fl, x = make(kind, std)
    with torch.no_grad():
        ys = torch.stack([fl(x) for _ in range(draws)])
        want = plain(x)
        var = std**2 * ((x**2).sum(-1, keepdim=True).expand_as(want) if isinstance(plain, nn.Linear)
                        else conv_ones_like(plain)(x**2))
    a = ALPHA / var.numel()   # Bonferroni over the outputs
    assert ((ys.mean(0) - want).abs() < norm.isf(a / 2) * (var / draws).sqrt()).all()
    stat = (draws - 1) * ys.var(0) / var   # chi-square with draws-1 degrees of freedom: the output is exactly Gaussian
    assert ((stat > chi2.ppf(a / 2, draws - 1)) & (stat < chi2.isf(a / 2, draws - 1))).all()

@pytest.mark.parametrize('kind', ['linear_seq', 'conv2d_groups_reflect', 'conv3d_replicate'])
def test_mean_is_plain_and_variance_is_independent_weight_noise(kind):
    """Mean: the plain output. Variance per output: std² Σx² over what the output sees (a conv's receptive field).
    With 8000 draws the chi-square band is about ±8% of the variance, so a `std` 5% off fails it."""
    moments_check(kind)

def test_two_examples_get_uncorrelated_perturbations_weight_noise_the_same():
    x = x_(1, 5, dtype=torch.float32).expand(2, 5)
    lin = nn.Linear(5, 3); plain = lin(x).detach()
    wn, fl = WeightNoise(copy.deepcopy(lin), 0.3, generator=gen()), Flipout(copy.deepcopy(lin), 0.3, generator=gen())
    draws = 3000
    with torch.no_grad():
        pw = torch.stack([wn(x) - plain for _ in range(draws)])
        pf = torch.stack([fl(x) - plain for _ in range(draws)])
    assert torch.equal(pw[:, 0], pw[:, 1])
    prod = pf[:, 0] * pf[:, 1]
    assert (prod.mean(0).abs() < norm.isf(ALPHA / 6) * prod.std(0) / math.sqrt(draws)).all()
    assert not torch.equal(pf[:, 0], pf[:, 1])

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kind', ['linear', 'conv2d_groups_reflect'])
def test_gradient_of_raw_weight_and_bias_is_the_plain_layers(kind, dtype):
    "ΔW is additive and drawn without `W`: no gradient through it, so weight and bias get the plain layer's exactly."
    plain, fl, x = make(kind, std=0.5, dtype=dtype)
    x = x.to(dtype).requires_grad_()
    xp = x.detach().clone().requires_grad_()
    y = fl(x)
    c = torch.randn(y.shape, generator=gen(5), dtype=dtype)
    (y * c).sum().backward(); (plain(xp) * c).sum().backward()
    assert fl.weight_raw.grad.dtype == dtype
    assert torch.equal(fl.weight_raw.grad, plain.weight.grad)
    assert torch.equal(fl.wrapped().bias.grad, plain.bias.grad)
    assert not torch.equal(x.grad, xp.grad)   # the input's gradient also takes the perturbation's path

def test_gradient_of_input_through_the_perturbation():
    plain, fl, x = make('linear', std=0.5, hold_mask=True)
    fl.resample()
    dW = fl._held['weight']
    g = replay(fl.generator)
    x.requires_grad_()
    c = torch.randn(4, 3, generator=gen(5), dtype=torch.float64)
    (fl(x) * c).sum().backward()
    s, r = flips(g, 4, 5), flips(g, 4, 3)
    assert torch.allclose(x.grad, c @ plain.weight + ((c * r) @ dW) * s, rtol=0, atol=1e-12)

def test_hold_mask_holds_delta_and_the_signs_stay_fresh():
    plain, fl, x = make('linear', hold_mask=True)
    x1 = x[:1]
    with torch.no_grad():
        outs = [fl(x1) for _ in range(20)]
        held = fl._held['weight']
        assert torch.equal(fl.delta(), held) and fl.delta() is held
        # one example, one held ΔW: every output is r*((x*s) ΔW) for some signs, so |perturbation| takes few values
        assert len({tuple(o.sub(plain(x1)).abs().round(decimals=9).flatten().tolist()) for o in outs}) > 1
        fl.resample(); assert not torch.equal(fl._held['weight'], held)
        fl.reset(); assert fl._held == {}
    fresh = make('linear')[1]
    with torch.no_grad(): assert not torch.equal(fresh.delta(), fresh.delta())

def test_dtype_moves_follow_held_delta():
    plain, fl, x = make('linear', dtype=torch.float32, hold_mask=True)
    fl.resample()
    fl.double()
    assert fl._held['weight'].dtype == torch.float64 and fl.weight_raw.dtype == torch.float64
    x = x.double()
    y = fl(x)
    assert y.dtype == torch.float64
    fl.eval(); assert torch.equal(fl(x), plain.double()(x))

def test_everything_it_creates_is_on_the_inputs_device():
    "On the meta device nothing is computed, and an op mixing in a CPU tensor fails: every draw follows the input."
    try: torch.randint(0, 2, (2,), device='meta', dtype=torch.float32)
    except Exception as e: pytest.skip(f'this PyTorch cannot draw on the meta device: {e}')
    for kind in ('linear', 'conv2d_groups_reflect', 'conv2d_unbatched'):
        plain, fl, x = make(kind, dtype=torch.float32)
        fl.to('meta')
        y = fl(x.float().to('meta'))
        assert y.device.type == 'meta' and y.shape == plain(x.float()).shape

@pytest.mark.gpu
def test_cuda_input_draws_on_cuda():
    plain, fl, x = make('conv2d_groups_reflect', dtype=torch.float32)
    fl.cuda(); fl.generator = torch.Generator('cuda').manual_seed(0)
    y = fl(x.float().cuda())
    assert y.is_cuda
    fl.eval(); assert torch.equal(fl(x.float().cuda()).cpu(), plain.cuda()(x.float().cuda()).cpu())

def test_autocast_keeps_the_plain_layers_output_dtype():
    with torch.autocast('cpu', dtype=torch.bfloat16): probe = nn.Linear(2, 2)(torch.randn(1, 2))
    if probe.dtype != torch.bfloat16: pytest.skip('CPU autocast does not run Linear in bfloat16 here')
    for kind in ('linear', 'conv1d'):
        plain, fl, x = make(kind, dtype=torch.float32)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert fl(x.float()).dtype == plain(x.float()).dtype == torch.bfloat16

def test_copies_saves_and_unwrap():
    plain, fl, x = make('conv2d_groups_reflect', hold_mask=True)
    model = nn.Sequential(fl, nn.ReLU())
    model(x)
    buf = io.BytesIO(); torch.save(model, buf); buf.seek(0)
    for c in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert list(c.state_dict()) == ['0.weight_raw', '0.module.bias']
        c.eval(); model.eval()
        with torch.no_grad(): assert torch.equal(c(x), model(x))
        model.train()
    back = copy.deepcopy(fl).unwrap()
    assert type(back) is nn.Conv2d and [n for n, _ in back.named_parameters()] == ['weight', 'bias']
    assert torch.equal(back(x), plain(x))

def test_functional_call_uses_the_swapped_weight_and_puts_everything_back():
    plain, fl, x = make('linear')
    before = fl.wrapped().weight
    w = torch.randn(3, 5, dtype=torch.float64)
    fl.eval()
    out = functional_call(fl, {'weight_raw': w}, (x,))
    assert torch.equal(out, F.linear(x, w, plain.bias))
    assert fl.wrapped().weight is before
    fl.train()
    g = replay(fl.generator)
    out = functional_call(fl, {'weight_raw': w}, (x,))
    dW = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    s, r = flips(g, 4, 5), flips(g, 4, 3)
    assert torch.equal(out, F.linear(x, w, plain.bias) + F.linear(x * s, dW) * r)

def test_callbacks_find_it():
    from weightdrop.callbacks import hijackers
    fl = Flipout(nn.Linear(2, 2), 0.1)
    assert isinstance(fl, WeightHijacker) and hijackers(nn.Sequential(nn.ReLU(), fl)) == [fl]

def test_fastai_fit_fit_checkpoint_into_plain_model_and_mc_preds(tmp_path):
    "A user's run: fit, fit again, save the checkpoint, load it into the plain model; Monte-Carlo predictions spread."
    from fastai.basics import Learner, MSELossFlat
    from fastai.callback.schedule import SchedLin
    from fastai.torch_core import set_seed
    from weightdrop.callbacks import ResampleCallback, DropScheduler
    from weightdrop.synth import synth_dls
    set_seed(0)
    def plain_model(): return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Conv1d(1, 2, 3, padding=1), nn.Flatten(),
                                            nn.Linear(32, 1))
    class Unsqueeze(nn.Module):
        def forward(self, x): return x[:, None]
    model = plain_model()
    model[0], model[2] = Flipout(model[0], 0.05), Flipout(model[2], 0.05)
    model.insert(2, Unsqueeze())
    learn = Learner(synth_dls(), model, loss_func=MSELossFlat(), path=tmp_path,
                    cbs=[ResampleCallback(seed=0), DropScheduler({'std': SchedLin(0.1, 0.02)})])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2); first = learn.recorder.values[-1][1]
        learn.fit(2, 1e-2)
    assert learn.recorder.values[-1][1] < first   # the validation loss kept falling
    hps = learn.recorder.hps['std']
    assert hps[0] == pytest.approx(0.1) and hps == sorted(hps, reverse=True)
    learn.save('ckpt', with_opt=False)   # the model's state dict alone
    sd = torch.load(tmp_path/'models'/'ckpt.pth')
    # into the plain model: through a fresh wrapper's loading (plain keys are understood) and `unwrap`
    plain = plain_model(); plain.insert(2, Unsqueeze())
    rewrapped = copy.deepcopy(plain)
    rewrapped[0], rewrapped[3] = Flipout(rewrapped[0], 0.05), Flipout(rewrapped[3], 0.05)
    rewrapped.load_state_dict(sd)
    rewrapped[0], rewrapped[3] = rewrapped[0].unwrap(), rewrapped[3].unwrap()
    plain.load_state_dict(rewrapped.state_dict())
    x = torch.stack([b for b, _ in learn.dls.valid.dataset])
    learn.model.eval()
    with torch.no_grad(): assert torch.equal(plain(x), learn.model(x))
    # and the plain model's checkpoint back into the wrapped one
    learn.model.load_state_dict(plain.state_dict())
    mean, spread = learn.mc_preds(n=4, seed=0)
    assert mean.shape == spread.shape and (spread > 0).all()
    with torch.no_grad(): assert torch.equal(learn.model.eval()(x), plain(x))   # mc_preds left eval exact

# ---- bad input

bad_stds = st.one_of(st.floats(max_value=-1e-9), st.just(float('nan')), st.just(float('inf')), st.just(-1),
                     st.text(max_size=3), st.none(), st.booleans(), st.just(torch.tensor(0.1)))

@SETTINGS
@given(std=bad_stds, kind=st.sampled_from(['linear', 'conv']))
def test_bad_std(std, kind):
    module = {'linear': lambda: nn.Linear(3, 4), 'conv': lambda: nn.Conv2d(2, 3, 3)}[kind]
    check_bad_argument(Flipout, 'std', 0.1, std, module)

class Custom(nn.Module):
    def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.randn(3, 3))
    def forward(self, x): return x @ self.weight

@pytest.mark.parametrize('module', [nn.LSTM(3, 4), nn.GRUCell(3, 4), nn.Embedding(5, 3), nn.ConvTranspose2d(2, 3, 3),
                                    nn.Sequential(nn.Linear(3, 3)), Custom(), nn.Bilinear(2, 2, 3),
                                    WeightNoise(nn.Linear(3, 3), 0.1)],
                         ids=lambda m: type(m).__name__)
def test_unsupported_layer_names_what_is_supported_and_is_left_alone(module):
    msg = check_error(lambda: Flipout(module, 0.1), module, 'module', types=(TypeError,))
    assert 'Linear, Conv1d, Conv2d or Conv3d' in msg and type(module).__name__ in msg

def test_not_a_module():
    with pytest.raises(TypeError, match='module must be an instance of Linear.*got str'): Flipout('linear', 0.1)

@pytest.mark.parametrize('names', ['bias', ['weight', 'bias'], '*', 'nope', 3, []])
def test_layer_names_other_than_weight(names):
    lin = nn.Linear(3, 4)
    check_error(lambda: Flipout(lin, 0.1, layer_names=names), lin, 'layer_names')

def test_already_hijacked_weight():
    lin = nn.Linear(3, 4); wn = WeightNoise(lin, 0.1)
    check_error(lambda: Flipout(lin, 0.1), lin, 'layer_names')
    wn.unwrap(); Flipout(lin, 0.1)

@pytest.mark.parametrize('arg,v', [('hold_mask', 1), ('generator', 0)])
def test_bad_hold_mask_and_generator(arg, v):
    check_bad_argument(lambda m, **kw: Flipout(m, 0.1, **kw), arg, False if arg == 'hold_mask' else None, v,
                       lambda: nn.Linear(3, 4))

# ---- pinned defects

def test_shared_weight_noise_gives_the_batch_mean_one_examples_variance():
    """Weight noise drawn once per batch (deeplearning4j's `WeightNoise`, ours) perturbs every example alike, so the
    batch mean of N identical examples' perturbations keeps one example's variance, std²Σx²; Flipout's falls to 1/N of it.
    Tolerance: the standard error of a sample variance, sqrt((m4 - var²)/D), from the same D draws."""
    n, draws, std = 16, 4000, 0.3
    x = x_(1, 5).expand(n, 5)
    lin = nn.Linear(5, 1).double(); plain = lin(x).detach()
    one = std**2 * (x[0]**2).sum().item()
    z = norm.isf(ALPHA / 4)
    for cls, want in ((WeightNoise, one), (Flipout, one / n)):
        m = cls(copy.deepcopy(lin), std, generator=gen())
        with torch.no_grad(): means = torch.stack([(m(x) - plain).mean() for _ in range(draws)])
        dev = means - means.mean()
        var, se = dev.pow(2).mean(), ((dev.pow(4).mean() - dev.pow(2).mean()**2) / draws).sqrt()
        assert abs(var - want) < z * se, (cls.__name__, var.item(), want)

def test_replacement_layer_checkpoints_vs_the_wrapped_layer():
    """bayesian-torch's `LinearFlipout`/`Conv2dFlipout` replace the layer and rename its weight (`mu_weight`,
    `rho_weight`, `mu_bias`, ...), so a pretrained `nn.Linear` checkpoint loads into them only by copying tensors by hand,
    and theirs never loads into the plain layer. The wrapped layer loads the plain checkpoint as is, and gives back a
    plain layer whose checkpoint loads into any `nn.Linear`."""
    replacement_keys = {'mu_weight', 'rho_weight', 'mu_bias', 'rho_bias'}
    pretrained = nn.Linear(5, 3)
    assert not replacement_keys & set(pretrained.state_dict())
    fl = Flipout(nn.Linear(5, 3), 0.2)
    fl.load_state_dict(pretrained.state_dict())   # strict
    x = x_(4, 5, dtype=torch.float32)
    fl.eval(); assert torch.equal(fl(x), pretrained(x))
    fl.train(); fl(x).sum().backward()
    torch.optim.SGD(fl.parameters(), lr=0.1).step()
    fresh = nn.Linear(5, 3)
    fresh.load_state_dict(copy.deepcopy(fl).unwrap().state_dict())   # strict: the plain keys
    fl.eval(); assert torch.equal(fresh(x), fl(x))

def test_seeded_fits_repeat_bit_for_bit():
    """`ResampleCallback(seed=...)` seeds ΔW; the signs, drawn at every call, come from each module's `generator`
    (here PyTorch's global RNG, which fastai's `set_seed` seeds): two runs alike end with the same weights."""
    from fastai.basics import Learner, MSELossFlat
    from fastai.torch_core import set_seed
    from weightdrop.callbacks import ResampleCallback
    from weightdrop.synth import synth_dls
    def run():
        set_seed(0)
        model = nn.Sequential(Flipout(nn.Linear(6, 16), 0.1), nn.ReLU(), Flipout(nn.Linear(16, 1), 0.1))
        learn = Learner(synth_dls(), model, loss_func=MSELossFlat(), cbs=ResampleCallback(seed=0))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
        return [p.detach().clone() for p in model.parameters()]
    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
