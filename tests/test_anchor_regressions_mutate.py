"""Regression tests for the defects listed in /work/shared/ANCHORS.md, section "Mutation and no-grad updates
(neuroevolution)". One test per defect, named after it, with the anchor in its docstring. Self-contained."""
import copy, math
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils._python_dispatch import TorchDispatchMode
from weightdrop.mutate import mutate_, update_weights_

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
