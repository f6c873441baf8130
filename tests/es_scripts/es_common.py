"The task the distributed evolution tests share: a small MLP regression whose fitness is deterministic."
import torch
from torch import nn

POPSIZE, SIGMA, LR, SEED, GENERATIONS = 6, 0.05, 0.01, 11, 5
TABLE_SIZE, TABLE_SEED = 2**16, 3     # a NoiseTable larger than the width-200 model's largest parameter

def make_model(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return x, (x[:, :1] * x[:, 1:2]).sin()

def neg_mse(model):
    x, y = data()
    return -(model(x) - y).pow(2).mean().item()

def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}
