"""Train the tiny WeightDropout AWD-LSTM LM under DDP from fastai (`Learner.distrib_ctx`, accelerate on the CPU); launch with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 lm_fastai.py OUT_DIR [--masks none|global|rank|shared]

`--masks none`: no callback, a fresh mask per call from each rank's global RNG; `global`: `ResampleCallback()` (one mask
per batch from the global RNG); `rank`: `ResampleCallback(seed=0)`; `shared`: `ResampleCallback(seed=0, shared_masks=True)`.
Every rank saves OUT_DIR/rank{r}.pt (final state dict, mask patterns per training batch, eval outputs); rank 0 saves
the fastai checkpoint OUT_DIR/checkpoint.pth with `Learner.save`.
"""
import argparse, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.basics import *
from fastai.text.data import LMDataLoader
from fastai.callback.rnn import ModelResetter, RNNCallback
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_common import *
from weightdrop.callbacks import ResampleCallback

p = argparse.ArgumentParser()
p.add_argument('out'); p.add_argument('--masks', default='rank', choices=['none', 'global', 'rank', 'shared'])
args = p.parse_args()
torch.set_num_threads(1)

def _broadcast_cpu(self, t, rank):
    "fastai's `DistributedDL._broadcast` moves the index list to CUDA for nccl; with gloo on the CPU it must stay put."
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
DistributedDL._broadcast = _broadcast_cpu

class RecordMasks(Callback):
    "Keep each training batch's mask pattern, and check how the model was wrapped."
    order = 50
    def before_fit(self): self.patterns, self.wrappers = [], []
    def after_pred(self):
        if not self.training: return
        self.wrappers.append((type(self.learn.model).__name__, getattr(self.learn.model, 'find_unused_parameters', None)))
        self.patterns.append(mask_pattern(self.learn.model.module if isinstance(self.learn.model, DDP) else self.learn.model))

# Whole, equal-length batches only: fastai's `DistributedDL` pads the item list by repeating items, which would put a
# short LM sequence into a batch. 10 training batches (5 per rank), 2 validation batches (1 per rank).
stream, per = token_stream(), BS * SEQ
train, valid = stream[:10 * per + 1], stream[10 * per + 1:12 * per + 2]
dls = DataLoaders(LMDataLoader([train], bs=BS, seq_len=SEQ, shuffle=True),
                  LMDataLoader([valid], bs=BS, seq_len=SEQ), device='cpu')
model = make_model(seed=0)
cbs = [ModelResetter(), RNNCallback(), RecordMasks()]
if args.masks == 'global': cbs.append(ResampleCallback())
elif args.masks != 'none': cbs.append(ResampleCallback(seed=0, shared_masks=args.masks == 'shared'))
learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.), lr=1.0, cbs=cbs,
                path=Path(args.out), model_dir='.')
learn.remove_cb(ProgressCallback)
with learn.distrib_ctx(cpu=True):
    rank, world = rank_distrib(), num_distrib()
    torch.manual_seed(100 + rank)     # each rank's own global RNG stream (RNNDropout, and masks with --masks none)
    learn.fit(1)
rec = learn.record_masks
res = dict(state={k: v.detach().clone() for k, v in learn.model.state_dict().items()}, patterns=rec.patterns,
           wrappers=rec.wrappers, eval=eval_outputs(learn.model), world=world, n_batches=len(rec.patterns),
           hold_mask=[m.hold_mask for m in weight_droppers(learn.model)], model_type=type(learn.model).__name__)
torch.save(res, os.path.join(args.out, f'rank{rank}.pt'))
learn.save('checkpoint', with_opt=False)   # fastai saves from rank 0 only
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it ('terminate called ...')
