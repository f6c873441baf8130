"EvolutionCallback: a fastai Learner trained by an evolution strategy on its own batches, with its own optimizer."
import pytest, torch
from torch import nn
from fastai.basics import Learner, DataLoaders, MSELossFlat, set_seed
import fastai.callback.all  # noqa: F401  (Learner.no_bar, fit_one_cycle)
from weightdrop.evolution_callbacks import EvolutionCallback

def synth_dls(n=256, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g); y = x[:, :1] * 2 - x[:, 1:2] + 0.5
    return DataLoaders.from_dsets(list(zip(x[:192], y[:192])), list(zip(x[192:], y[192:])), bs=bs)

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

# ---- behaviour

def test_only_included_parameters_move():
    set_seed(0)
    model = net(); before = {k: v.clone() for k, v in model.state_dict().items()}
    learn = Learner(synth_dls(), model, loss_func=MSELossFlat(), cbs=EvolutionCallback(4, 0.05, include='4.*'), wd=0.)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    sd = model.state_dict()
    assert not torch.equal(sd['4.weight'], before['4.weight'])
    assert all(torch.equal(sd[k], before[k]) for k in ('0.weight', '0.bias', '1.weight', '1.bias'))

# ---- bad input

@pytest.mark.parametrize('kwargs, msg', [(dict(popsize=3), 'popsize must be even'), (dict(sigma=-1.), 'sigma must be'),
                                         (dict(seed=1.5), 'seed must be an int'), (dict(antithetic=None), 'antithetic must be')])
def test_bad_arguments(kwargs, msg):
    with pytest.raises((TypeError, ValueError), match=msg): EvolutionCallback(**kwargs)
