"""Train the tiny WeightDropout AWD-LSTM LM under DDP from a plain PyTorch loop; launch with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 lm_plain.py OUT_DIR [--steps N] [--shared-masks]

Every rank saves OUT_DIR/rank{r}.pt: its final state dict, its mask patterns per step and its eval outputs.
Rank 0 also saves OUT_DIR/checkpoint.pt (the model's state dict) and OUT_DIR/init.pt (the weights before training).
"""
import argparse, os, sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_common import *

p = argparse.ArgumentParser()
p.add_argument('out'); p.add_argument('--steps', type=int, default=6); p.add_argument('--shared-masks', action='store_true')
args = p.parse_args()

dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
model = make_model(seed=rank)            # different init per rank: DDP must broadcast rank 0's
ddp = DDP(model)                         # find_unused_parameters=False, the default
if rank == 0: torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, 'init.pt'))
torch.manual_seed(100 + rank)            # each rank's own RNG stream for the masks, as in data-parallel dropout
hijacked = [m for m in model.modules() if hasattr(m, 'resample')]
if args.shared_masks:
    # Rank-shared masks: every wrapper gets a generator seeded from (seed, step, wrapper) alone, identical on all ranks
    for m in hijacked: m.hold_mask, m.generator = True, torch.Generator()
opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
stream, patterns = token_stream(), []
ddp.train()
for step in range(args.steps):
    if args.shared_masks:
        for i, m in enumerate(hijacked):
            m.generator.manual_seed(MASK_SEED * 1_000_003 + step * 101 + i)
            m.resample()
    x, y = batch(stream, step, rank, world)
    out = ddp(x)[0]
    patterns.append(mask_pattern(model))
    loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    assert all(p.grad is not None for p in model.parameters()), 'a parameter got no gradient'

res = dict(state={k: v.detach().clone() for k, v in model.state_dict().items()}, patterns=patterns,
           eval=eval_outputs(model), loss=loss.item(), steps=args.steps)
torch.save(res, os.path.join(args.out, f'rank{rank}.pt'))
if rank == 0: torch.save(model.state_dict(), os.path.join(args.out, 'checkpoint.pt'))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it ('terminate called ...')
