"""Every user-reported defect of the anchors (../shared/ANCHORS.md), pinned: one named regression test each, with
the issue or thread in its docstring. Sections: weight dropout, random gates."""
import copy, io, math, pickle, socket, warnings
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from weightdrop.core import WeightHijacker
from weightdrop.dropout import WeightDropout, EmbeddingDropout
from weightdrop.awdlstm import AWD_LSTM
import os, random
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from weightdrop.gates import RandomGate, clear_off_grads, recalibrate_bn, stochastic_depth, gates

def _x(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def _sig(p, n, k=6): return k * math.sqrt(p * (1 - p) / n)

# ---- weight dropout ----
# fastai (fastai/text/models/awdlstm.py, fastai/callback/rnn.py)

def test_fastai2_427_raw_weights_train():
    "fastai/fastai2#427: `F.dropout(raw_w.data, ...)` stopped gradients, so the raw LSTM weights never trained."
    torch.manual_seed(0)
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    before = wd.weight_hh_l0_raw.detach().clone()
    opt = torch.optim.SGD(wd.parameters(), lr=0.1)
    wd(_x(6, 2, 4))[0].pow(2).sum().backward()
    g = wd.weight_hh_l0_raw.grad
    assert g is not None and g.abs().sum() > 0
    opt.step()
    assert not torch.equal(wd.weight_hh_l0_raw.detach(), before)

def test_fastai_2591_dropped_weight_is_not_a_leaf_parameter_aliasing_raw():
    "fastai/fastai#2591 (v1): the dropped weight became a leaf Parameter aliasing the raw one."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))
    eff = wd.module.weight_hh_l0
    assert not isinstance(eff, nn.Parameter) and not eff.requires_grad
    assert eff.data_ptr() != wd.weight_hh_l0_raw.data_ptr()   # a separate tensor, not a view of the raw weight
    names = [n for n, _ in wd.named_parameters()]
    assert 'weight_hh_l0_raw' in names and 'module.weight_hh_l0' not in names

def test_pytorch_38198_optimizer_gets_only_leaves():
    "pytorch/pytorch#38198: 'can't optimize a non-leaf Tensor' with fastai's WeightDropout."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))   # after a training forward too
    params = list(wd.parameters())
    assert all(p.is_leaf for p in params)
    torch.optim.Adam(params)   # raises "can't optimize a non-leaf Tensor" if any is not a leaf

def test_fastai_bidir_reverse_weight_is_dropped():
    "ANCHORS (fastai): only `weight_hh_l0` is dropped; with `bidir=True`, `weight_hh_l0_reverse` gets no dropout at all."
    wd = WeightDropout(nn.LSTM(4, 8, bidirectional=True), 0.5, generator=torch.Generator().manual_seed(0))
    assert wd.layer_names == ['weight_hh_l0', 'weight_hh_l0_reverse']
    with torch.no_grad(): wd(_x(3, 2, 4))
    rev = wd.module.weight_hh_l0_reverse
    frac = (rev == 0).float().mean().item()
    assert abs(frac - 0.5) < _sig(0.5, rev.numel())
    model = AWD_LSTM(50, 6, 8, 2, bidir=True, weight_p=0.5)
    assert all('weight_hh_l0_reverse' in r.layer_names for r in model.rnns)

class _Warns(nn.Module):
    def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(2, 2))
    def forward(self, x):
        warnings.warn('user-facing warning from the wrapped module', UserWarning)
        return x @ self.weight

def test_fastai_user_warnings_reach_the_user():
    "ANCHORS (fastai): all UserWarnings from the wrapped module are swallowed, not just the cuDNN contiguity one."
    wd = WeightDropout(_Warns(), 0.5)
    with pytest.warns(UserWarning, match='user-facing warning'): wd(torch.ones(1, 2))

def test_pytorch_40193_flat_weights_kept_in_step_without_recompaction():
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
def test_pytorch_40193_no_chunk_warning_on_cuda():
    "pytorch/pytorch#40193: the cuDNN non-contiguous warning on every call (CUDA only)."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        wd(_x(3, 2, 4).cuda())
    assert not [w for w in caught if 'contiguous chunk' in str(w.message)]

