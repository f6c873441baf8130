"""Ask plain PyTorch whether this machine can do what a test needs, at the test's own sizes.

Some capabilities belong to the CPU or to the torch build, not to weightdrop: oneDNN on some CPUs has no bf16 LSTM
primitive under autocast ("could not create a primitive descriptor for the LSTM forward propagation primitive"), a build
may lack gloo. A test that needs one first runs the same thing on plain PyTorch modules. If plain PyTorch fails, the
test skips and says which capability is missing; if plain PyTorch works, the test runs, so a weightdrop fault still fails it."""
import copy
import pytest
import torch
from torch import nn

def _first(out): return out[0] if isinstance(out, tuple) else out

def _plain(m:nn.Module) -> nn.Module:
    "A plain module of `m`'s configuration: for an RNN, a fresh one with the same sizes; otherwise a copy."
    if isinstance(m, nn.RNNBase):
        return type(m)(m.input_size, m.hidden_size, m.num_layers, bias=m.bias, batch_first=m.batch_first,
                       bidirectional=m.bidirectional, **({'proj_size': m.proj_size} if isinstance(m, nn.LSTM) else {}))
    return copy.deepcopy(m)

def autocast_failure(plain:nn.Module, *inputs, dtype=torch.bfloat16) -> str|None:
    "Why plain PyTorch can't run a training step of `plain` on `inputs` under CPU autocast to `dtype` here; `None` if it can."
    plain = _plain(plain)
    try:
        with torch.autocast('cpu', dtype=dtype): out = _first(plain(*inputs))
        out.float().sum().backward()
    except RuntimeError as e:
        why = str(e).splitlines()[0].split('. ')[0][:160]
        return f"plain PyTorch can't run {plain!r} under CPU {dtype} autocast on this machine ({why})"
    return None

def require_autocast(plain:nn.Module, *inputs, dtype=torch.bfloat16):
    "Skip the test, naming the missing capability, unless plain PyTorch can do a training step of `plain` under autocast."
    why = autocast_failure(plain, *inputs, dtype=dtype)
    if why is not None: pytest.skip(why)

def require_autocast_rnns(model:nn.Module, batch:int, seq:int, dtype=torch.bfloat16):
    "`require_autocast` for every RNN inside `model`, each at its own sizes and layout, on a (batch, seq) input."
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            x = torch.randn((batch, seq, m.input_size) if m.batch_first else (seq, batch, m.input_size))
            require_autocast(m, x, dtype=dtype)

def dtype_failure(plain:nn.Module, x:torch.Tensor) -> str|None:
    "Why plain PyTorch can't run `plain` in `x`'s dtype on this machine; `None` if it can."
    plain = _plain(plain).to(x.dtype)
    try:
        with torch.no_grad(): _first(plain(x))
    except RuntimeError as e:
        return f"plain PyTorch can't run {plain!r} in {x.dtype} on this machine ({str(e).splitlines()[0].split('. ')[0][:160]})"
    return None

def require_dtype(plain:nn.Module, x:torch.Tensor):
    "Skip the test, naming the missing capability, unless plain PyTorch runs `plain` in `x`'s dtype."
    why = dtype_failure(plain, x)
    if why is not None: pytest.skip(why)

def _skip_unless_plain_can(what:str, plain:nn.Module, run):
    "Skip the test, naming the missing capability, unless `run(plain_copy)` works on plain PyTorch here."
    plain = _plain(plain)
    try: run(plain)
    except Exception as e:   # torch.compile and torch.export raise their own error types
        pytest.skip(f"plain PyTorch can't {what} {plain!r} on this machine ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

def require_compile(plain:nn.Module, *inputs, backend:str='aot_eager'):
    "Skip unless plain PyTorch can `torch.compile` `plain` with `backend` here and run a forward and backward."
    def run(m): _first(torch.compile(m, backend=backend)(*inputs)).float().sum().backward()
    _skip_unless_plain_can(f'torch.compile (backend {backend!r})', plain, run)

def require_export(plain:nn.Module, *inputs):
    "Skip unless plain PyTorch can `torch.export.export` `plain` on `inputs` here."
    _skip_unless_plain_can('torch.export', plain, lambda m: torch.export.export(m.eval(), inputs))

def gloo_failure() -> str|None:
    "Why this torch build can't run the gloo tests (`@pytest.mark.distributed`, skipped by conftest); `None` if it can."
    import torch.distributed as dist
    if not dist.is_available(): return "this torch build has no torch.distributed"
    if not dist.is_gloo_available(): return "this torch build has no gloo backend for torch.distributed"
    return None
