"""Evolve a cart-pole policy with EvolutionStrategy, on one process or many; the ranks exchange only fitness values.

    python examples/es_cartpole.py                                   # one process
    torchrun --nproc_per_node=2 examples/es_cartpole.py              # 2 processes, gloo on CPUs
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/es_cartpole.py
"""
import argparse, os, sys, time
import torch, torch.distributed as dist
from torch import nn
from weightdrop.evolution import EvolutionStrategy, NoiseTable

def cartpole_steps(policy, x0, max_steps=200):
    "How many steps `policy` balances the pole in each episode started from the rows of `x0`, all episodes at once."
    g, m_cart, m_pole, half_len, f_max, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    x, v, th, om = x0.unbind(1)
    alive, steps = torch.ones(len(x0)), torch.zeros(len(x0))
    for _ in range(max_steps):
        push = f_max * torch.sign(policy(torch.stack([x, v, th, om], 1)).squeeze(1))
        c, s = th.cos(), th.sin()
        tmp = (push + m_pole * half_len * om ** 2 * s) / (m_cart + m_pole)
        acc_th = (g * s - c * tmp) / (half_len * (4 / 3 - m_pole * c ** 2 / (m_cart + m_pole)))
        acc_x = tmp - m_pole * half_len * acc_th * c / (m_cart + m_pole)
        x, v, th, om = x + tau * v, v + tau * acc_x, th + tau * om, om + tau * acc_th
        alive = alive * ((x.abs() < 2.4) & (th.abs() < 0.2095)).float()
        steps += alive
    return steps

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--generations', type=int, default=20); p.add_argument('--popsize', type=int, default=16)
    p.add_argument('--episodes', type=int, default=64); p.add_argument('--seed', type=int, default=0)
    p.add_argument('--table', type=int, default=0, help="slice the noise from a NoiseTable of this many numbers; 0: draw it")
    args = p.parse_args()
    if 'RANK' in os.environ: dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x0 = (torch.rand(args.episodes, 4, generator=torch.Generator().manual_seed(args.seed)) - 0.5) * 0.1
    table = NoiseTable(args.table, seed=args.seed) if args.table else None
    es = EvolutionStrategy(policy, args.popsize, sigma=0.1, lr=0.05, seed=args.seed, table=table)
    t0 = time.perf_counter()
    for _ in range(args.generations):
        st = es.step(lambda m: cartpole_steps(m, x0).mean().item())
        if rank == 0: print(f"generation {st['generation']:3d}: mean {st['mean']:6.1f}  max {st['max']:5.1f}  {st['time']:.2f} s")
    if rank == 0: print(f"{args.generations * args.popsize / (time.perf_counter() - t0):.1f} members/s")
    if dist.is_initialized():
        dist.barrier(); dist.destroy_process_group()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)   # skip C++ teardown at exit: gloo threads sometimes abort it

if __name__ == '__main__': main()
