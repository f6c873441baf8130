"""Faults in the middle of training: a fault inside an AWD-LSTM layer, a fastai fit cancelled or crashed, and a model
given back as it was. The soak and the fit-stopped checks are in tests/test_callbacks.py; faults inside a single wrapper's call are in tests/test_core.py."""
import gc, statistics, time, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F
from fastai.basics import Learner, DataLoaders, DataLoader, Callback, CancelFitException, SGD
from fastai.callback.rnn import ModelResetter, RNNCallback
from fastai.text.models.core import get_language_model
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout
from weightdrop.awdlstm import AWD_LSTM
from weightdrop.callbacks import ResampleCallback

class Boom(Exception): pass

def raise_in_forward(module, exc):
    "Make `module`'s next forward raise `exc` after its inputs and (hijacked) weights are in place; returns the hook handle."
    def hook(mod, args):
        handle.remove()
        raise exc
    handle = module.register_forward_pre_hook(hook)
    return handle

def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

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
        for h in getattr(m, 'hidden', None) or []:
            for t in (h if isinstance(h, (tuple, list)) else [h]): assert t.grad_fn is None

def tiny_lm():
    torch.manual_seed(0)
    cfg = dict(emb_sz=8, n_hid=12, n_layers=2, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1,
               embed_p=0.1, weight_p=0.5, tie_weights=True, out_bias=True)
    return get_language_model(AWD_LSTM, 30, config=cfg)

@pytest.mark.parametrize('exc', [Boom('layer 2'), KeyboardInterrupt()], ids=['exception', 'KeyboardInterrupt'])
def test_fault_in_second_lstm_layer_of_awd_lstm(exc):
    "A fault in the 2nd LSTM of an AWD-LSTM LM, after the 1st ran: weights, hidden state and eval outputs are as before."
    model = tiny_lm()
    x = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train(); model(x)[0].sum().backward(); opt.step(); opt.zero_grad()
    before, hidden = snapshot(model), [tuple(h.clone() for h in hs) for hs in model[0].hidden]
    raise_in_forward(model[0].rnns[1].wrapped(), exc)
    with pytest.raises(type(exc)): model(x)
    assert_same_state(model, before)
    assert_no_graph_on_modules(model)
    assert all(torch.equal(a, b) for hs, gs in zip(model[0].hidden, hidden) for a, b in zip(hs, gs))
    reference = tiny_lm(); reference.load_state_dict(before)
    model.eval(); reference.eval(); model.reset(); reference.reset()
    with torch.no_grad(): assert torch.equal(model(x)[0], reference(x)[0])
    model.train(); model(x)[0].sum().backward(); opt.step()
    assert not torch.equal(model[0].rnns[1].weight_hh_l0_raw, before['0.rnns.1.weight_hh_l0_raw'])

# fastai fits stopped in the middle of a batch

def regression_learner(cbs=()):
    "A small MLP with DropConnect on both Linears; data that it can fit."
    torch.manual_seed(0)
    x = torch.randn(64, 8); y = x @ torch.randn(8, 1)
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=8, shuffle=True), DataLoader(ds[:16], bs=8), device='cpu')
    model = nn.Sequential(WeightDropout(nn.Linear(8, 16), 0.5), nn.ReLU(), WeightDropout(nn.Linear(16, 1), 0.3))
    learn = Learner(dls, model, loss_func=nn.MSELoss(), opt_func=SGD, lr=0.05, cbs=list(cbs))
    return learn

def plain_mlp_eval(model, x):
    "The MLP computed by hand from the raw weights: the eval reference."
    l1, l2 = model[0], model[2]
    h = F.relu(F.linear(x, l1.weight_raw, l1.wrapped().bias))
    return F.linear(h, l2.weight_raw, l2.wrapped().bias)

class FailAt(Callback):
    "Raise `exc` at `event` of training batch number `n`."
    order = 60
    def __init__(self, exc, event='after_pred', n=3): self.exc, self.event, self.n = exc, event, n
    def _maybe(self, event):
        if self.training and event == self.event and self.iter == self.n: raise self.exc
    def after_pred(self): self._maybe('after_pred')
    def after_backward(self): self._maybe('after_backward')
    def before_step(self): self._maybe('before_step')

def assert_eval_ready(learn, x):
    "eval outputs are exactly the raw-weight MLP's, through the module and through fastai's get_preds, and nothing holds a graph."
    model = learn.model
    assert_no_graph_on_modules(model)
    model.eval()
    with torch.no_grad(): assert torch.equal(model(x), plain_mlp_eval(model, x))
    preds, _ = learn.get_preds()
    with torch.no_grad(): ref = plain_mlp_eval(model, torch.stack([b for b, _ in learn.dls.valid.dataset]))
    assert torch.equal(preds, ref)

CASES = [(CancelFitException(), 'after_pred'), (CancelFitException(), 'after_backward'),
         (Boom('mid-batch'), 'after_pred'), (Boom('mid-batch'), 'before_step'), (KeyboardInterrupt(), 'after_backward')]
IDS = ['cancel-after_pred', 'cancel-after_backward', 'exception-after_pred', 'exception-before_step', 'ctrl_c-after_backward']

@pytest.mark.parametrize('exc,event', CASES[:2], ids=IDS[:2])
def test_resample_callback_cancelled_fit_restores_wrappers(exc, event):
    "ResampleCallback, fit cancelled mid-batch: hold_mask and generator are given back, eval is exact, the next fit resamples."
    gen = torch.Generator().manual_seed(5)
    learn = regression_learner([ResampleCallback(seed=0)])
    learn.model[2].generator = gen
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, cbs=FailAt(exc, event))
        assert [m.hold_mask for m in (learn.model[0], learn.model[2])] == [False, False]
        assert learn.model[0].generator is None and learn.model[2].generator is gen
        assert_eval_ready(learn, torch.randn(5, 8))
        learn.fit(1)
    assert [m.hold_mask for m in (learn.model[0], learn.model[2])] == [False, False]

@pytest.mark.parametrize('exc,event', CASES[2:], ids=IDS[2:])
def test_resample_callback_crashed_fit_leaves_model_eval_ready(exc, event):
    """ResampleCallback, fit crashed mid-batch: fastai sends no event, but eval is exact (a held mask is never applied
    in eval) and the next fit gives the wrappers their own settings back (next test)."""
    learn = regression_learner([ResampleCallback(seed=0)])
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(type(exc)): learn.fit(1, cbs=FailAt(exc, event))
    assert_eval_ready(learn, torch.randn(5, 8))

def test_resample_callback_next_fit_after_crash_restores_originals():
    "A crash, then a successful fit: the wrappers end with the settings they had before either fit."
    learn = regression_learner([ResampleCallback(seed=0)])
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(Boom): learn.fit(1, cbs=FailAt(Boom('x'), 'after_pred'))
        learn.fit(1)
    assert [m.hold_mask for m in (learn.model[0], learn.model[2])] == [False, False]
    assert [m.generator for m in (learn.model[0], learn.model[2])] == [None, None]
