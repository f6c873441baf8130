"""`WeightNoise` (`weightdrop.noise`): the checks at its boundary. Its moments and gradients are shown in
nbs/03_noise.ipynb; it runs through the core's module, copy, checkpoint and fault tests in tests/test_core.py."""
import torch
from torch import nn
from hypothesis import given, strategies as st
from weightdrop.noise import WeightNoise
from hijack_checks import SETTINGS, MAKERS, bad_choice, check_bad_argument

# ---- bad input

bad_stds = st.one_of(st.floats(max_value=-1e-9), st.just(float('nan')), st.just(float('inf')), st.just(-1),
                     st.text(max_size=3), st.none(), st.booleans(), st.just(torch.tensor(0.1)))

@SETTINGS
@given(std=bad_stds, which=st.sampled_from(sorted(MAKERS)))
def test_bad_std(std, which):
    check_bad_argument(WeightNoise, 'std', 0.1, std, MAKERS[which])

@SETTINGS
@given(v=bad_choice)
def test_bad_mode(v):
    if v in ('additive', 'multiplicative'): v = v + 's'
    check_bad_argument(lambda m, **kw: WeightNoise(m, 0.1, **kw), 'mode', 'multiplicative', v)

def test_changing_mode_forgets_held_noise():
    "A held additive draw means nothing multiplicatively: changing `mode` draws anew at the next call."
    wn = WeightNoise(nn.Linear(8, 8), 0.5, hold_mask=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wn(torch.zeros(1, 8)); assert set(wn._held) == {'weight'}
        wn.mode = 'multiplicative'; assert wn._held == {}
        wn(torch.zeros(1, 8))
    held = wn._held['weight']
    assert abs(held.mean().item() - 1) < 6 * 0.5 / 8 and torch.equal(wn.module.weight, wn.weight_raw.detach() * held)
