"""Every user-reported defect of the anchors (../shared/ANCHORS.md), pinned: one named regression test each, with
the issue or thread in its docstring. Sections: weight dropout, mutation and no-grad updates."""
import copy, io, math, pickle, socket, warnings
import pytest
import torch
from torch import nn
from weightdrop.awdlstm import AWD_LSTM
import os, random
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import parameters_to_vector
from torch.utils._python_dispatch import TorchDispatchMode
from weightdrop.mutate import mutate_, update_weights_

def _x(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

# ---- weight dropout ----
# fastai (fastai/text/models/awdlstm.py, fastai/callback/rnn.py). The wrapper's own defects are pinned in
# tests/test_core.py and tests/test_dropout.py; these need AWD_LSTM or fastai's callbacks.

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


# ---- mutation and no-grad updates ----

def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

def test_evotorch_flat_vectors_not_modules_in_place():
    """EvoTorch GaussianMutation works on flat decision vectors, not on modules in place: weightdrop mutates the
    module's own Parameters (same objects, the optimizer and its state still track them), with no flat copy."""
    m = mlp(); opt = torch.optim.Adam(m.parameters()); m(torch.randn(2, 3)).sum().backward(); opt.step()
    ids, w0 = [id(p) for p in m.parameters()], m[0].weight.clone()
    mutate_(m, 1., 0.1)
    assert [id(p) for p in m.parameters()] == ids
    assert all(p is q for p, q in zip(opt.param_groups[0]['params'], m.parameters()))
    assert all(p in opt.state for p in m.parameters())
    assert (m[0].weight != w0).all()

def test_evotorch_own_seeded_generator_on_device():
    """EvoTorch uses its own seeded torch.Generator on the problem's device: so does mutate_ (repeatable, and PyTorch's
    global RNG is left alone); a generator on another device than a parameter is refused clearly."""
    a, b = bn_net(), bn_net()
    torch.manual_seed(5); rng = torch.get_rng_state()
    for m in (a, b): mutate_(m, 0.3, 0.1, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match='generator is on cpu but parameter'):
        mutate_([torch.zeros(3, device='meta')], 1., 1., generator=torch.Generator())

def test_pygad_torchga_state_dict_genes_mutate_batchnorm_stats():
    """PyGAD torchga takes genes from state_dict(), so BatchNorm running statistics get mutated too: weightdrop
    mutates parameters only, never buffers."""
    net = bn_net(); net.train(); net(torch.randn(16, 4))           # non-trivial running stats
    bufs = {k: v.clone() for k, v in net.named_buffers()}
    mutate_(net, 1., 0.5)
    assert all(torch.equal(v, bufs[k]) for k, v in net.named_buffers())

def test_pygad_numpy_cpu_python_loops_global_rng():
    """PyGAD works through numpy on the CPU with Python loops per gene and the global RNG: weightdrop draws with
    torch on the parameter's device and dtype, in a number of random draws proportional to p*N (no per-gene loop),
    from the given generator."""
    class Draws(TorchDispatchMode):
        def __init__(self): super().__init__(); self.ops = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(s in func.__name__ for s in ('rand', 'normal', 'uniform', 'bernoulli', 'geometric')):
                self.ops.append((func.__name__, out.numel(), out.device, out.dtype))
            return out
    w = torch.zeros(100_000, dtype=torch.float64)
    with Draws() as d: mutate_([w], 0.01, 1., generator=torch.Generator().manual_seed(0))
    assert len(d.ops) <= 4                                      # a few vectorised draws, not one per gene
    assert sum(n for _, n, *_ in d.ops) < 3 * 0.01 * 100_000 + 100
    assert all(dev == w.device for *_, dev, _ in d.ops)
    assert any(dt == torch.float64 for *_, dt in d.ops)         # the noise in the parameter's dtype

def test_neat_per_gene_python_floats():
    """neat-python mutates per-gene Python floats: weightdrop mutates whole tensors, and the result is distributed as
    the per-element rule (each element w.p. p, N(0, strength^2) noise)."""
    n, p, s = 200_000, 0.05, 0.3
    w = torch.zeros(n)
    mutate_([w], p, s, generator=torch.Generator().manual_seed(1))
    d = w[w != 0].double(); k = d.numel()
    assert abs(k / n - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert abs(d.mean()) < 6 * s / math.sqrt(k) and abs(d.std() - s) < 6 * s * math.sqrt(2 / k)

def test_es_parameters_to_vector_copy_loses_update():
    """estorch, pytorch-es and Uber deep-neuroevolution go through parameters_to_vector, a copy on the CPU: changing
    it changes nothing. update_weights_ and mutate_ change the model itself."""
    m = mlp(); before = [p.clone() for p in m.parameters()]
    v = parameters_to_vector(m.parameters()); v.add_(1.)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))      # the common answer's update is lost
    update_weights_(m, {'*': lambda w: w + 1})
    assert all(torch.equal(p, q + 1) for p, q in zip(m.parameters(), before))

def test_pytorch_inplace_saved_weight_cryptic_error():
    """PyTorch: a no_grad in-place change to a weight autograd saved (Linear.weight) between forward and backward
    makes backward() raise 'modified by an inplace operation', far from the cause. weightdrop raises at the change,
    naming the parameter and the fix, and leaves everything unchanged."""
    m = mlp(); loss = m(torch.randn(4, 3)).sum(); w0 = m[2].weight.clone()
    with pytest.raises(RuntimeError, match=r"\['2.weight'\] are saved for backward.*after loss.backward\(\) and before "
                                           r"the next forward"):
        mutate_(m, 1., 0.1)
    assert torch.equal(m[2].weight, w0)
    loss.backward()

def test_pytorch_bias_only_change_does_not_raise():
    """PyTorch: changing only a bias between forward and backward does not raise (Linear does not save it), and the
    gradient stays correct. weightdrop must not refuse it (no false positive)."""
    m = mlp(); x = torch.randn(4, 3)
    loss = m(x).sum()
    mutate_(m, 1., 0.1, include='*.bias')
    loss.backward()
    ref = mlp(); ref(x).sum().backward()   # the gradient of the forward that ran, with the old biases
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()))

def test_pytorch_data_add_silently_corrupts_gradient():
    """PyTorch: .data.add_() never raises and silently computes the gradient with the new weight. weightdrop refuses
    the change, so the gradient is exactly the one of the forward that ran."""
    x = torch.randn(4, 3)
    ref = mlp(); ref(x).sum().backward()
    bad = mlp(); loss = bad(x).sum()
    bad[2].weight.data.add_(1.)                      # the anchor: no error...
    loss.backward()
    assert not torch.equal(bad[0].weight.grad, ref[0].weight.grad)   # ...and a wrong gradient
    ours = mlp(); loss = ours(x).sum()
    with pytest.raises(RuntimeError, match='saved for backward'): mutate_(ours, 1., 1.)
    loss.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), ref.parameters()))

def test_pytorch_rebinding_parameter_loses_optimizer():
    """PyTorch's advice: never rebind the Parameter (the optimizer would lose it). update_weights_ writes into the
    same Parameter, so an optimizer step after it still moves the model's weight."""
    m = mlp(); opt = torch.optim.SGD(m.parameters(), lr=1.)
    update_weights_(m, {'0.weight': lambda w: torch.zeros_like(w)})
    assert opt.param_groups[0]['params'][0] is m[0].weight and m[0].weight.requires_grad and m[0].weight.is_leaf
    m(torch.randn(4, 3)).sum().backward(); opt.step()
    assert not torch.equal(m[0].weight, torch.zeros_like(m[0].weight))
