"""AWD_LSTM and RNNRegularizer: a fault inside a language model's layer, and the fastai defects that need a whole
language model, pinned one named test each, with the upstream issue or thread in its docstring."""
import socket
import pytest
import torch
from torch import nn
from fastai.text.models.core import get_language_model
from weightdrop.awdlstm import AWD_LSTM
from hijack_checks import Boom, raise_in_forward
from capabilities import require_autocast_rnns

def _x(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

# ---- behaviour: a fault inside one layer of a language model

def tiny_lm():
    torch.manual_seed(0)
    cfg = dict(emb_sz=8, n_hid=12, n_layers=2, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1,
               embed_p=0.1, weight_p=0.5, tie_weights=True, out_bias=True)
    return get_language_model(AWD_LSTM, 30, config=cfg)

def assert_no_graph_on_modules(model):
    "Between calls, no tensor attribute of any submodule (the hidden state included) keeps an autograd graph alive."
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, torch.Tensor): assert v.grad_fn is None, f'{name}.{attr} keeps a graph alive'
        for h in getattr(m, 'hidden', None) or []:
            for t in (h if isinstance(h, (tuple, list)) else [h]): assert t.grad_fn is None

@pytest.mark.parametrize('exc', [Boom('layer 2'), KeyboardInterrupt()], ids=['exception', 'KeyboardInterrupt'])
def test_fault_in_second_lstm_layer_leaves_the_model_as_it_was(exc):
    "A fault in the 2nd LSTM of an AWD-LSTM LM, after the 1st ran: weights, hidden state and eval outputs are as before."
    model = tiny_lm()
    x = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train(); model(x)[0].sum().backward(); opt.step(); opt.zero_grad()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hidden = [tuple(h.clone() for h in hs) for hs in model[0].hidden]
    raise_in_forward(model[0].rnns[1].wrapped(), exc)
    with pytest.raises(type(exc)): model(x)
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(before)
    for k, v in sd.items():
        assert v.grad_fn is None, f'{k} is a transient tensor with autograd history'
        assert torch.equal(v.detach(), before[k]), f'{k} changed'
    assert_no_graph_on_modules(model)
    assert all(torch.equal(a, b) for hs, gs in zip(model[0].hidden, hidden) for a, b in zip(hs, gs))
    reference = tiny_lm(); reference.load_state_dict(before)
    model.eval(); reference.eval(); model.reset(); reference.reset()
    with torch.no_grad(): assert torch.equal(model(x)[0], reference(x)[0])
    model.train(); model(x)[0].sum().backward(); opt.step()
    assert not torch.equal(model[0].rnns[1].weight_hh_l0_raw, before['0.rnns.1.weight_hh_l0_raw'])

# ---- pinned defects

# weight dropout
# fastai (fastai/text/models/awdlstm.py, fastai/callback/rnn.py). The wrapper's own defects are pinned in
# tests/test_core.py and tests/test_dropout.py; these need AWD_LSTM or fastai's callbacks.

def test_bf16_autocast_lm_training_step():
    "fastai/fastai#1335, #1882, #1757: fp16 LM/classifier problems. A bf16-autocast AWD_LSTM training step on CPU works."
    torch.manual_seed(0)
    model = AWD_LSTM(50, 8, 12, 2, weight_p=0.5)
    dec = nn.Linear(8, 50)
    x = torch.randint(0, 50, (4, 7))
    require_autocast_rnns(model, 4, 7)   # oneDNN on some CPUs has no bf16 LSTM primitive
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dec(model(x))
        loss = nn.functional.cross_entropy(out.float().view(-1, 50), x.view(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for r in model.rnns:
        assert r.weight_hh_l0_raw.dtype == torch.float32 and r.weight_hh_l0_raw.grad.dtype == torch.float32
        assert torch.isfinite(r.weight_hh_l0_raw.grad).all() and r.weight_hh_l0_raw.grad.abs().sum() > 0

def test_every_parameter_gets_a_gradient_each_step():
    """fastai/fastai#2148: AWD-LSTM under DDP needed `find_unused_parameters=True`. DDP needs exactly this: every
    registered parameter takes part in every training step. (The 2-process gloo run is `test_ddp_without_find_unused_parameters_stays_in_step`.)"""
    model = AWD_LSTM(50, 6, 8, 2, weight_p=0.5)
    model(torch.randint(0, 50, (3, 5))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

def _ddp_worker(rank, port, q):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
        torch.manual_seed(0)
        model = DDP(AWD_LSTM(30, 6, 8, 2, weight_p=0.5))   # find_unused_parameters left False
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            model.module.reset()
            model(torch.randint(0, 30, (2, 4), generator=g)).pow(2).mean().backward()
            opt.step(); opt.zero_grad()
        q.put((rank, torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()))  # plain floats: no shared memory
        dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
        dist.destroy_process_group()
    except Exception as e: q.put((rank, repr(e)))

@pytest.mark.distributed
def test_ddp_without_find_unused_parameters_stays_in_step():
    "fastai/fastai#2148: AWD-LSTM under DDP needed `find_unused_parameters=True`; ours trains without it, in step."
    import torch.multiprocessing as mp
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    ctx = mp.get_context('spawn'); q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, q)) for r in range(2)]
    for p in procs: p.start()
    res = dict(q.get(timeout=50) for _ in procs)
    for p in procs: p.join(10)
    assert all(isinstance(v, list) for v in res.values()), res
    assert res[0] == res[1]   # the replicas stayed identical

