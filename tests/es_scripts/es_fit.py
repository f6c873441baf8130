"""Fit a fastai Learner with EvolutionCallback on every rank of a gloo group; launch with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 es_fit.py OUT_DIR [--table]

Every rank builds its model, weights and BatchNorm statistics from its own seed (the callback's population broadcasts
rank 0's), the same data and the same `set_seed`, fits 2 epochs and saves OUT_DIR/rank{r}.pt: the model's state dict,
the generation and the recorded losses. Then each rank fits again on its own half of the data, as a sharded loader
would give it, and records the error every rank should raise. With --table, the members' noise comes from a
`NoiseTable` of TABLE_SIZE numbers.
"""
import argparse, os, sys
import torch, torch.distributed as dist
from torch import nn
from fastai.basics import Learner, DataLoaders, MSELossFlat, set_seed
import fastai.callback.all  # noqa: F401  (Learner.no_bar)

EPOCHS, POPSIZE, SIGMA, LR, TABLE_SIZE = 2, 6, 0.05, 0.05, 2**12

def dls(part=None, n=192, bs=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g); y = x[:, :1] * 2 - x[:, 1:2] + 0.5
    train = list(zip(x[:128], y[:128]))
    if part is not None: train = train[part::2]
    return DataLoaders.from_dsets(train, list(zip(x[128:], y[128:])), bs=bs)

def net(seed=0):
    "The model, its weights and BatchNorm statistics depending on `seed`."
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    m[1].running_mean.fill_(float(seed))
    return m

def fit(model_seed=0, part=None, table=False):
    "The run every rank makes; in one process it is the whole population."
    from weightdrop.evolution_callbacks import EvolutionCallback
    from weightdrop.evolution import NoiseTable
    set_seed(0); data = dls(part)                 # fastai's loaders draw their shuffling seed when built
    model = net(model_seed)
    cb = EvolutionCallback(POPSIZE, SIGMA, seed=3, table=NoiseTable(TABLE_SIZE, seed=5) if table else None)
    learn = Learner(data, model, loss_func=MSELossFlat(), cbs=cb)
    set_seed(1)                                   # the same dropout masks in the Learner's own forward on every rank
    with learn.no_bar(), learn.no_logging(): learn.fit(EPOCHS, LR)
    return dict(state={k: v.detach().clone() for k, v in learn.model.state_dict().items()}, generation=cb.generation,
                losses=[float(l) for l in learn.recorder.losses], members=cb.population.members_of(cb.population.rank))

if __name__ == '__main__':
    p = argparse.ArgumentParser(); p.add_argument('out'); p.add_argument('--table', action='store_true')
    args = p.parse_args()
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res = fit(model_seed=rank, table=args.table)
    try: fit(rank, part=rank, table=args.table); res['shard_error'] = None
    except RuntimeError as e: res['shard_error'] = str(e)
    torch.save(dict(res, world=world), os.path.join(args.out, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it ('terminate called ...')