def test_fastai_deepcopy_fresh_and_reset_and_averaged_model():
    "ANCHORS (fastai): `copy.deepcopy` of a fresh or reset WeightDropout or AWD_LSTM fails, so AveragedModel fails."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    copy.deepcopy(wd); wd.reset(); copy.deepcopy(wd)
    model = AWD_LSTM(50, 6, 8, 2)
    copy.deepcopy(model); model.reset(); copy.deepcopy(model)
    model(torch.randint(0, 50, (2, 5)))   # and right after a training forward
    swa = AveragedModel(model)
    swa.update_parameters(model)
    for p_avg, p in zip(swa.module.parameters(), model.parameters()): assert torch.equal(p_avg.detach(), p.detach())

def test_fastai_no_stale_weight_after_double_or_half():
    "ANCHORS (fastai): after `.double()` or `.half()`, the effective weight stays stale until the next forward."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))
    for conv, dt in ((nn.Module.double, torch.float64), (nn.Module.half, torch.float16), (nn.Module.float, torch.float32)):
        conv(wd)
        for n in wd.module._flat_weights_names: assert getattr(wd.module, n).dtype == dt, n
        assert all(w.dtype == dt for w in wd.module._flat_weights)
        assert torch.equal(wd.module.weight_hh_l0, wd.weight_hh_l0_raw.detach())