# fastai's RNNRegularizer (AR/TAR): weightdrop's `RNNRegularizer` is fastai's without these two defects.

def _run_rnn_regularizer(bs, sl, alpha=0., beta=0.):
    from types import SimpleNamespace
    from weightdrop.awdlstm import RNNRegularizer
    h = _x(bs, sl, 4)
    loss = torch.tensor(1.)
    learn = SimpleNamespace(training=True, rnn=SimpleNamespace(out=h, raw_out=h), loss=loss, loss_grad=loss.clone())
    cb = RNNRegularizer(alpha=alpha, beta=beta); cb.learn = learn
    cb.after_loss()
    return learn

def test_tar_guard_tests_sequence_length_not_batch_size():
    "fastai's RNNRegularizer: its TAR guard `if len(h)>1` tests the batch size, not the sequence length."
    assert _run_rnn_regularizer(bs=1, sl=6, beta=1.).loss_grad > 1.   # one sequence of 6 steps: TAR applies

def test_ar_tar_in_logged_loss():
    "fastai's RNNRegularizer leaves AR/TAR out of the logged loss."
    learn = _run_rnn_regularizer(bs=4, sl=6, alpha=2., beta=1.)
    assert torch.equal(learn.loss, learn.loss_grad)

def test_text_learner_keeps_ar_tar():
    "fastai/fastai#4119: `TextLearner` silently dropped AR/TAR for a while. With weightdrop's AWD_LSTM they are there."
    from fastai.text.all import TextLearner, DataLoaders, RNNRegularizer, CrossEntropyLossFlat
    x = torch.randint(0, 30, (16, 6))
    dls = DataLoaders.from_dsets(list(zip(x[:8], x[:8])), list(zip(x[8:], x[8:])), bs=4)
    model = get_language_model(AWD_LSTM, 30, config=dict(emb_sz=8, n_hid=12, n_layers=2, pad_token=1, hidden_p=0.1,
                               input_p=0.1, embed_p=0.1, weight_p=0.5, bidir=False, output_p=0.1, tie_weights=True, out_bias=True))
    learn = TextLearner(dls, model, loss_func=CrossEntropyLossFlat(), alpha=2., beta=1.)
    regs = [cb for cb in learn.cbs if isinstance(cb, RNNRegularizer)]
    assert len(regs) == 1 and (regs[0].alpha, regs[0].beta) == (2., 1.)
    seen = []
    class Spy(RNNRegularizer.__mro__[1]):   # a plain Callback that runs after the regularizer
        order = RNNRegularizer.order + 1
        def after_loss(self):
            if self.training: seen.append((self.learn.loss.item(), self.learn.loss_grad.item()))
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=Spy())
    assert seen and all(g > l for l, g in seen)   # AR/TAR were added to the loss that is backpropagated

def test_text_classifier_masks_come_from_the_resample_seed():
    """fastai's text classifier resets its encoder at the start of every batch, after `ResampleCallback` drew the batch's
    masks from its seed. A reset that forgot them left each batch to draw from PyTorch's global RNG. The masks of a seeded
    fit are the same under any global seed, and held over the batch's BPTT chunks."""
    from fastai.text.all import text_classifier_learner, awd_lstm_clas_config, CrossEntropyLossFlat, DataLoaders, DataLoader
    from weightdrop.callbacks import ResampleCallback
    g = torch.Generator().manual_seed(0)
    ds = [(torch.randint(2, 40, (30,), generator=g), torch.tensor(i % 3)) for i in range(12)]   # 3 chunks of 10, no padding
    def masks_of_a_fit(global_seed):
        torch.manual_seed(0)
        dls = DataLoaders(DataLoader(ds, bs=4), DataLoader(ds, bs=4), device='cpu')
        dls.vocab = ['xxunk', 'xxpad'] + [f'w{i}' for i in range(2, 40)]
        learn = text_classifier_learner(dls, AWD_LSTM, seq_len=10, n_out=3, pretrained=False, loss_func=CrossEntropyLossFlat(),
                                        config={**awd_lstm_clas_config, 'emb_sz': 16, 'n_hid': 24, 'n_layers': 2},
                                        cbs=ResampleCallback(seed=0))
        seen = []
        lstm = learn.model[0].module.rnns[0]
        lstm.wrapped().register_forward_pre_hook(lambda mod, args: seen.append(mod.weight_hh_l0.detach() == 0) if mod.training else None)
        torch.manual_seed(global_seed)
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
        return seen
    a, b = masks_of_a_fit(1), masks_of_a_fit(2)
    assert len(a) == 9                                               # 3 batches of 3 chunks
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(a[3 * i], a[3 * i + k]) for i in range(3) for k in (1, 2))   # one mask per batch
    assert not torch.equal(a[0], a[3])
