"""Evolution strategies: seed-defined perturbations restored bit for bit, drawn or sliced from a shared noise table,
OpenAI-ES steps, and populations split over ranks (simulated in one process, and 2 gloo processes started with
torchrun) that exchange only fitness values."""
import copy, math, re, sys
from pathlib import Path
import pytest, torch
from torch import nn
from weightdrop.evolution import *
from weightdrop.evolution import _block, _score, _read_blocks
from weightdrop.validate import mix_seed

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / 'es_scripts'
sys.path.insert(0, str(SCRIPTS))
import es_common  # noqa: E402
from launch import torchrun
from capabilities import require_dtype

def params(m): return [p.detach().clone() for p in m.parameters()]
def same(a, b): return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

# ---- behaviour

def test_noise_depends_only_on_seed_and_name():
    "Same noise for a name whatever the parameter order, dtype or container; the stream is N(0, 1) float32 on the CPU."
    a, b = torch.zeros(50, 40), torch.zeros(50, 40)
    p1 = {'enc.weight': a.clone(), 'dec.weight': b.clone()}
    p2 = {'dec.weight': b.clone().double(), 'enc.weight': a.clone()}
    perturb_(p1, 5, 1.0); perturb_(p2, 5, 1.0)
    assert torch.equal(p1['enc.weight'], p2['enc.weight'])
    assert torch.equal(p1['dec.weight'], p2['dec.weight'].float())
    ref = torch.randn(50, 40, generator=torch.Generator().manual_seed(mix_seed(5, 'enc.weight')))
    assert torch.equal(p1['enc.weight'], ref)
    e = param_noise(torch.empty(200_000), 1, 'w'); n = e.numel()
    assert abs(e.mean()) < 6 / math.sqrt(n) and abs(e.var() - 1) < 6 * math.sqrt(2 / n)

@pytest.mark.gpu
def test_noise_is_the_same_on_cuda():
    "The stream is drawn on the CPU, so a CUDA parameter gets the CPU parameter's noise exactly."
    w = torch.zeros(64, 64)
    assert torch.equal(param_noise(w.cuda(), 3, 'w').cpu(), param_noise(w, 3, 'w'))

def test_perturbed_restores_bit_for_bit_every_dtype_and_on_error():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        net = mlp().to(dtype); before = params(net)
        with perturbed(net, 1, 0.3):
            assert not any(torch.equal(p, b) for p, b in zip(net.parameters(), before))
        assert same(params(net), before), dtype
        with pytest.raises(KeyboardInterrupt):
            with perturbed(net, 2, 0.3): raise KeyboardInterrupt
        assert same(params(net), before), dtype

def test_many_members_from_one_backup_leave_the_weights_exact():
    "A population's worth of members perturbed and restored from one Backup: the weights end exactly as they began."
    net = mlp(); before = params(net)
    bk = None
    for s in range(50):
        bk = perturb_(net, s, 0.1, mirror=bool(s % 2), backup=bk); bk.restore_()
    assert same(params(net), before)
    assert bk.nbytes == sum(p.nbytes for p in net.parameters())   # one copy, whatever the number of members

def test_tied_weights_perturbed_once():
    m = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)); m[1].weight = m[0].weight
    w = m[0].weight.detach().clone()
    with perturbed(m, 4, 0.5):
        assert torch.allclose(m[1].weight - w, 0.5 * param_noise(w, 4, '0.weight'), atol=1e-6)

def test_include_exclude_choose_what_moves():
    net = mlp(); before = dict((n, p.detach().clone()) for n, p in net.named_parameters())
    with perturbed(net, 0, 0.1, include='*.weight', exclude='4.*'):
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {'0.weight', '2.weight'}

TABLE = NoiseTable(2**16, seed=7)

def table_slice(seed, name, p):
    "A parameter's noise from TABLE by the definition: the slice at mix_seed(seed, 'offset', name) mod (size - numel + 1)."
    o = mix_seed(seed, 'offset', name) % (TABLE.size - p.numel() + 1)
    return TABLE.noise[o:o + p.numel()].view(p.shape)

def staggered(seed, name, p, index, count, table=TABLE):
    "Noise `index` of the `count` that share `seed`, by the definition: one run of slices step = min(numel, 2^15) "
    "apart from mix_seed(seed, 'offset', name) mod (size - numel - (count - 1) * step + 1) (the run fits in the table)."
    N = p.numel(); step = min(N, 2**15); span = N + (count - 1) * step
    assert span <= table.size
    o = mix_seed(seed, 'offset', name) % (table.size - span + 1) + index * step
    return table.noise[o:o + N].view(p.shape)

