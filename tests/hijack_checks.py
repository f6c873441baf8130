"""Shared by the hijacker's test files: what a refused call must leave behind, and inputs that build wrappers."""
import pytest
import torch
from torch import nn
from hypothesis import settings, strategies as st, HealthCheck

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIX_WORDS = ('pass', 'available', 'leave', 'use ', 'wrap', 'call', 'list each', 'name at least', 'pick', 'unwrap')

def x_(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def first(out): return out[0] if isinstance(out, tuple) else out

def snapshot(m:nn.Module):
    "Everything a failed call must leave as it was."
    return dict(params=[(n, p, p.detach().clone()) for n, p in m.named_parameters()],
                state={k: v.clone() for k, v in m.state_dict().items()},
                attrs={id(s): sorted(vars(s)) for s in m.modules()},
                values={id(s): {k: v for k, v in vars(s).items() if isinstance(v, (bool, int, float, str, torch.Generator))}
                        for s in m.modules()},
                resting={id(s): {k: v for k, v in vars(s).items() if isinstance(v, torch.Tensor)} for s in m.modules()})

def assert_unchanged(m:nn.Module, snap):
    now = snapshot(m)
    assert [n for n, *_ in now['params']] == [n for n, *_ in snap['params']]
    for (_, p0, v0), (_, p1, _) in zip(snap['params'], now['params']):
        assert p1 is p0 and torch.equal(p1.detach(), v0)
    assert list(now['state']) == list(snap['state'])
    assert all(torch.equal(now['state'][k], v) for k, v in snap['state'].items())
    assert now['attrs'] == snap['attrs'] and now['values'] == snap['values']
    for k, d in snap['resting'].items():
        assert all(now['resting'][k][a] is t for a, t in d.items())

class Boom(Exception): pass

def raise_in_forward(module, exc):
    "Make `module`'s next forward raise `exc` after its inputs and (hijacked) weights are in place."
    def hook(mod, args):
        handle.remove()
        raise exc
    handle = module.register_forward_pre_hook(hook)

def check_error(fn, module, arg, types=(TypeError, ValueError)):
    "`fn()` raises one of `types`, naming `arg` and a fix, and leaves `module` exactly as it was."
    snap = snapshot(module)
    with pytest.raises(types) as ei: fn()
    msg = str(ei.value)
    assert arg in msg, msg
    assert any(w in msg for w in FIX_WORDS), msg
    assert_unchanged(module, snap)
    return msg

def lstm(): return nn.LSTM(3, 4, num_layers=2, bidirectional=True)
MAKERS = {'lstm': lstm, 'linear': lambda: nn.Linear(3, 4), 'gru_cell': lambda: nn.GRUCell(3, 4),
          'conv': lambda: nn.Conv1d(2, 3, 3)}

bad_probs = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float('nan')), st.just(float('inf')),
                      st.just(1), st.just(-1), st.text(max_size=3), st.none(), st.booleans(), st.just(torch.tensor(0.5)),
                      st.lists(st.floats(0, 0.9), min_size=1, max_size=2), st.just(0.5j))
def check_bad_argument(make, attr:str, good, v, module=None):
    "`make(module, attr=v)`, and setting `attr` to `v` later, both fail naming `attr` and change nothing."
    module = module or lstm
    m = module()
    check_error(lambda: make(m, **{attr: v}), m, attr)
    w = make(module(), **{attr: good})
    check_error(lambda: setattr(w, attr, v), w, attr)
    assert getattr(w, attr) == good

bad_choice = st.one_of(st.text(max_size=8), st.none(), st.integers(), st.just(['row']), st.just('ROW'))