def test_fastai_jit_trace_and_export_in_eval():
    """ANCHORS (fastai): `torch.jit.script` fails (`forward(*args)`). A generic wrapper forwards any arguments, so it can't
    be scripted either (and `torch.jit` is deprecated); what deployment needs is an eval graph: `torch.jit.trace` and
    `torch.export` give one that matches eager exactly."""
    wd = WeightDropout(nn.LSTM(4, 5, batch_first=True), 0.5).eval()
    x = _x(2, 3, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(wd, (x,))
        assert torch.equal(traced(x)[0], wd(x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # export notes the weights the wrapper assigns during the traced call
        exported = torch.export.export(wd, (x,))
    with torch.no_grad(): assert torch.equal(exported.module()(x)[0], wd(x)[0])

def test_fastai_embedding_dropout_eval_scale_never_writes_weights():
    "ANCHORS (fastai): EmbeddingDropout's eval path with `scale` multiplies the real weights in place (corrupts or raises)."
    emb = nn.Embedding(10, 4); w0 = emb.weight.detach().clone()
    ed = EmbeddingDropout(emb, 0.3).eval()
    words = torch.tensor([1, 2, 3])
    with torch.no_grad(): out = ed(words, scale=2.)
    assert torch.equal(out, 2. * w0[words]) and torch.equal(emb.weight.detach(), w0)
    out = ed(words, scale=2.)   # with grad enabled fastai raises (in-place on a leaf that requires grad)
    out.sum().backward()
    assert torch.equal(emb.weight.detach(), w0) and emb.weight.grad is not None

def test_fastai2_197_half_masks():
    "fastai/fastai2#197: `bernoulli` not implemented for Half."
    for dt in (torch.float16, torch.bfloat16):
        wd = WeightDropout(nn.Linear(64, 64), 0.5, generator=torch.Generator().manual_seed(0)).to(dt)
        with torch.no_grad(): out = wd(torch.ones(2, 64, dtype=dt))
        w = wd.module.weight
        assert out.dtype == dt and w.dtype == dt
        kept = w != 0
        assert torch.equal(w[kept], wd.weight_raw.detach()[kept] * 2)
        assert abs((~kept).float().mean().item() - 0.5) < _sig(0.5, w.numel())

def test_fastai_1335_1882_1757_mixed_precision_lm_step():
    "fastai/fastai#1335, #1882, #1757: fp16 LM/classifier problems. A bf16-autocast AWD_LSTM training step on CPU works."
    torch.manual_seed(0)
    model = AWD_LSTM(50, 8, 12, 2, weight_p=0.5)
    dec = nn.Linear(8, 50)
    x = torch.randint(0, 50, (4, 7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dec(model(x))
        loss = nn.functional.cross_entropy(out.float().view(-1, 50), x.view(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for r in model.rnns:
        assert r.weight_hh_l0_raw.dtype == torch.float32 and r.weight_hh_l0_raw.grad.dtype == torch.float32
        assert torch.isfinite(r.weight_hh_l0_raw.grad).all() and r.weight_hh_l0_raw.grad.abs().sum() > 0

def test_fastai_2148_every_parameter_gets_a_gradient():
    """fastai/fastai#2148: AWD-LSTM under DDP needed `find_unused_parameters=True`. DDP needs exactly this: every
    registered parameter takes part in every training step. (The 2-process gloo run is `test_fastai_2148_ddp_gloo`.)"""
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
def test_fastai_2148_ddp_gloo():
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

# salesforce/awd-lstm-lm (weight_drop.py)

def test_awd_lstm_lm_114_79_train_eval_train_cycles():
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

def test_awd_lstm_lm_72_variational_mask_not_applied_in_eval():
    "salesforce/awd-lstm-lm#72: the variational (row) mask keeps dropping at eval."
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5); plain = copy.deepcopy(lstm).eval()
    wd = WeightDropout(lstm, 0.5, per='row', hold_mask=True)
    x = _x(3, 2, 4)
    wd(x); wd.resample(); wd.eval()
    with torch.no_grad(): assert torch.equal(wd(x)[0], plain(x)[0])
    assert torch.equal(wd.module.weight_hh_l0, wd.weight_hh_l0_raw.detach())

def test_awd_lstm_lm_119_weight_attribute_after_to():
    "salesforce/awd-lstm-lm#119: `'LSTM' object has no attribute 'weight_hh_l0'` after `.cuda()` (here: `.to()`)."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    for dev_or_dtype in (torch.device('cpu'), torch.float64, torch.float32):
        wd.to(dev_or_dtype)
        assert isinstance(wd.module.weight_hh_l0, torch.Tensor)
        wd(_x(3, 2, 4).to(wd.weight_hh_l0_raw.dtype))

@pytest.mark.gpu
def test_awd_lstm_lm_119_pytorch_32929_cuda():
    "salesforce/awd-lstm-lm#119, pytorch/pytorch#32929: `.cuda()` then forward (no attribute / MatrixRef errors)."
    wd = WeightDropout(nn.LSTM(4, 5, num_layers=2, bidirectional=True), 0.5).cuda()
    out = wd(_x(3, 2, 4).cuda())[0]
    out.sum().backward()
    assert wd.module.weight_hh_l0.is_cuda and wd.weight_hh_l0_raw.grad.is_cuda

def test_awd_lstm_lm_86_flatten_parameters_not_patched():
    "salesforce/awd-lstm-lm#86: replacing `flatten_parameters` with a no-op broke on a PyTorch upgrade."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    assert 'flatten_parameters' not in wd.module.__dict__
    assert type(wd.module).flatten_parameters is nn.LSTM.flatten_parameters
    wd.module.flatten_parameters(); wd(_x(3, 2, 4))

def test_pytorch_32346_flat_weights_follow_to():
    "pytorch/pytorch#32346, #32929: a PyTorch release broke weight drop through `_flat_weights`."
    wd = WeightDropout(nn.LSTM(4, 5, num_layers=2), 0.5).double()
    lstm = wd.module
    assert all(fw is getattr(lstm, n) for fw, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    assert all(fw.dtype == torch.float64 for fw in lstm._flat_weights)
    wd(_x(3, 2, 4).double())[0].sum().backward()
    assert wd.weight_hh_l1_raw.grad.dtype == torch.float64

# PetrochukM/PyTorch-NLP (torchnlp/nn/weight_drop.py)

def test_torchnlp_wrapper_registers_child_and_eval_reaches_it():
    "PyTorch-NLP: `WeightDrop` registers no child: 0 parameters, empty state_dict, `.eval()` doesn't reach it, drops at eval."
    lstm = nn.LSTM(4, 5); plain = copy.deepcopy(lstm)
    wd = WeightDropout(lstm, 0.5)
    assert sum(p.numel() for p in wd.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(wd.state_dict()) == len(plain.state_dict())
    wd.eval(); plain.eval()
    assert not wd.module.training
    with torch.no_grad(): assert torch.equal(wd(_x(3, 2, 4))[0], plain(_x(3, 2, 4))[0])

def test_torchnlp_gru_reverse_weights_dropped():
    "PyTorch-NLP: the `_reverse` directions are never dropped."
    wd = WeightDropout(nn.GRU(4, 8, num_layers=2, bidirectional=True), 0.5, generator=torch.Generator().manual_seed(0))
    assert wd.layer_names == ['weight_hh_l0', 'weight_hh_l0_reverse', 'weight_hh_l1', 'weight_hh_l1_reverse']
    with torch.no_grad(): wd(_x(3, 2, 4))
    for n in wd.layer_names: assert (getattr(wd.module, n) == 0).any(), n

def test_torchnlp_torch_save_whole_model():
    "PyTorch-NLP: the patched-forward closure can't be pickled, so `torch.save(model)` fails."
    model = nn.Sequential(WeightDropout(nn.Linear(4, 4), 0.5), nn.ReLU())
    model(torch.ones(1, 4))
    buf = io.BytesIO(); torch.save(model, buf); buf.seek(0)
    back = torch.load(buf, weights_only=False).eval(); model.eval()
    with torch.no_grad(): assert torch.equal(back(torch.ones(1, 4)), model(torch.ones(1, 4)))

def test_torchnlp_93_rate_and_eval_match_awd_lstm_lm():
    """PetrochukM/PyTorch-NLP#93: much worse results than awd-lstm-lm (it dropped at eval and missed weights).
    Ours drops the requested fraction of every hidden weight in training and nothing in eval, like awd-lstm-lm's intent."""
    g = torch.Generator().manual_seed(0)
    wd = WeightDropout(nn.LSTM(32, 64, num_layers=2), 0.3, generator=g)
    with torch.no_grad(): wd(_x(2, 1, 32))
    for n in wd.layer_names:
        w = getattr(wd.module, n)
        assert abs((w == 0).float().mean().item() - 0.3) < _sig(0.3, w.numel()), n
    wd.eval()
    with torch.no_grad(): wd(_x(2, 1, 32))
    for n in wd.layer_names: assert torch.equal(getattr(wd.module, n), getattr(wd, n + '_raw').detach())

def test_torchnlp_77_data_parallel():
    "PetrochukM/PyTorch-NLP#77: DataParallel put the patched forward's arguments on different GPUs (here: DataParallel runs)."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    dp = nn.DataParallel(wd)
    out = dp(_x(3, 2, 4))[0]
    out.sum().backward()
    assert wd.weight_hh_l0_raw.grad is not None

def test_torchnlp_87_gru_flat_weights_after_to():
    "PetrochukM/PyTorch-NLP#87: GRU has no `_flat_weights` after `.to(device)`."
    wd = WeightDropout(nn.GRU(4, 5), 0.5).to(torch.device('cpu')).to(torch.float64)
    gru = wd.module
    assert len(gru._flat_weights) == len(gru._flat_weights_names)
    assert all(fw is getattr(gru, n) for fw, n in zip(gru._flat_weights, gru._flat_weights_names))
    wd(_x(3, 2, 4).double())[0].sum().backward()

def test_torchnlp_75_kwargs_reach_module():
    "PetrochukM/PyTorch-NLP#75: kwargs dropped in the patched forward."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5).eval()
    x, h = _x(3, 2, 4), (_x(1, 2, 5, seed=1), _x(1, 2, 5, seed=2))
    with torch.no_grad():
        assert torch.equal(wd(x, hx=h)[0], wd(x, h)[0])
        assert not torch.equal(wd(x, hx=h)[0], wd(x)[0])

# torch.nn.utils.parametrize

def test_parametrize_one_mask_per_weight_per_lstm_call(monkeypatch):
    "ANCHORS (parametrize): without `cached()`, the parametrization runs 4 times per LSTM forward (4 masks, last one used)."
    import weightdrop.dropout as D
    draws, keep_mask = [], D._keep_mask
    monkeypatch.setattr(D, '_keep_mask', lambda *a, **k: draws.append(1) or keep_mask(*a, **k))
    for per in ('element', 'row'):
        draws.clear()
        wd = WeightDropout(nn.LSTM(4, 5, num_layers=2, bidirectional=True), 0.5, per=per)
        wd(_x(3, 2, 4))
        assert len(draws) == len(wd.layer_names) == 4

def test_parametrize_state_dict_loads_into_and_from_plain():
    "ANCHORS (parametrize): the key becomes `parametrizations.<name>.original`, so it won't load into or from a plain module."
    plain = nn.LSTM(4, 5)
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd.load_state_dict(plain.state_dict())
    assert torch.equal(wd.weight_hh_l0_raw.detach(), plain.weight_hh_l0.detach())
    assert not any('parametrizations' in k for k in wd.state_dict())
    plain2 = nn.LSTM(4, 5)
    plain2.load_state_dict(copy.deepcopy(wd).unwrap().state_dict())
    assert torch.equal(plain2.weight_hh_l0.detach(), plain.weight_hh_l0.detach())

def test_parametrize_torch_save_module_allowed():
    "ANCHORS (parametrize): `torch.save(module)` is refused, which blocks fastai `export`."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    wd(_x(3, 2, 4))
    buf = io.BytesIO(); torch.save(wd, buf); buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back.weight_hh_l0_raw.detach(), wd.weight_hh_l0_raw.detach())

def test_parametrize_deepcopy_after_training_forward():
    "ANCHORS (parametrize): `deepcopy` fails after a training forward."
    wd = WeightDropout(nn.LSTM(4, 5), 0.5)
    out = wd(_x(3, 2, 4))[0]          # graph still alive, not yet backpropagated
    c = copy.deepcopy(wd); pickle.loads(pickle.dumps(wd))
    out.sum().backward()
    assert torch.equal(c.weight_hh_l0_raw.detach(), wd.weight_hh_l0_raw.detach())

def test_pytorch_65688_rnn_weights_not_frozen():
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

# Others

def test_keras_tf_dropconnect_scale_once_and_drop_p():
    """ANCHORS (others): several Keras/TF DropConnect packages rescale twice or invert keep/drop. With p=0.75 (a dyadic
    scale, so exact in floating point) 75% of the weights are dropped and every kept one is exactly 4x the raw weight."""
    for per in ('element', 'row'):
        wd = WeightDropout(nn.Linear(256, 256), 0.75, per=per, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(): wd(torch.zeros(1, 256))
        eff, raw = wd.module.weight, wd.weight_raw.detach()
        kept = eff != 0
        assert torch.equal(eff[kept], raw[kept] * 4)
        n = eff.numel() if per == 'element' else eff.shape[0]
        assert abs((~kept).float().mean().item() - 0.75) < _sig(0.75, n)

def test_naming_hazard_drops_weights_not_samples():
    "ANCHORS (others): in EfficientNet-style code 'drop_connect' means stochastic depth (dropping whole samples)."
    wd = WeightDropout(nn.Linear(64, 64, bias=False), 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): out = wd(_x(32, 64))
    assert (out != 0).any(1).all()                     # no sample's output is zeroed
    m = wd.module.weight != 0
    assert (m.any(1) & ~m.all(1)).float().mean() > 0.99   # zeros are scattered inside rows, not whole units or samples

# fastai's RNNRegularizer (AR/TAR): weightdrop's `RNNRegularizer` is fastai's with these two defects fixed (nbs/31_callbacks).

def _run_rnn_regularizer(bs, sl, alpha=0., beta=0.):
    from types import SimpleNamespace
    from weightdrop.callbacks import RNNRegularizer
    h = _x(bs, sl, 4)
    loss = torch.tensor(1.)
    learn = SimpleNamespace(training=True, rnn=SimpleNamespace(out=h, raw_out=h), loss=loss, loss_grad=loss.clone())
    cb = RNNRegularizer(alpha=alpha, beta=beta); cb.learn = learn
    cb.after_loss()
    return learn

def test_fastai_tar_guard_tests_sequence_length():
    "ANCHORS (fastai): RNNRegularizer's TAR guard `if len(h)>1` tests the batch size, not the sequence length."
    assert _run_rnn_regularizer(bs=1, sl=6, beta=1.).loss_grad > 1.   # one sequence of 6 steps: TAR applies

def test_fastai_ar_tar_in_logged_loss():
    "ANCHORS (fastai): AR/TAR are left out of the logged loss."
    learn = _run_rnn_regularizer(bs=4, sl=6, alpha=2., beta=1.)
    assert torch.equal(learn.loss, learn.loss_grad)

def test_fastai_4119_text_learner_keeps_ar_tar():
    "fastai/fastai#4119: `TextLearner` silently dropped AR/TAR for a while. With weightdrop's AWD_LSTM they are there."
    from fastai.text.all import TextLearner, DataLoaders, RNNRegularizer, CrossEntropyLossFlat
    from fastai.text.models.core import get_language_model
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


# ---- random gates ----

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _choices(global_seed, steps=16):
    "One 'rank': its own global RNG state, a gate built from the same config."
    torch.manual_seed(global_seed); random.seed(global_seed); np.random.seed(global_seed)
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(4)], combine='sum', seed=0)
    out = []
    with torch.no_grad():
        for step in range(steps):
            g.sample(step=step); g(torch.ones(1, 2)); out.append(g.last_choice)
            torch.rand(3); random.random(); np.random.rand()   # user code moving the global RNGs differently per rank
    return out


def test_nni_unseeded_random_state_differs_per_rank():
    """microsoft/nni#5013: NNI's Categorical.random() used an unseeded RandomState, so DDP ranks drew different paths.
    Here the choice depends only on (seed, step), not on any global RNG: two ranks with different global states agree."""
    a, b = _choices(0), _choices(12345)
    assert a == b
    assert len(set(a)) > 1


def test_spos_grad_sum_zero_heuristic():
    """megvii-model/SinglePathOneShot: after backward SPOS sets grad=None where grad.sum()==0, a guess at which blocks
    were off. An *enabled* branch whose gradient happens to be zero (a dead ReLU) would lose its momentum and weight
    decay too. RandomGate knows which branches ran: only off branches get None."""
    dead = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with torch.no_grad(): dead[0].bias.fill_(-100.0)   # ReLU always 0: zero gradient although the branch runs
    g = RandomGate(dead, nn.Linear(3, 3), combine='sum', seed=0)
    opt = torch.optim.SGD(g.parameters(), lr=0.1, weight_decay=0.1)
    saw_dead_on = False
    for step in range(20):
        g.sample(step=step); g(torch.randn(4, 3)).sum().backward(); clear_off_grads(g)
        if g.last_choice == (0,):
            saw_dead_on = True
            assert dead[0].weight.grad is not None and dead[0].weight.grad.abs().sum() == 0
            w = dead[0].weight.detach().clone(); opt.step()
            assert torch.allclose(dead[0].weight, w * (1 - 0.1 * 0.1), rtol=1e-6, atol=0)   # weight decay applied
        else:
            assert dead[0].weight.grad is None
            opt.step()
        opt.zero_grad()
    assert saw_dead_on


def test_spos_bn_unstable_without_recalibration():
    """megvii-model/ShuffleNet-Series#9: SPOS results are "unstable" unless BatchNorm statistics are re-estimated per
    candidate. recalibrate_bn re-estimates them exactly for the fixed choice, so its eval output matches BatchNorm with
    the statistics computed by hand over the data."""
    torch.manual_seed(0)
    def bb(scale): return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net = nn.Sequential(RandomGate(bb(1), bb(2), combine='sum', seed=0))
    data = [torch.randn(32, 3) * 3 + 2 for _ in range(3)]
    for _ in range(5):
        for xb in data: net(xb)   # supernet training: statistics of a mixture of subnets
    recalibrate_bn(net, data, choices=[0])
    net.eval()
    lin, bn = net[0].branches[0]
    with torch.no_grad():
        h = [lin(xb) for xb in data]
        mean = torch.stack([t.mean(0) for t in h]).mean(0); var = torch.stack([t.var(0) for t in h]).mean(0)
        x = torch.randn(5, 3)
        expect = (lin(x) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        assert torch.allclose(net(x), expect, atol=1e-5)


def test_ofa_reseeds_global_random():
    """Once-for-all seeds Python's global `random` from the step index so workers agree, which resets every other user
    of `random`. RandomGate draws from its own generator: the global torch, Python and NumPy states do not move."""
    g = RandomGate(*[nn.Linear(2, 2) for _ in range(3)], k=2, combine='cat', per_sample=True, seed=0)
    torch.manual_seed(1); random.seed(1); np.random.seed(1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with torch.no_grad():
        for step in range(5): g.sample(step=step); g(torch.ones(4, 2))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_drop_path_computes_then_masks():
    """timm drop_path and torchvision StochasticDepth compute the block for every row and then multiply by a mask, which
    saves nothing. stochastic_depth runs the block only on kept rows (per sample) and not at all when the whole batch
    skips it."""
    class Rows(nn.Module):
        def __init__(self): super().__init__(); self.lin, self.rows = nn.Linear(4, 4), 0
        def forward(self, x):
            if not x.is_meta: self.rows += x.shape[0]
            return self.lin(x)
    blk = Rows()
    sd = stochastic_depth(blk, 0.5, per_sample=True, seed=0)
    with torch.no_grad(): sd(torch.randn(200, 4))
    assert blk.rows == int(sd.last_choice[:, 0].sum()) < 200
    blk2 = Rows()
    batch = stochastic_depth(blk2, 0.5, per_sample=False, seed=0)
    skipped = 0
    with torch.no_grad():
        for step in range(20):
            before = blk2.rows; x = torch.randn(8, 4); y = batch(x)
            if batch.last_choice == (1,): skipped += 1; assert blk2.rows == before and torch.equal(y, x)
    assert skipped > 0


def _ddp_world1(port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=0, world_size=1)


class _HandSwitch(nn.Module):
    "The hand-written supernet: run one branch, ignore the other."
    def __init__(self): super().__init__(); self.b = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)]); self.i = 0
    def forward(self, x): self.i += 1; return self.b[self.i % 2](x)


def test_ddp_find_unused_false_expected_to_have_finished_reduction():
    """pytorch/pytorch#18180, microsoft/nni#1962: a supernet under DDP with find_unused_parameters=False raises
    "Expected to have finished reduction in the prior iteration"; static_graph=True raises "graph has changed".
    With RandomGate(ddp=True) both settings train (one process, gloo, world size 1 is enough to reproduce it)."""
    _ddp_world1(_free_port())
    try:
        hand = nn.parallel.DistributedDataParallel(_HandSwitch())
        with pytest.raises(RuntimeError, match='Expected to have finished reduction'):
            for _ in range(3): hand(torch.randn(2, 3)).sum().backward()
        for static in (False, True):
            torch.manual_seed(0)
            net = nn.Sequential(RandomGate(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Tanh()), combine='sum',
                                           ddp=True, seed=0))
            ddp = nn.parallel.DistributedDataParallel(net, static_graph=static)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            seen = set()
            for step in range(8):
                net[0].sample(step=step); ddp(torch.randn(2, 3)).sum().backward()
                clear_off_grads(net); opt.step(); opt.zero_grad(); seen.add(net[0].last_choice)
            assert seen == {(0,), (1,)}
    finally:
        dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
        dist.destroy_process_group()


def _rank_grads(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(RandomGate(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), combine='sum', ddp=True))
    ddp = nn.parallel.DistributedDataParallel(net)
    x = torch.full((2, 3), float(rank + 1))
    net[0].sample(step=4); ddp(x).sum().backward(); clear_off_grads(net)
    (on,) = net[0].last_choice
    torch.save((on, net[0].branches[on].weight.grad.clone()), os.path.join(out, f'{rank}.pt'))
    dist.barrier()   # gloo aborts a rank that tears down while its peer still talks
    dist.destroy_process_group()
    os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it ('terminate called ...')


@pytest.mark.distributed
def test_ddp_rank_divergent_choices_divide_grad_by_world_size(tmp_path):
    """ANCHORS.md, DDP tested: with find_unused_parameters=True but ranks choosing different branches, each branch's
    gradient comes out divided by the world size. With step-seeded choices both ranks pick the same branch, and its
    gradient is the plain mean of the ranks' gradients: for x = 1 and x = 2 rows, d(sum W x)/dW = 2 * mean(1, 2)."""
    mp.spawn(_rank_grads, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    (on0, g0), (on1, g1) = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert on0 == on1
    assert torch.equal(g0, g1) and torch.allclose(g0, torch.full((3, 3), 2 * 1.5))


@pytest.mark.parametrize('opt_name', ['sgd_momentum_wd', 'adamw'])
def test_weight_decay_on_inactive_supernet_params(opt_name):
    """walkerning/aw_nas#5, megvii-model/DetNAS#3: weight decay (and momentum) on the parameters of inactive supernet
    branches over-regularizes them. A branch that is off gets grad None and is not moved by the optimizer at all."""
    torch.manual_seed(0)
    g = RandomGate(*[nn.Linear(4, 4) for _ in range(4)], combine='sum', seed=3)
    opt = (torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) if opt_name == 'sgd_momentum_wd'
           else torch.optim.AdamW(g.parameters(), lr=0.01, weight_decay=0.5))
    x = torch.randn(8, 4)
    for step in range(60):
        before = [b.weight.detach().clone() for b in g.branches]
        g.sample(step=step); g(x).pow(2).sum().backward(); clear_off_grads(g)
        opt.step(); opt.zero_grad(set_to_none=False)   # zeroed, not deleted: the harder case
        for i, b in enumerate(g.branches):
            assert torch.equal(b.weight, before[i]) == (i not in g.last_choice)