def drawn(seed, name, p): return torch.randn(p.shape, generator=torch.Generator().manual_seed(mix_seed(seed, name)))

def pair_drawn(seed, k, name, p): return drawn(mix_seed(seed, 0, k), name, p)
def pair_in_table(seed, k, name, p): return staggered(mix_seed(seed, 0), name, p, k, 4)

@pytest.mark.parametrize('table, noise_of', [(None, pair_drawn), (TABLE, pair_in_table)], ids=['drawn', 'table'])
def test_es_step_matches_the_openai_es_formula(table, noise_of):
    "One SGD(lr) step moves θ by lr/(nσ) Σ w_i ε_i with centered ranks, ε made here independently of the strategy: "
    "pair k's drawn from mix_seed(mix_seed(seed, 0, k), name), or with TABLE the k-th of the generation's 4 slices "
    "staggered from mix_seed(seed, 0)."
    net, ref = mlp(), mlp()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    def fit(m): return -m(x).pow(2).mean().item()
    n, sigma, lr, seed = 8, 0.1, 0.5, 3
    es = EvolutionStrategy(net, n, sigma, lr, seed=seed, optimizer=torch.optim.SGD, table=table)
    es.step(fit)
    noise = []
    for i in range(n):   # expected: members 2k, 2k+1 are θ ± σ ε_k
        noise.append({k: noise_of(seed, i // 2, k, p) * (-1) ** i for k, p in ref.named_parameters()})
    fits = []
    for e in noise:
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for k, p in m.named_parameters(): p += sigma * e[k]
        fits.append(fit(m))
    order = sorted(range(n), key=lambda i: fits[i])
    w = [0.] * n
    for r, i in enumerate(order): w[i] = r / (n - 1) - 0.5
    for k, p in ref.named_parameters():
        step = sum(w[i] * noise[i][k] for i in range(n)) / (n * sigma)
        assert torch.allclose(dict(net.named_parameters())[k], p + lr * step, atol=1e-6), k

def test_es_improves_and_reports_stats():
    torch.manual_seed(0)
    x = torch.randn(128, 3); y = x @ torch.tensor([[2.], [-1.], [0.5]])
    m = nn.Linear(3, 1)
    es = EvolutionStrategy(m, 16, 0.05, 0.05, shaping='zscore')
    hist = [es.step(lambda m: -(m(x) - y).pow(2).mean().item()) for _ in range(100)]
    assert hist[-1]['mean'] > 0.05 * hist[0]['mean']
    assert all(h['min'] <= h['mean'] <= h['max'] and h['time'] > 0 for h in hist)
    assert [h['generation'] for h in hist] == list(range(100)) and es.generation == 100

def test_adam_by_default_on_the_evolved_parameters_and_bf16_weights_stay_bf16():
    "The estimate goes to Adam through .grad; a bf16 model is perturbed, stepped and kept in bf16, and it moves."
    m = mlp().to(torch.bfloat16); before = params(m)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    require_dtype(m, x)
    es = EvolutionStrategy(m, 4, 0.05, 0.01, include='*.weight')
    assert type(es.opt) is torch.optim.Adam and es.opt.param_groups[0]['lr'] == 0.01
    assert es.opt.param_groups[0]['params'] == [m[0].weight, m[2].weight, m[4].weight]
    es.step(lambda m: -m(x).float().pow(2).mean().item())
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    after = dict(m.named_parameters()); names = [n for n, _ in m.named_parameters()]
    moved = {n for n, b in zip(names, before) if not torch.equal(after[n], b)}
    assert moved == {'0.weight', '2.weight', '4.weight'}

def test_checkpoint_resume_is_exact():
    "Train 3 generations, save model + strategy, resume in fresh objects for 3 more: bit-identical to 6 straight."
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    fit = lambda m: -m(x).pow(2).mean().item()
    a = mlp(); es = EvolutionStrategy(a, 6, 0.05, 0.01, seed=9)
    for _ in range(6): es.step(fit)
    b = mlp(); es = EvolutionStrategy(b, 6, 0.05, 0.01, seed=9)
    for _ in range(3): es.step(fit)
    ck = copy.deepcopy(dict(model=b.state_dict(), es=es.state_dict()))
    c = mlp(seed=1); c.load_state_dict(ck['model'])
    es = EvolutionStrategy(c, 6, 0.05, 0.01, seed=0); es.load_state_dict(ck['es'])
    for _ in range(3): es.step(fit)
    assert same(params(c), params(a)) and es.generation == 6

def test_failed_member_leaves_weights_and_generation():
    net = mlp(); before = params(net)
    es = EvolutionStrategy(net, 4, 0.1, 0.1)
    n = [0]
    def fit(m):
        n[0] += 1
        if n[0] == 3: raise ValueError('simulator crashed')
        return 0.
    with pytest.raises(RuntimeError, match=r"fitness_fn raised for member 2 of generation 0 on rank 0: ValueError\('simulator crashed'\)"):
        es.step(fit)
    assert same(params(net), before) and es.generation == 0
    es.step(lambda m: 0.)
    assert es.generation == 1

def test_table_slices_are_views_and_perturb_like_drawn_noise():
    "A member's noise is a view of the table (no copy, no generator); perturbing adds it (bf16: in float32, rounded "
    "once), mirroring subtracts it, and the weights come back exact."
    net = mlp(); before = params(net)
    for n, p in net.named_parameters():
        e = TABLE.slice(p, 4, n)
        assert torch.equal(e, table_slice(4, n, p)) and e.data_ptr() == TABLE.noise.data_ptr() + 4 * TABLE.offset(4, n, p.numel())
    with perturbed(net, 4, 0.1, mirror=True, table=TABLE):
        for (n, p), b in zip(net.named_parameters(), before):
            assert torch.equal(p, b.add(table_slice(4, n, p), alpha=-0.1))
    assert same(params(net), before)
    lin = nn.Linear(64, 64, bias=False).to(torch.bfloat16); w = lin.weight.detach().clone()
    with perturbed(lin, 2, 0.01, table=TABLE):
        assert torch.equal(lin.weight, w.float().add(table_slice(2, 'weight', w), alpha=0.01).to(torch.bfloat16))
    assert torch.equal(lin.weight, w)

def test_table_is_its_seed_and_size_in_pickles_and_checkpoints():
    "A checkpoint and a pickle carry the table's size and seed, never its numbers; resuming rebuilds the same table."
    import io, pickle
    es = EvolutionStrategy(mlp(), 4, 0.1, 0.1, table=TABLE)
    es.step(lambda m: m[0].weight.sum().item())
    buf = io.BytesIO(); torch.save(es.state_dict(), buf)
    assert es.state_dict()['population']['table'] == dict(size=2**16, seed=7)
    assert buf.tell() < 4 * TABLE.size / 4                               # the Adam state of 434 weights, not 2^16 numbers
    assert len(pickle.dumps(TABLE)) < 200 and torch.equal(pickle.loads(pickle.dumps(TABLE)).noise, TABLE.noise)
    assert copy.deepcopy(TABLE) is TABLE

def test_a_generation_is_staggered_and_runs_split_what_does_not_fit():
    "With a table, pair k of a generation's P is noise k of P, step = min(numel, 2^15) apart from mix_seed(seed, "
    "generation); where the P slices of a parameter don't fit, they go in runs of (size - numel) // step + 1, each at "
    "its own offset. The estimate equals Σ c_k ε_k / (nσ) summed here in float64 from that definition, whether its "
    "products take one block of rows, a band of several, or a shorter last block."
    table = NoiseTable(2**18, seed=3)        # 70,000 weights: 24 pairs go in runs of 6; 256 weights: 24 side by side
    net = {'big': torch.zeros(70_000), 'long': torch.zeros(5 * 2**15 + 7), 'w': torch.zeros(16, 16), 'b': torch.zeros(16)}
    n, sigma, P = 48, 0.1, 24
    pop = Population(net, n, sigma, seed=9, table=table, shaping='none')
    fit = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base, runs_seen = mix_seed(9, 0), {}
    for (name, p), g in zip(net.items(), pop.grad_estimate(fit)):
        N = p.numel(); step = min(N, 2**15); per = min(P, (table.size - N) // step + 1)
        expect = torch.zeros(N, dtype=torch.float64); starts = []
        for k in range(P):
            run, place = divmod(k, per); count = min(per, P - run * per)
            key = mix_seed(base, 'offset', name) if run == 0 else mix_seed(base, 'offset', name, run)
            o = key % (table.size - N - (count - 1) * step + 1) + place * step; starts.append((run, o))
            expect += (fit[2 * k] - fit[2 * k + 1]) * table.noise[o:o + N].double()
            assert pop.noise_of(2 * k + 1) == MemberNoise(base, True, k, P)
        assert torch.allclose(g.double().flatten(), expect / (n * sigma), rtol=1e-5, atol=1e-5), name
        runs_seen[name] = len({r for r, _ in starts})
    assert runs_seen == {'big': 4, 'long': 8, 'w': 1, 'b': 1}      # 'long': runs of 3, each 5 whole blocks and a short one

def test_staggered_noise_gives_an_unbiased_estimate_with_the_variance_of_independent_noise():
    "A parameter larger than the stride gets overlapping noises, each shifted 2^15 from the last. For a linear fitness "
    "w·θ and antithetic pairs, independent noise gives an estimate g with E[g] = w and E|g - w|^2 = (n + 1)|w|^2 / P. "
    "Over G generations, the mean squared error and the mean estimate's component along w, (mean g)·w / |w|^2 = 1, "
    "match that within 6 standard errors: both follow a chi-square with P·G degrees of freedom, over P·G."
    N, pairs, G, sigma = 3 * 2**15 + 5, 8, 200, 0.5
    w = torch.randn(N, generator=torch.Generator().manual_seed(4))
    pop = Population({'v': torch.zeros(N)}, 2 * pairs, sigma, seed=1, table=NoiseTable(2**19, seed=5), shaping='none')
    def linear(m): return torch.dot(w.double(), m['v'].double()).item()
    total, sq = torch.zeros(N, dtype=torch.float64), []
    for g in range(G):
        pop.generation = g
        est = pop.grad_estimate(pop.evaluate(linear))[0].double()
        total += est; sq.append((est - w).pow(2).sum().item())
    expected, tol = (N + 1) * w.pow(2).sum().item() / pairs, 6 * math.sqrt(2 / (pairs * G))
    mse, along = sum(sq) / G / expected, torch.dot(total / G, w.double()).item() / w.pow(2).sum().item()
    assert abs(mse - 1) < tol and abs(along - 1) < tol, (mse, along, tol)

def test_the_table_path_makes_everything_on_the_parameters_device():
    "On the meta device nothing is computed and an op that mixes in a CPU tensor fails, so a member shown from the table, "
    "the estimate's bands and short blocks, and the gradients it hands over all stay on the parameters' device, as on CUDA."
    try: torch.mm(torch.zeros(3, 2, device='meta'), torch.zeros(2, 2, device='meta'))
    except Exception as e: pytest.skip(f'this PyTorch cannot multiply on the meta device: {e}')
    net = {'w': torch.zeros(5 * 2**15 + 7, device='meta'), 'b': torch.zeros(16, device='meta')}
    pop = Population(net, 24, 0.1, table=NoiseTable(2**18, seed=1))    # 12 pairs: bands of 8, a short block, runs
    fit = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert [g.device.type for g in pop.grad_estimate(fit)] == ['meta', 'meta']
    pop.set_grad_(fit)
    assert net['w'].grad.device.type == 'meta' and net['b'].grad.device.type == 'meta'
    with pop.perturbed(3): assert net['w'].device.type == 'meta'

@pytest.mark.parametrize('shape, popsize, size',
                         [((1000, 1001), 16, 2**22), ((1000, 1001), 40, 2**23), ((333, 77), 64, 2**16), ((4097,), 200, 2**14)],
                         ids=['1M weight, one run', '1M weight, bands of 8', 'odd shape', '34 runs'])
def test_table_estimate_is_the_same_bits_whatever_the_thread_count(shape, popsize, size):
    "Ranks may run different thread counts (a rank per core, or one process on every core), and every rank must step "
    "alike: the estimate's matrix products, run by this torch build's BLAS, give the same bits on 1, 2 and 3 threads."
    pop = Population({'w': torch.zeros(shape)}, popsize, 0.1, table=NoiseTable(size, seed=1))
    fit = torch.randn(popsize, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    threads, ests = torch.get_num_threads(), []
    try:
        for k in (1, 2, 3): torch.set_num_threads(k); ests.append(pop.grad_estimate(fit)[0])
    finally: torch.set_num_threads(threads)
    assert all(torch.equal(e, ests[0]) for e in ests[1:])

@pytest.mark.parametrize('table', [None, TABLE], ids=['drawn', 'table'])
def test_scoring_shows_members_without_writing_the_weights(table):
    "evaluate hands fitness_fn each member through scratch copies: the parameters keep their storage and version "
    "counters (never written), the scores equal in-place replays bit for bit, and a KeyboardInterrupt in fitness_fn "
    "leaves the same tensors holding the same values."
    net = mlp(); before = params(net); x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    ptrs, versions = [p.data_ptr() for p in net.parameters()], [p._version for p in net.parameters()]
    pop = Population(net, 8, 0.1, table=table)
    seen = []
    def score(m): seen.append(m[0].weight.data_ptr()); return -m(x).pow(2).mean().item()
    fit = pop.evaluate(score)
    assert ptrs[0] not in seen and len(set(seen)) == 1                   # one scratch copy, reused by every member
    assert [p.data_ptr() for p in net.parameters()] == ptrs and [p._version for p in net.parameters()] == versions
    assert same(params(net), before)
    for m in range(8):
        with pop.perturbed(m): assert -net(x).pow(2).mean().item() == fit[m].item()
    def interrupted(m): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): pop.evaluate(interrupted)
    assert [p.data_ptr() for p in net.parameters()] == ptrs and same(params(net), before)

def test_evolve_a_tied_awd_lstm_then_train_it_with_gradients():
    "A user evolves a tied, weight-dropped AWD-LSTM language model with a table (scoring in eval mode, the hidden "
    "state reset per member), then fine-tunes it with backprop: the tie holds, a second process's arithmetic (two "
    "simulated ranks) ends at the same bits, and the first backward's gradients are exactly a fresh copy's: the "
    "estimate's buffers don't leak into .grad."
    from fastai.text.models.core import get_language_model
    from weightdrop.awdlstm import AWD_LSTM
    def lm():
        torch.manual_seed(0)
        cfg = dict(emb_sz=8, n_hid=12, n_layers=2, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1,
                   embed_p=0.1, weight_p=0.5, tie_weights=True, out_bias=True)
        return get_language_model(AWD_LSTM, 30, config=cfg)
    xb = torch.randint(0, 30, (4, 10), generator=torch.Generator().manual_seed(1)); yb = xb.roll(-1, 1)
    def neg_loss(m):
        m.eval(); m.reset()
        return -nn.functional.cross_entropy(m(xb)[0].flatten(0, 1), yb.flatten()).item()
    table = NoiseTable(2**14, seed=2)
    one, two = lm(), lm()
    es1 = EvolutionStrategy(one, 8, 0.05, 0.01, seed=4, table=table)
    es2 = EvolutionStrategy(two, 8, 0.05, 0.01, seed=4, table=table)
    for _ in range(3): es1.step(neg_loss); simulated_step(es2, neg_loss, 2)
    assert same(params(one), params(two))
    fit = es1.population.evaluate(neg_loss)
    for m in range(8):                                   # the raw LSTM weights and the tied embedding are what is shown
        with es1.population.perturbed(m): assert neg_loss(one) == fit[m].item()
    assert len(set(fit.tolist())) == 8
    assert one[1].decoder.weight is one[0].encoder.weight
    assert all(p.grad is None for p in one.parameters())
    fresh = copy.deepcopy(one)
    for m in (one, fresh):
        m.train(); m.reset(); torch.manual_seed(5)
        nn.functional.cross_entropy(m(xb)[0].flatten(0, 1), yb.flatten()).backward()
    for (n, p), q in zip(one.named_parameters(), fresh.parameters()): assert torch.equal(p.grad, q.grad), n

def simulated_step(es, fitness_fn, world):
    "One `es.step` as `world` ranks take it, in this process: each rank's block filled in turn, the all-gather a "
    "concatenation; return the bytes each rank sends."
    pop, blocks = es.population, []
    pop.world = world
    try:
        for pop.rank in range(world):
            block = _block(pop, 0.); _score(pop, fitness_fn, block); blocks.append(block)
        fitness = _read_blocks(pop, torch.stack(blocks), None)
    finally: pop.rank, pop.world = 0, 1
    pop.set_grad_(fitness); es.opt.step(); es.opt.zero_grad(); pop.generation += 1
    return blocks[0].nbytes

@pytest.mark.parametrize('table', [None, TABLE], ids=['drawn', 'table'])
def test_8_and_64_simulated_ranks_end_bit_identical_to_one(table):
    "The arithmetic of a generation split over 8 and 64 ranks, run in one process, ends where one process ends, and "
    "each rank sends 8 × (6 + 2 × its members) bytes: O(population), whatever the model's size."
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    def fit(m): return -m(x).pow(2).mean().item()
    one = mlp(); es = EvolutionStrategy(one, 128, 0.05, 0.01, seed=5, table=table)
    for _ in range(3): es.step(fit)
    for world in (8, 64):
        net = mlp(); es = EvolutionStrategy(net, 128, 0.05, 0.01, seed=5, table=table)
        sent = [simulated_step(es, fit, world) for _ in range(3)]
        assert same(params(net), params(one)), world
        members = 128 // world                                     # 64 pairs dealt round-robin
        assert sent == [8 * (6 + 2 * members)] * 3
        print(f"{'table' if table else 'drawn'}, {world} ranks: {sent[0]} bytes per rank per generation, "
              f"{world * sent[0]:,} gathered by each rank")

# ---- bad input

@pytest.mark.parametrize('kwargs, msg', [
    (dict(popsize=5), 'popsize must be even with antithetic=True'),
    (dict(popsize=1, antithetic=False), 'popsize must be >= 2'),
    (dict(popsize=True), 'popsize must be an int >= 2'),
    (dict(sigma=0.), 'sigma must be finite and > 0'),
    (dict(sigma=float('nan')), 'sigma must be finite and > 0'),
    (dict(lr=-1.), 'lr must be finite and > 0'),
    (dict(seed=-3), 'seed must be >= 0'),
    (dict(shaping='rank'), "shaping must be one of ('centered_ranks', 'zscore', 'none')"),
    (dict(antithetic='yes'), 'antithetic must be True or False'),
    (dict(include='fc.*'), "include: pattern(s) ['fc.*'] match no parameter"),
    (dict(optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.)), 'optimizer must be a function (params, lr=lr)'),
    (dict(optimizer=lambda ps, lr: None), 'must return a torch.optim.Optimizer'),
    (dict(table=2**20), 'table must be a NoiseTable or None, got int'),
    (dict(table=NoiseTable(64)), "table has 64 numbers, fewer than parameter '2.weight' (256 elements): pass table=NoiseTable(size=4096)"),
])
def test_bad_arguments_name_the_fix_and_change_nothing(kwargs, msg):
    net = mlp(); before = params(net)
    args = dict(popsize=4, sigma=0.1, lr=0.1) | kwargs
    with pytest.raises((ValueError, TypeError)) as e: EvolutionStrategy(net, **args)
    assert msg in str(e.value)
    assert same(params(net), before)

@pytest.mark.parametrize('kwargs, err, msg', [
    (dict(size=0), ValueError, 'size must be >= 2'), (dict(size=2.0**20), TypeError, 'size must be an int >= 2'),
    (dict(size=True), TypeError, 'size must be an int >= 2'), (dict(seed=-1), ValueError, 'seed must be >= 0'),
    (dict(seed='3'), TypeError, 'seed must be an int >= 0')])
def test_bad_table_size_or_seed(kwargs, err, msg):
    with pytest.raises(err, match=msg): NoiseTable(**kwargs)

@pytest.mark.parametrize('kwargs, err, msg', [
    (dict(table=TABLE, index=4, count=4), ValueError, 'index must be < count (4), got 4'),
    (dict(table=TABLE, count=0), ValueError, 'count must be >= 1'),
    (dict(table=TABLE, index=-1, count=2), ValueError, 'index must be >= 0'),
    (dict(table=TABLE, count=2.0), TypeError, 'count must be an int >= 1'),
    (dict(index=1, count=2), ValueError, 'drawn noise (table=None) has no place: pass table=NoiseTable(...)')])
def test_bad_place_in_the_table_names_the_fix_and_changes_nothing(kwargs, err, msg):
    net = mlp(); before = params(net)
    with pytest.raises(err, match=re.escape(msg)): perturb_(net, 1, 0.1, **kwargs)
    assert same(params(net), before)

def test_ranks_with_different_tables_all_raise():
    "A table of another seed or size, or none, on one rank: the gathered header differs, and every rank (each reads "
    "the same gathered blocks) raises naming the tables, before any weight changes."
    a = Population(mlp(), 4, 0.1, table=TABLE)
    for other, row in ((Population(mlp(), 4, 0.1, table=NoiseTable(2**16, seed=8)), [65536, 8]),
                       (Population(mlp(), 4, 0.1, table=NoiseTable(2**15, seed=7)), [32768, 7]),
                       (Population(mlp(), 4, 0.1), [0, 0])):
        blocks = torch.stack([_block(a, 0.), _block(other, 0.)])
        for pop in (a, other):
            with pytest.raises(RuntimeError, match=re.escape(f"ranks disagree on the noise table (size, seed mod 2^52; "
                                                             f"0, 0 for none): [[65536, 7], {row}]")):
                _read_blocks(pop, blocks, None)

def test_a_checkpoint_of_another_table_is_refused():
    es = EvolutionStrategy(mlp(), 4, 0.1, 0.1, table=TABLE); sd = copy.deepcopy(es.state_dict())
    for table, msg in ((None, "this population table=None: build it with table=NoiseTable(size=65536, seed=7)"),
                       (NoiseTable(2**16, 1), "this population table={'size': 65536, 'seed': 1}")):
        other = EvolutionStrategy(mlp(), 4, 0.1, 0.1, table=table)
        with pytest.raises(ValueError, match=re.escape(msg)): other.load_state_dict(sd)
        assert other.generation == 0

def test_evaluate_key_must_be_a_finite_number():
    pop = Population(mlp(), 4, 0.1)
    for bad in (float('nan'), '3', None, True):
        with pytest.raises(TypeError, match='key must be a finite number, the same on every rank'):
            pop.evaluate(lambda m: 0., key=bad)
    assert pop.evaluate(lambda m: 1., key=2.5).tolist() == [1.] * 4
    net = mlp(); before = params(net); es = EvolutionStrategy(net, 4, 0.1, 0.1)
    with pytest.raises(TypeError, match='key must be a finite number'): es.step(lambda m: 0., key=float('inf'))
    assert same(params(net), before) and es.generation == 0
    assert es.step(lambda m: 0., key=3.)['generation'] == 0 and es.generation == 1

def test_perturb_refuses_a_live_graph_and_changes_nothing():
    net = mlp(); loss = net(torch.randn(3, 6)).sum(); before = params(net)
    with pytest.raises(RuntimeError, match=r"perturb_: parameter\(s\) \['2.weight', '4.weight'\] are saved for backward"):
        perturb_(net, 0, 0.1)
    es = EvolutionStrategy(mlp(), 4, 0.1, 0.1)
    loss2 = es.population.model(torch.randn(3, 6)).sum()
    with pytest.raises(RuntimeError, match='evaluate: parameter'): es.step(lambda m: 0.)
    assert same(params(net), before)
    loss.backward(); loss2.backward()
    es.step(lambda m: 0.)

def test_nonfinite_fitness_and_stale_backup():
    net = mlp()
    with pytest.raises(RuntimeError, match='fitness_fn returned inf for member 0'):
        EvolutionStrategy(net, 4, 0.1, 0.1).step(lambda m: float('inf'))
    bk = perturb_(net, 0, 0.1); bk.restore_()
    with torch.no_grad(): net[0].weight.mul_(2)
    with pytest.raises(ValueError, match=r"backup is stale: \['0.weight'\]"): perturb_(net, 1, 0.1, backup=bk)
    with pytest.raises(TypeError, match='needs floating-point parameters'): perturb_({'n': torch.zeros(3, dtype=torch.long)}, 0, 1.)

# ---- pinned defects

def test_same_shaped_parameters_get_different_noise():
    "ES code for language models that reseeds one generator per parameter from the member's seed alone gives every "
    "same-shaped tensor the same noise; here the name is part of each stream's seed, and the noises are uncorrelated."
    m = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(3)])
    ws = [p.detach().clone() for p in m.parameters()]
    with perturbed(m, 0, 1.0):
        d = [(p - w).flatten() for p, w in zip(m.parameters(), ws)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(torch.corrcoef(torch.stack([d[i], d[j]]))[0, 1]) < 6 / math.sqrt(d[i].numel())

def test_bf16_noise_is_drawn_and_added_in_float32():
    "Drawing the noise directly in bf16 rounds it to 8 mantissa bits and rounds again on adding; the perturbed bf16 "
    "weight here is the float32 sum rounded once."
    lin = nn.Linear(256, 256, bias=False).to(torch.bfloat16); w = lin.weight.detach().clone()
    e = param_noise(w, 2, 'weight')
    with perturbed(lin, 2, 0.01):
        assert torch.equal(lin.weight, w.float().add(e, alpha=0.01).to(torch.bfloat16))
        naive = w + 0.01 * e.to(torch.bfloat16)           # noise cast to bf16, added in bf16
        assert not torch.equal(lin.weight, naive)

def test_restoring_by_subtracting_the_noise_is_not_exact():
    "ES code that undoes a perturbation by subtracting the noise drifts: (w + d) - d != w in floating point. The "
    "restore here copies the original values back."
    w = torch.randn(100_000, generator=torch.Generator().manual_seed(0)); e = param_noise(w, 0, 'w')
    assert not torch.equal(w.add(e, alpha=0.1).add(e, alpha=-0.1), w)  # the defect
    p = {'w': w.clone()}
    with perturbed(p, 0, 0.1): pass
    assert torch.equal(p['w'], w)

# ---- distributed: 2 processes, gloo, CPU

@pytest.fixture(scope='module')
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp('es_run'); return torchrun(SCRIPTS / 'es_run.py', out)

@pytest.fixture(scope='module')
def run2_fail(tmp_path_factory):
    out = tmp_path_factory.mktemp('es_fail'); return torchrun(SCRIPTS / 'es_run.py', out, '--fail-rank', '1')

@pytest.mark.distributed
def test_two_ranks_split_members_and_stay_bit_identical(run2):
    r0, r1 = run2
    assert r0['world'] == r1['world'] == 2
    assert sorted(r0['members'] + r1['members']) == list(range(es_common.POPSIZE))   # each member scored once
    assert r0['state'].keys() == r1['state'].keys()
    assert all(torch.equal(r0['state'][k], r1['state'][k]) for k in r0['state'])
    init = es_common.make_model(seed=0).state_dict()
    assert any(not torch.equal(init[k], r0['state'][k]) for k in init)              # and they evolved

@pytest.mark.distributed
def test_two_ranks_end_where_one_process_ends(run2):
    "Rank 1 built its model from another seed; the broadcast and the seeds make the 2-rank run the 1-process run."
    model = es_common.make_model(seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        es = EvolutionStrategy(model, es_common.POPSIZE, es_common.SIGMA, es_common.LR, seed=es_common.SEED)
        stats = [es.step(es_common.neg_mse) for _ in range(es_common.GENERATIONS)]
    finally: torch.set_num_threads(threads)
    sd = es_common.state(model)
    assert all(torch.equal(sd[k], run2[0]['state'][k]) for k in sd)
    assert [s['mean'] for s in stats] == [s['mean'] for s in run2[0]['stats']]

@pytest.mark.distributed
def test_one_small_all_gather_per_generation(run2):
    "Per generation, each rank sends one all-gather of 6 + 2 * (members per rank, padded) numbers: O(popsize), "
    "the same for a model with 30 times the parameters. Only construction broadcasts the weights, once."
    r0, r1 = run2
    per_rank = 6 + 2 * 4          # a 6-number header; 3 pairs over 2 ranks: 2 pairs (4 slots) per rank, padded
    for r in (r0, r1):
        assert len(r['per_generation']) == es_common.GENERATIONS
        for calls in r['per_generation']:
            assert len(calls) == 1 and calls[0][0] in ('all_gather_single', 'all_gather_into_tensor')
            assert calls[0][1] == per_rank
        assert r['calls_big'] == r['per_generation'][0] and r['n_params_big'] > 30 * r['n_params']
        assert [c[0] for c in r['at_start']] == ['broadcast'] * 6 and sum(c[1] for c in r['at_start']) == r['n_params']

@pytest.mark.distributed
def test_a_rank_that_raises_makes_every_rank_raise(run2_fail, run2):
    "Rank 1's fitness_fn raises at member 3: both ranks raise naming it, nobody hangs, the weights are restored, and "
    "retrying the generation gives the run that never failed."
    r0, r1 = run2_fail
    assert len(r0['errors']) == len(r1['errors']) == 1
    for r in (r0, r1): assert 'fitness_fn raised for member 3 of generation 1 on rank 1' in r['errors'][0]
    assert "ValueError('episode diverged')" in r1['errors'][0] and "that rank's traceback" in r0['errors'][0]
    assert all(torch.equal(r0['state'][k], run2[0]['state'][k]) for k in r0['state'])

@pytest.fixture(scope='module')
def run2_table(tmp_path_factory):
    out = tmp_path_factory.mktemp('es_table'); return torchrun(SCRIPTS / 'es_run.py', out, '--table')

@pytest.mark.distributed
def test_table_two_ranks_end_where_one_process_ends(run2_table, run2):
    "With a NoiseTable, rank 1 built from another seed: both ranks end bit for bit where one process ends, having sent "
    "the same one all-gather per generation as with drawn noise; another noise, so other weights than the drawn run."
    r0, r1 = run2_table
    model = es_common.make_model(seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        es = EvolutionStrategy(model, es_common.POPSIZE, es_common.SIGMA, es_common.LR, seed=es_common.SEED,
                               table=NoiseTable(es_common.TABLE_SIZE, es_common.TABLE_SEED))
        stats = [es.step(es_common.neg_mse) for _ in range(es_common.GENERATIONS)]
    finally: torch.set_num_threads(threads)
    sd = es_common.state(model)
    for r in (r0, r1):
        assert all(torch.equal(sd[k], r['state'][k]) for k in sd)
        assert [s['mean'] for s in stats] == [s['mean'] for s in r['stats']]
        assert r['per_generation'] == run2[0]['per_generation'] and r['calls_big'] == run2[0]['calls_big']
    assert any(not torch.equal(sd[k], run2[0]['state'][k]) for k in sd)

@pytest.mark.distributed
def test_table_seed_that_differs_between_ranks_makes_every_rank_raise(run2_table):
    for r in run2_table:
        assert 'ranks disagree on the noise table (size, seed mod 2^52; 0, 0 for none): [[65536, 0], [65536, 1]]' in r['table_error']
