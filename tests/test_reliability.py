"""Issue 10, the parts in `gates`: one test per item (named by its number), a soft-forward test, a random-model fuzzer and a
concurrency test; then issue 12's: torch.compile and denormal floats. Each compares with an independent reference (a closed
form in float64, a brute force, the plain gradient, the eager pullback).
RUN_SLOW=1 runs the fuzzer and the concurrency test at a larger size."""
import asyncio, gc, math, os, threading, weakref
from concurrent.futures import ThreadPoolExecutor
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
import excitation_workbench.gates as gates  # the module: its new names are looked up inside the tests

SLOW = bool(os.environ.get('RUN_SLOW'))
GATE_FNS = {'sigmoid': torch.sigmoid, 'normal_cdf': torch.special.ndtr}

def no_mode_left(): return torch._C._len_torch_function_stack() == 0

def rel_err(a, b): return ((a - b).norm() / b.norm()).item()

def plain_gradient(model, x, target):
    "The input gradient of the target logits by a bare autograd call, no gates."
    x = x.detach().clone().requires_grad_()
    logits = model(x)
    return torch.autograd.grad(logits[torch.arange(len(x)), torch.as_tensor(target).expand(len(x))].sum(), x)[0]

def closed_form(lins, x, c, T, gates_, uppers=None):
    """W_1^T diag(g_1) ... W_L^T e_c for one sample, float64, with g_l = gates_[l](z_l / T) (times the upper edge's gate
    gates_[l]((upper - z_l) / T) for a clipped ReLU); gates_[l] None means the hard gate 1[z > 0] (and 1[z < upper])."""
    lins = [(l.weight.detach().double(), l.bias.detach().double()) for l in lins]
    uppers = uppers or [None] * (len(lins) - 1)
    gs, h = [], x.double()
    for (w, b), gate, up in zip(lins[:-1], gates_, uppers):
        z = w @ h + b
        g = (z > 0).double() if gate is None else gate(z / T)
        if up is not None: g = g * ((z < up).double() if gate is None else gate((up - z) / T))
        gs.append(g); h = z.clamp(0, up)
    v = lins[-1][0][c]
    for (w, _), g in zip(lins[-2::-1], gs[::-1]): v = w.T @ (g * v)
    return v

def mlp(widths, seed=0):
    "Linear layers of unit-scale activations, and an nn.Sequential of them with ReLU modules, in eval mode."
    torch.manual_seed(seed)
    lins = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    for l in lins: nn.init.normal_(l.weight, std=(2 / l.in_features) ** 0.5)
    return lins, nn.Sequential(*[m for l in lins[:-1] for m in (l, nn.ReLU())], lins[-1]).eval()

def reference(lins, x, target, T, gate='sigmoid', uppers=None, soft=None):
    "The closed form for a batch; `soft` lists which sites are soft (all by default)."
    fn = GATE_FNS[gate]
    gs = [fn if soft is None or s else None for s in (soft or [True] * (len(lins) - 1))]
    t = torch.as_tensor(target).expand(len(x))
    return torch.stack([closed_form(lins, x[i], int(t[i]), T, gs, uppers) for i in range(len(x))])

def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()

# ---------------------------------------------------------------------------------------------------------------------
def test_soft_forward():
    "One forward, many backwards: each pullback equals excitation_pullback and the closed form, for any T, gate, layers."
    lins, net = mlp([5, 7, 7, 6, 4], seed=3)
    net = net.double()
    x, c = torch.randn(3, 5, dtype=torch.float64), [0, 2, 3]
    forwards = []
    net.register_forward_hook(lambda *a: forwards.append(1))
    sf = gates.soft_forward(net, x)
    assert [s.name for s in sf.sites] == ['1', '3', '5'] and sf.logits.shape == (3, 4) and not sf.logits.requires_grad
    torch.testing.assert_close(sf.logits, net(x), rtol=0, atol=0)
    forwards.clear()
    for T in (0.05, 0.3, 1.0, 4.0):
        for gate in GATE_FNS:
            for layers, soft in [(None, None), (['3'], [False, True, False]), (['1', '5'], [True, False, True])]:
                want = reference(lins, x, c, T, gate, soft=soft)
                got = sf.pullback(c, T, gate=gate, layers=layers)
                assert (got - want).abs().max() < 1e-12, (T, gate, layers)
                assert (gates.excitation_pullback(net, x, c, T, gate=gate, layers=layers) - want).abs().max() < 1e-12
    assert len(forwards) == 2 * 4 * 3  # one per excitation_pullback; the 24 pullbacks of `sf` ran no forward
    # a temperature sweep of five values from a worker thread: one forward, five backwards
    forwards.clear()
    def sweep():
        s = gates.soft_forward(net, x)
        return [s.pullback(1, T) for T in (0.1, 0.2, 0.5, 1.0, 2.0)], no_mode_left()
    with ThreadPoolExecutor(1) as pool: got, clean = pool.submit(sweep).result()
    assert clean and len(forwards) == 1
    for T, g in zip((0.1, 0.2, 0.5, 1.0, 2.0), got): assert (g - reference(lins, x, 1, T)).abs().max() < 1e-12

def test_soft_forward_max_pool():
    "The soft max-pool's backward reads T at backward time too."
    net = small_cnn()
    x = torch.rand(2, 3, 8, 8)
    sf = gates.soft_forward(net, x)
    for T in (0.1, 1.0):
        torch.testing.assert_close(sf.pullback([1, 2], T), gates.excitation_pullback(net, x, [1, 2], T), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gates.soft_forward(net, x, maxpool='hard').pullback(1, 0.5),
                               gates.excitation_pullback(net, x, 1, 0.5, maxpool='hard'), rtol=1e-5, atol=1e-7)

# ---------------------------------------------------------------------------------------------------------------------
def test_01_threads():
    "Pullbacks of one model from several threads at once, next to plain gradients of it: each right, no mode left anywhere."
    net = small_cnn()
    x = torch.rand(4, 3, 16, 16)
    want_soft, want_plain = gates.excitation_pullback(net, x, 1, 0.5), plain_gradient(net, x, 1)
    def soft(_): return rel_err(gates.excitation_pullback(net, x, 1, 0.5), want_soft), no_mode_left()
    def plain(_): return rel_err(plain_gradient(net, x, 1), want_plain), no_mode_left()
    with ThreadPoolExecutor(4) as pool: results = list(pool.map(lambda i: (soft if i % 2 else plain)(i), range(40)))
    assert all(err < 1e-5 and clean for err, clean in results), results
    assert no_mode_left()

def test_01_asyncio():
    "A plain forward in one asyncio task while another task's soft gates on the same model wait: the plain one stays plain."
    net = small_cnn()
    x = torch.rand(2, 3, 16, 16)
    want_plain = plain_gradient(net, x, 0)
    async def soft():
        with gates.soft_gates(net, 0.5):
            await asyncio.sleep(0.01)  # the other task runs the model now
            return gates.excitation_pullback(net, x, 0, 0.5)
    async def plain():
        await asyncio.sleep(0)
        return plain_gradient(net, x, 0)
    async def main(): return await asyncio.gather(soft(), plain())
    _, got_plain = asyncio.run(main())
    assert rel_err(got_plain, want_plain) < 1e-6 and no_mode_left()

# ---------------------------------------------------------------------------------------------------------------------
class Body(nn.Module):
    "An MLP whose hidden layers sit in `body`, with a ReLU in the style `relu` (a function of z)."
    def __init__(self, lins, relu, checkpointed=None):
        super().__init__()
        self.body, self.head, self.relu, self.checkpointed = nn.ModuleList(lins[:-1]), lins[-1], relu, checkpointed
    def block(self, i, x): return self.relu(self.body[i](x))
    def forward(self, x):
        for i in range(len(self.body)):
            if self.checkpointed is None: x = self.block(i, x)
            else: x = checkpoint.checkpoint(self.block, i, x, use_reentrant=self.checkpointed)
        return self.head(x)

@pytest.mark.filterwarnings('ignore:None of the inputs have requires_grad')
@pytest.mark.parametrize('reentrant', [True, False])
def test_02_checkpoint(reentrant):
    "A ReLU inside torch.utils.checkpoint: a clear error, never a silently hard gate."
    lins, _ = mlp([5, 6, 6, 3])
    net = Body(lins, F.relu, checkpointed=reentrant).eval()
    with pytest.raises(RuntimeError, match='runs .in part. inside torch.utils.checkpoint'): gates.excitation_pullback(net, torch.randn(2, 5), 0, 0.5)
    assert gates.relu_sites(net, torch.randn(2, 5))  # without a graph, checkpointing changes nothing: the sites are listed
    plain = Body(lins, F.relu).eval()  # the whole model checkpointed, inside soft gates
    with pytest.raises(RuntimeError, match='runs .in part. inside torch.utils.checkpoint'), gates.soft_gates(plain, 0.5):
        checkpoint.checkpoint(plain, torch.randn(2, 5, requires_grad=True), use_reentrant=reentrant)
    assert no_mode_left()

def test_02_submodule_call():
    "A submodule called directly inside soft_gates gets soft gates too."
    lins, net = mlp([5, 7, 7, 3])
    body, x = net[:4], torch.randn(3, 5)
    with gates.soft_gates(net, 0.5):
        x0 = x.clone().requires_grad_()
        got = torch.autograd.grad(lins[2](body(x0))[:, 1].sum(), x0)[0]
    torch.testing.assert_close(got.double(), reference(lins, x, 1, 0.5), rtol=1e-3, atol=1e-6)

@pytest.mark.parametrize('style', ['torch.clamp(min=0)', 'clamp_min', 'clamp_min_', 'F.threshold', 'nn.Threshold',
                                   'clamp(0, 6)'])
def test_02_clamp_and_threshold(style):
    "clamp(min=0), clamp_min(0) and threshold(0, 0) are ReLUs: caught and soft, like the nn.ReLU next to them."
    relu = {'torch.clamp(min=0)': lambda z: torch.clamp(z, min=0), 'clamp_min': lambda z: z.clamp_min(0),
            'clamp_min_': lambda z: z.clamp_min_(0), 'F.threshold': lambda z: F.threshold(z, 0, 0),
            'nn.Threshold': nn.Threshold(0.0, 0.0), 'clamp(0, 6)': lambda z: z.clamp(0, 6)}[style]
    lins, _ = mlp([5, 7, 7, 3], seed=1)
    with torch.no_grad(): lins[0].weight.mul_(4)  # some z above 6
    net = nn.Sequential(lins[0], nn.ReLU(), lins[1], Lambda(relu), lins[2]).eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    net.double()
    assert len(gates.relu_sites(net, x)) == 2
    upper = 6 if style == 'clamp(0, 6)' else None
    want = reference(lins, x, 2, 0.7, uppers=[None, upper])
    assert (gates.excitation_pullback(net, x, 2, 0.7) - want).abs().max() < 1e-12
    # a clamp that is no ReLU is left alone
    net[3] = Lambda(lambda z: z.clamp(min=-1)).eval()
    assert len(gates.relu_sites(net, x)) == 1

class Lambda(nn.Module):
    def __init__(self, f): super().__init__(); self.f = f
    def forward(self, x): return self.f(x)

# ---------------------------------------------------------------------------------------------------------------------
def test_03_targets():
    "Integer classes only, in any integer type; bool, float and one-hot targets are clear errors saying what to pass."
    lins, net = mlp([5, 6, 4])
    x = torch.randn(3, 5)
    want = gates.excitation_pullback(net, x, [1, 1, 1], 0.5)
    for ok in (1, np.int64(1), [1, 1, 1], [np.int32(1)] * 3, np.array([1, 1, 1]), torch.tensor([1, 1, 1]), torch.tensor(1, dtype=torch.int8)):
        torch.testing.assert_close(gates.excitation_pullback(net, x, ok, 0.5), want, rtol=0, atol=0)
    for bad in (True, 1.7, 1.0, [1.0, 2.0, 0.0], torch.tensor([True, False, True]), np.float32(1), F.one_hot(torch.tensor([1, 2, 0]), 4),
                'cat', None):
        with pytest.raises((TypeError, ValueError), match='class indices'): gates.excitation_pullback(net, x, bad, 0.5)

def test_03_targets_every_method():
    "Every attribution method reads targets through the same check."
    from excitation_workbench.attribution import METHODS
    net, x = small_cnn(), torch.rand(2, 3, 8, 8)
    for name, method in METHODS.items():
        for bad in (F.one_hot(torch.tensor([1, 2]), 4), 1.5, True):
            with pytest.raises((TypeError, ValueError), match='class indices'): method(net, x, bad)

def test_06_extreme_values():
    "z far beyond float16's range at a temperature of its scale: still the float64 closed form; non-finite T is refused."
    lins, net = mlp([4, 8, 8, 3], seed=2)
    with torch.no_grad(): lins[0].weight.mul_(1e5)  # |z| up to a few 1e5 in the first two layers
    x = torch.randn(2, 4)
    assert net[0](x).abs().max() > 65504
    for T in (1e5, 1e6):
        want = reference(lins, x.double(), 1, T)
        assert rel_err(gates.excitation_pullback(net, x, 1, T).double(), want) < 1e-3, T
    for T in (float('inf'), float('nan'), -1.0, 0.0):
        with pytest.raises(ValueError, match='finite and > 0'): gates.excitation_pullback(net, x, 1, T)

def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))

def test_07_training_mode():
    "A model in training mode gets one clear error from every entry point, before anything runs: its state never changes."
    from excitation_workbench.ascent import ascend
    from excitation_workbench.paths import record_excitations, node_pullback, top_paths
    x = torch.rand(4, 4)
    calls = {'excitation_pullback': lambda m: gates.excitation_pullback(m, x, 0, 0.5),
             'soft_forward': lambda m: gates.soft_forward(m, x),
             'relu_sites': lambda m: gates.relu_sites(m, x),
             'gated_gradient': lambda m: gates.gated_gradient(m, x, 0, lambda site, call: call.hard()),
             'soft_gates': lambda m: gates.soft_gates(m, 0.5).__enter__(),
             'ascend': lambda m: ascend(m, x, 0),
             'record_excitations': lambda m: record_excitations(m, x),
             'node_pullback': lambda m: node_pullback(m, x, ('2', 0)),
             'top_paths': lambda m: top_paths(m, x[:1], 0)}
    for name, call in calls.items():
        net = bn_net().eval()
        net[1].train()  # one module is enough
        before = [b.clone() for b in net.buffers()]
        with pytest.raises(ValueError, match=r'training mode.*call model\.eval\(\) first'): call(net)
        assert all(torch.equal(a, b) for a, b in zip(before, net.buffers())), f'{name} changed the BatchNorm statistics'
        assert no_mode_left() and not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()), name

def test_08_memory():
    "No reference cycle: what a call recorded dies when the call returns, without the cyclic garbage collector."
    from excitation_workbench.paths import record_excitations
    lins, net = mlp([5, 6, 6, 3])
    x = torch.randn(2, 5)
    gc.collect(); gc.disable()
    try:
        gates.excitation_pullback(net, x, 0, 0.5); gates.relu_sites(net, x); record_excitations(net, x)
        with gates.soft_gates(net, 0.5) as catcher: net(x.clone().requires_grad_())
        catcher = weakref.ref(catcher)
        assert catcher() is None and gc.collect() == 0  # nothing was left for the cyclic collector
        sf = gates.soft_forward(net, x); sf.pullback(0, 0.5)
        logits = weakref.ref(sf._logits); del sf  # dropping the soft forward frees its graph
        assert logits() is None and gc.collect() == 0
    finally: gc.enable()

# ---------------------------------------------------------------------------------------------------------------------
def brute_soft_pool_grad(x, g, k, s, p, T):
    "The soft max-pool backward by loops over outputs and window positions, for one [H, W] map (stride s, padding p)."
    out = torch.zeros_like(x)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            pos = [(i * s[0] - p[0] + a, j * s[1] - p[1] + b) for a in range(k[0]) for b in range(k[1])]
            pos = [(r, c) for r, c in pos if 0 <= r < x.shape[0] and 0 <= c < x.shape[1]]
            w = torch.softmax(torch.stack([x[r, c] for r, c in pos]) / T, 0)
            for (r, c), wi in zip(pos, w): out[r, c] += wi * g[i, j]
    return out

def test_10_max_pool_then_inplace_relu():
    "A soft max-pool followed by an in-place ReLU works and matches the brute force."
    torch.manual_seed(0)
    head = nn.Linear(9, 2).double()
    net = nn.Sequential(nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Flatten(), head).eval()
    x, T = torch.randn(1, 1, 6, 6, dtype=torch.float64), 0.7
    got = gates.excitation_pullback(net, x, 1, T)
    y = F.max_pool2d(x, 2)[0, 0]
    g_pool = head.weight[1].detach().view(3, 3) * torch.sigmoid(y / T)  # through the linear layer and the soft ReLU
    assert (got[0, 0] - brute_soft_pool_grad(x[0, 0], g_pool, (2, 2), (2, 2), (0, 0), T)).abs().max() < 1e-12

def test_11_temperature_types():
    "A temperature may be a float, an int, a numpy scalar or a 0-d tensor: the same pullback."
    lins, net = mlp([5, 6, 4])
    x = torch.randn(3, 5)
    want = gates.excitation_pullback(net, x, 1, 2.0)
    for T in (2, np.float64(2), np.float32(2), np.int64(2), torch.tensor(2.0), torch.tensor(2, dtype=torch.float64), torch.tensor([2.0])):
        torch.testing.assert_close(gates.excitation_pullback(net, x, 1, T), want, rtol=0, atol=0)
    for T in ('2', None, 2j, torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match='temperature must be a real number'): gates.excitation_pullback(net, x, 1, T)

class Wrapped(nn.Module):
    def __init__(self, net, how): super().__init__(); self.net, self.how = net, how
    def forward(self, x):
        y = self.net(x)
        return (y, y.sum(1)) if self.how == 'tuple' else {'logits': y}

@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit's deprecation
def test_12_model_kinds():
    "Tuple or dict outputs, plain functions, TorchScript and torch.func get clear errors; inference_mode just works."
    lins, net = mlp([5, 6, 4])
    x = torch.randn(3, 5)
    want = gates.excitation_pullback(net, x, 1, 0.5)
    for how in ('tuple', 'dict'):
        with pytest.raises(TypeError, match='wrap it so that it returns the logits'): gates.excitation_pullback(Wrapped(net, how).eval(), x, 1, 0.5)
    with torch.inference_mode():
        xi = x.clone()
        torch.testing.assert_close(gates.excitation_pullback(net, xi, 1, 0.5), want, rtol=0, atol=0)
        assert [s.name for s in gates.relu_sites(net, xi)] == ['1']
    with pytest.raises(TypeError, match='must be an nn.Module'): gates.excitation_pullback(lambda t: net(t), x, 1, 0.5)
    with pytest.raises(TypeError, match='TorchScript'): gates.excitation_pullback(torch.jit.trace(net, x), x, 1, 0.5)
    with pytest.raises(TypeError, match='TorchScript'): gates.excitation_pullback(torch.jit.script(net), x, 1, 0.5)
    with pytest.raises(RuntimeError, match='torch.func transforms'):
        torch.func.vmap(lambda xi: gates.excitation_pullback(net, xi[None], 1, 0.5))(x)
    with pytest.raises(RuntimeError, match='torch.func transforms'):
        def logit(xi):
            with gates.soft_gates(net, 0.5): return net(xi[None])[0, 1]
        torch.func.grad(logit)(x[0])
    assert no_mode_left()

def test_13_layers_and_pools():
    "layers takes one name as a str, refuses [], and every max-pool is soft or a clear error: 1-d and adaptive ones are soft."
    lins, net = mlp([5, 6, 6, 4])
    x = torch.randn(3, 5, dtype=torch.float64)
    net.double()
    assert (gates.excitation_pullback(net, x, 1, 0.5, layers='3') - reference(lins, x, 1, 0.5, soft=[False, True])).abs().max() < 1e-12
    with pytest.raises(ValueError, match='layers is empty'): gates.excitation_pullback(net, x, 1, 0.5, layers=[])
    torch.manual_seed(0)
    T = 0.6
    # MaxPool1d: a 2-d pool of height 1
    head = nn.Linear(4, 2).double()
    net1 = nn.Sequential(nn.ReLU(), nn.MaxPool1d(3, 2, padding=1), nn.Flatten(), head).eval()
    x1 = torch.randn(1, 1, 8, dtype=torch.float64)
    a = x1[0].clamp(min=0)
    g = brute_soft_pool_grad(a, head.weight[0].detach().view(1, 4), (1, 3), (1, 2), (0, 1), T) * torch.sigmoid(x1[0] / T)
    assert (gates.excitation_pullback(net1, x1, 0, T)[0] - g).abs().max() < 1e-12
    # a global adaptive max-pool: softmax over the whole map
    net2 = nn.Sequential(nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, 2).double()).eval()
    x2 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    a = x2[0].clamp(min=0)
    w = net2[3].weight[1].detach()
    want = torch.stack([w[c] * torch.softmax(a[c].flatten() / T, 0).view(4, 4) for c in range(2)]) * torch.sigmoid(x2[0] / T)
    assert (gates.excitation_pullback(net2, x2, 1, T)[0] - want).abs().max() < 1e-12
    # a 3-d max-pool has no soft form: a clear error, and maxpool='hard' keeps it hard
    net3 = nn.Sequential(nn.ReLU(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(8, 2).double()).eval()
    x3 = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_pool3d has no soft backward.*maxpool='hard'"): gates.excitation_pullback(net3, x3, 1, T)
    assert rel_err(gates.excitation_pullback(net3, x3, 1, 1e-9, maxpool='hard'), plain_gradient(net3, x3, 1)) < 1e-9
    # nor has a fractional one (random windows), as a module or called functionally with indices
    for frac in (nn.FractionalMaxPool2d(2, output_size=2), lambda a: F.fractional_max_pool2d(a, 2, output_size=2, return_indices=True)[0]):
        netf = nn.Sequential(nn.ReLU(), Lambda(frac), nn.Flatten(), nn.Linear(8, 2).double()).eval()
        xf = torch.randn(1, 2, 5, 5, dtype=torch.float64)
        with pytest.raises(ValueError, match="fractional_max_pool2d has no soft backward.*maxpool='hard'"): gates.excitation_pullback(netf, xf, 1, T)
        torch.manual_seed(0); hard = gates.excitation_pullback(netf, xf, 1, 1e-9, maxpool='hard')
        torch.manual_seed(0); assert rel_err(hard, plain_gradient(netf, xf, 1)) < 1e-9  # the same random windows

# ---------------------------------------------------------------------------------------------------------------------
# The fuzzer: random MLPs whose ReLUs are called in random styles, each pullback against the float64 closed form.
STYLES = {  # style: (how a block applies its ReLU to z, the upper clip)
    'module': (lambda b, z: b.relu(z), None), 'inplace module': (lambda b, z: b.relu_ip(z), None),
    'shared module': (lambda b, z: b.shared(z), None), 'created in forward': (lambda b, z: nn.ReLU()(z), None),
    'nested': (lambda b, z: b.nested(z), None), 'F.relu': (lambda b, z: F.relu(z), None),
    'F.relu inplace': (lambda b, z: F.relu(z, inplace=True), None), 'torch.relu': (lambda b, z: torch.relu(z), None),
    'torch.relu_': (lambda b, z: torch.relu_(z), None), 'Tensor.relu': (lambda b, z: z.relu(), None),
    'Tensor.relu_': (lambda b, z: z.relu_(), None), 'clamp': (lambda b, z: torch.clamp(z, min=0), None),
    'clamp_min_': (lambda b, z: z.clamp_min_(0), None), 'threshold': (lambda b, z: F.threshold(z, 0.0, 0.0), None),
    'relu6': (lambda b, z: F.relu6(z), 6.0), 'hardtanh(0, 3)': (lambda b, z: F.hardtanh(z, 0.0, 3.0), 3.0),
    'clamp(0, 2)': (lambda b, z: z.clamp(0, 2), 2.0), 'checkpointed': (lambda b, z: checkpoint.checkpoint(F.relu, z, use_reentrant=False), None),
}

class Block(nn.Module):
    def __init__(self, lin, style, shared):
        super().__init__()
        self.lin, self.style, self.shared = lin, style, shared
        self.relu, self.relu_ip, self.nested = nn.ReLU(), nn.ReLU(inplace=True), nn.Sequential(nn.Identity(), nn.ReLU())
    def forward(self, x): return STYLES[self.style][0](self, self.lin(x))

class Fuzzed(nn.Module):
    def __init__(self, lins, styles):
        super().__init__()
        shared = nn.ReLU()
        self.blocks, self.head = nn.ModuleList(Block(l, s, shared) for l, s in zip(lins[:-1], styles)), lins[-1]
    def forward(self, x):
        for b in self.blocks: x = b(x)
        return self.head(x)

def fuzz_one(seed):
    rng = np.random.default_rng(seed)
    widths = rng.integers(2, 8, rng.integers(3, 7)).tolist()
    lins, _ = mlp(widths, seed)
    with torch.no_grad():
        for l in lins: l.weight.mul_(2.0)  # some z above the clips
    styles = rng.choice(list(STYLES), len(lins) - 1).tolist()
    net = Fuzzed(lins, styles).double().eval()
    x = torch.randn(3, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    T, gate, c = float(rng.uniform(0.05, 3)), str(rng.choice(list(GATE_FNS))), rng.integers(0, widths[-1], 3).tolist()
    if 'checkpointed' in styles:
        with pytest.raises(RuntimeError, match='runs .in part. inside torch.utils.checkpoint'): gates.excitation_pullback(net, x, c, T, gate=gate)
        return styles
    uppers = [STYLES[s][1] for s in styles]
    names = [s.name for s in gates.relu_sites(net, x)]
    assert len(names) == len(styles), (styles, names)
    soft = rng.random(len(names)) < 0.6
    layers = [n for n, s in zip(names, soft) if s] or None
    want_all = reference(lins, x, c, T, gate, uppers)
    want = reference(lins, x, c, T, gate, uppers, soft=None if layers is None else soft.tolist())
    def close(got, want): assert (got - want).abs().max() <= 1e-10 * (1 + want.abs().max()), (seed, styles, layers)
    close(gates.excitation_pullback(net, x, c, T, gate=gate, layers=layers), want)
    sf = gates.soft_forward(net, x)
    close(sf.pullback(c, T, gate=gate, layers=layers), want)
    close(sf.pullback(c, T, gate=gate), want_all)
    with gates.soft_gates(net, T, gate=gate):  # the blocks called one by one, as submodules
        x0 = x.clone().requires_grad_()
        h = x0
        for b in net.blocks: h = b(h)
        close(torch.autograd.grad(net.head(h)[torch.arange(3), c].sum(), x0)[0], want_all)
    return styles

def test_fuzz_calling_styles():
    "Random models composing every calling style: each pullback (whole, soft_forward, layer subsets, submodule calls) is the closed form."
    seen = set()
    for seed in range(300 if SLOW else 40): seen.update(fuzz_one(seed))
    assert seen == set(STYLES)  # every style was drawn
    assert no_mode_left()

# ---------------------------------------------------------------------------------------------------------------------
def test_concurrency():
    "Threads using one model and several models at once, in every entry point, many times: all right, no mode left on any thread."
    nets = [small_cnn(seed) for seed in range(3)]
    x = torch.rand(2, 3, 8, 8)
    refs = [dict(soft=gates.excitation_pullback(n, x, 1, 0.5), cold=gates.excitation_pullback(n, x, 1, 2.0),
                 plain=plain_gradient(n, x, 1), sites=gates.relu_sites(n, x)) for n in nets]
    iterations, errors, clean = (60 if SLOW else 12), [], []
    def worker(k):
        rng = np.random.default_rng(k)
        try:
            for _ in range(iterations):
                i = int(rng.integers(len(nets))) if k % 2 else 0  # even threads share model 0, odd ones pick any
                net, ref, kind = nets[i], refs[i], int(rng.integers(4))
                if kind == 0: ok = rel_err(gates.excitation_pullback(net, x, 1, 0.5), ref['soft']) < 1e-5
                elif kind == 1: ok = rel_err(plain_gradient(net, x, 1), ref['plain']) < 1e-5
                elif kind == 2:
                    sf = gates.soft_forward(net, x)
                    ok = rel_err(sf.pullback(1, 2.0), ref['cold']) < 1e-5 and rel_err(sf.pullback(1, 0.5), ref['soft']) < 1e-5
                else: ok = gates.relu_sites(net, x) == ref['sites']
                if not ok: errors.append((k, i, kind))
        except Exception as e: errors.append((k, repr(e)))
        clean.append(no_mode_left())
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors[:5]
    assert clean == [True] * 6 and no_mode_left()
    assert not any(m._forward_hooks or m._forward_pre_hooks for n in nets for m in n.modules())

# ---------------------------------------------------------------------------------------------------------------------
# Issue 12, the parts in `gates`: torch.compile gives the eager result, and the soft backward makes no denormal floats.

class CallsCompiled(nn.Module):
    "A wrapper whose forward calls a compiled function of its submodule (no `_orig_mod` to see): compiled code inside the model."
    def __init__(self, net, backend):
        super().__init__()
        self.net, self.run = net, torch.compile(net.forward, backend=backend)
    def forward(self, x): return self.run(x)

@pytest.mark.filterwarnings('ignore')  # dynamo's graph-break and recompile warnings
@pytest.mark.parametrize('backend', ['eager', 'aot_eager'])  # inductor's first compile takes minutes: not in the default run
def test_issue12_compile(backend):
    "Compiled pullbacks, soft forwards and models with compiled code inside equal the eager pullback; a compiled submodule is refused."
    torch._dynamo.reset()
    net, x = small_cnn(seed=4), torch.rand(2, 3, 8, 8)
    want = {T: gates.excitation_pullback(net, x, 1, T) for T in (0.3, 3.0)}
    assert rel_err(want[0.3], plain_gradient(net, x, 1)) > 0.1  # the gates matter: a graph that skipped them would fail
    pullback = torch.compile(lambda x, T: gates.excitation_pullback(net, x, 1, T), backend=backend)
    for T in (0.3, 3.0, 0.3): assert rel_err(pullback(x, T), want[T]) < 1e-6, T
    sweep = torch.compile(lambda x: [gates.soft_forward(net, x).pullback(1, T) for T in (0.3, 3.0)], backend=backend)
    for got, T in zip(sweep(x), (0.3, 3.0)): assert rel_err(got, want[T]) < 1e-6, T
    inside = CallsCompiled(net, backend).eval()
    inside(x)  # compiled once outside the gates: the cached code must not be reused inside them
    assert rel_err(gates.excitation_pullback(inside, x, 1, 0.3), want[0.3]) < 1e-6
    compiled_in_place = small_cnn(seed=4)
    compiled_in_place.compile(backend=backend)
    compiled_in_place(x)
    assert rel_err(gates.excitation_pullback(compiled_in_place, x, 1, 0.3), want[0.3]) < 1e-6
    wrapper = nn.Sequential(torch.compile(net, backend=backend)).eval()
    with pytest.raises(TypeError, match=r"its submodule '0' is compiled.*pass the module it wraps"):
        gates.excitation_pullback(wrapper, x, 1, 0.3)
    assert no_mode_left()
    torch._dynamo.reset()

def denormals(t): return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())

def test_issue12_no_denormals(monkeypatch):
    "Gates far below 0 and max-pool windows far from their maximum make values below float32's normal range: 0, the result unchanged."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Unflatten(1, (1, 4, 4)), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    x = torch.randn(4, 6) * 4  # some z / T, and some (x - window max) / T, below -100
    seen = {}
    def probe(name, t): t.register_hook(lambda g: seen.__setitem__(name, g))
    net[0].register_forward_hook(lambda m, a, out: probe('relu', out))     # the soft ReLU's input gradient
    net[2].register_forward_hook(lambda m, a, out: probe('maxpool', out))  # the soft max-pool's input gradient
    got, flushed = gates.excitation_pullback(net, x, 1, 0.02), dict(seen)
    assert denormals(flushed['relu']) == 0 and denormals(flushed['maxpool']) == 0
    with monkeypatch.context() as m:  # the same backward without the flush: the reference, and proof the test can fail
        m.setattr(gates, '_flush', lambda g: g)
        unflushed = gates.excitation_pullback(net, x, 1, 0.02)
    assert denormals(seen['relu']) > 0 and denormals(seen['maxpool']) > 0
    assert rel_err(got, unflushed) < 1e-7
    want = gates.excitation_pullback(net.double(), x.double(), 1, 0.02)  # float64, where these values are normal numbers
    assert rel_err(got.double(), want) < 1e-4  # float16's copy of z: the gate is within 1.1e-4

# ---------------------------------------------------------------------------------------------------------------------
# Issue 12: z rebuilt from an eval-mode batch_norm's input instead of a float16 copy, checked against a float64 module swap.

class RefSoft(torch.autograd.Function):
    "The reference soft gate, swapped in by hand: exact (clipped) ReLU forward, backward times sigmoid(z / T) (and sigmoid((upper - z) / T))."
    @staticmethod
    def forward(ctx, z, T, upper):
        ctx.save_for_backward(z); ctx.T, ctx.upper = T, upper
        return z.clamp(0, upper)
    @staticmethod
    def backward(ctx, g):
        (z,), T, up = ctx.saved_tensors, ctx.T, ctx.upper
        gate = torch.sigmoid(z / T) * (1 if up is None else torch.sigmoid((up - z) / T))
        return g * gate, None, None

class BNNet(nn.Module):
    "Conv/Linear -> BatchNorm -> ReLU in the styles the rebuild must handle, or not; `act` None: caught ReLUs, else the reference."
    def __init__(self, style, act=None):
        super().__init__()
        torch.manual_seed(0)
        self.style, self.act = style, act
        self.conv, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, affine=style != 'no affine')
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)  # a residual branch
        self.fc, self.bn1d, self.head = nn.Linear(6 * 16, 12), nn.BatchNorm1d(12), nn.Linear(12, 4)
        for bn in (self.bn, self.bn2, self.bn3, self.bn1d):  # statistics of unit-scale activations, weights not 1 and 0
            bn.running_mean.uniform_(-0.3, 0.3); bn.running_var.uniform_(0.5, 2.0)
            if bn.affine: nn.init.uniform_(bn.weight, 0.5, 1.5); nn.init.uniform_(bn.bias, -0.3, 0.3)
        self.eval()
    def relu(self, z, inplace=False, upper=None):
        if self.act is not None: return self.act(z, upper)
        if upper is not None: return F.relu6(z, inplace=inplace)
        return z.relu_() if inplace else F.relu(z)
    def forward(self, x):
        s = self.style
        y = self.bn(self.conv(x)) if s != 'functional' else F.batch_norm(
            self.conv(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        if s == 'changed in place': y += 0.1            # z is no longer what batch_norm made: the copy instead
        h = self.relu(y.view(y.shape) if s == 'view' else y, inplace=s == 'in place', upper=6.0 if s == 'relu6' else None)
        if s == 'used elsewhere': h = h + 0.5 * y        # the batch_norm output feeds something else too
        y = self.bn2(self.conv2(h))
        if s == 'residual': y += h                              # z = batch_norm + a ReLU output (ResNet's identity)
        if s == 'residual bn': y = y + self.bn3(self.conv3(h))  # z = batch_norm + batch_norm (ResNet's downsample)
        if s == 'residual raw': y += self.conv3(h)               # a conv output, which nothing keeps: the copy instead
        h = self.relu(y, inplace=True)
        h = F.max_pool2d(h, 2).flatten(1)
        return self.head(self.relu(self.bn1d(self.fc(h))))

REBUILT = {'sequential': 3, 'in place': 3, 'functional': 3, 'used elsewhere': 3, 'relu6': 3, 'no affine': 3,
           'residual': 3, 'residual bn': 3, 'changed in place': 2, 'view': 2, 'residual raw': 2}  # ReLUs whose z is rebuilt

@pytest.mark.parametrize('style', list(REBUILT))
def test_issue12_batchnorm_rebuild(style, monkeypatch):
    "The pullback of a BatchNorm net equals a float64 module swap; z is rebuilt where batch_norm made it, copied elsewhere."
    copies = []
    keep = gates._keep_z
    monkeypatch.setattr(gates, '_keep_z', lambda z: copies.append(1) or keep(z))
    x = torch.rand(3, 3, 8, 8)
    for T in (0.1, 1.0):
        ref_net = BNNet(style, act=lambda z, upper: RefSoft.apply(z, T, upper)).double()
        want = plain_gradient(ref_net, x.double(), [0, 2, 1])
        copies.clear()
        net = BNNet(style)
        got = gates.excitation_pullback(net, x, [0, 2, 1], T, maxpool='hard')
        assert len(copies) == 3 - REBUILT[style], copies
        assert rel_err(got.double(), want) < (1e-5 if REBUILT[style] == 3 else 1e-4), (T, rel_err(got.double(), want))
        got64 = gates.excitation_pullback(net.double(), x.double(), [0, 2, 1], T, maxpool='hard')
        assert rel_err(got64, want) < 1e-12  # the rebuilt z is batch_norm's own output, bit for bit
    sf = gates.soft_forward(BNNet(style), x, maxpool='hard')  # one forward, backwards at two T: z rebuilt in each
    for T in (0.1, 1.0):
        ref_net = BNNet(style, act=lambda z, upper: RefSoft.apply(z, T, upper)).double()
        assert rel_err(sf.pullback([0, 2, 1], T).double(), plain_gradient(ref_net, x.double(), [0, 2, 1])) < 1e-4

def test_issue12_batchnorm_saved_bytes(monkeypatch):
    "Rebuilding z stores nothing new: the pullback saves what the plain gradient saves, but for BatchNorm's biases (float16 copies did)."
    from excitation_workbench.bench import saved_bytes
    net, x = BNNet('sequential'), torch.rand(3, 3, 8, 8)
    plain = saved_bytes(lambda: plain_gradient(net, x, 1))
    rebuilt = saved_bytes(lambda: gates.excitation_pullback(net, x, 1, 0.3, maxpool='hard'))
    monkeypatch.setattr(gates._Recipes, 'get', lambda self, t: None)  # no rebuild: float16 copies of z
    copied = saved_bytes(lambda: gates.excitation_pullback(net, x, 1, 0.3, maxpool='hard'))
    biases = sum(m.bias.nbytes for m in (net.bn, net.bn2, net.bn1d))  # 96 bytes, which BatchNorm's own backward does not keep
    assert rebuilt - plain <= biases + 24  # and the 3 target indices the gather keeps
    assert copied - rebuilt >= 2 * (2 * 3 * 6 * 8 * 8 + 3 * 12) - biases  # 2 bytes per element of each z

@pytest.mark.parametrize('arch, copies', [('resnet18', 1), ('mobilenet_v2', 0)])
def test_issue12_rebuild_torchvision(arch, copies, monkeypatch):
    "ResNet's ReLUs after BatchNorm and after its residual adds are rebuilt (but the one whose identity is a max-pool output), MobileNet's all."
    import torchvision
    from excitation_workbench.zoo import calibrate_batchnorm
    torch.manual_seed(0)
    net, x = calibrate_batchnorm(getattr(torchvision.models, arch)(), torch.rand(4, 3, 32, 32)), torch.rand(2, 3, 32, 32)
    kept = []
    keep = gates._keep_z
    monkeypatch.setattr(gates, '_keep_z', lambda z: kept.append(1) or keep(z))
    got = gates.excitation_pullback(net, x, 1, 0.3)
    assert len(kept) == copies
    # float32 through the depth, z's rounding amplified by the gate: 3e-5 (resnet18), 1.6e-4 (mobilenet_v2; 7.4e-4 with copies)
    assert rel_err(got.double(), gates.excitation_pullback(net.double(), x.double(), 1, 0.3)) < 3e-4

class ReluThenRelu6(nn.Module):
    "Linear, ReLU, ReLU6 on the ReLU's output (its z is that output, which the first soft ReLU keeps), Linear."
    def __init__(self, act=None):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.act = nn.Linear(5, 16), nn.Linear(16, 3), act
        with torch.no_grad(): self.fc1.weight.mul_(8)  # z above 6 at many units
        self.eval()
    def forward(self, x):
        z = self.fc1(x)
        if self.act: return self.fc2(self.act(self.act(z, None), 6.0))
        return self.fc2(F.relu6(F.relu(z)))

def test_issue12_relu6_of_relu(monkeypatch):
    "z that is an earlier ReLU's output is read from it, not copied, and never changed: repeated backwards give the float64 module swap."
    x = torch.randn(4, 5)
    assert (F.relu(ReluThenRelu6().fc1(x)) > 6).any()
    copies = []
    keep = gates._keep_z
    monkeypatch.setattr(gates, '_keep_z', lambda z: copies.append(1) or keep(z))
    sf = gates.soft_forward(ReluThenRelu6(), x)
    assert len(copies) == 1  # the first ReLU's z, a Linear output
    for T in (0.5, 3.0, 0.5):  # the kept output must survive each backward unchanged
        want = plain_gradient(ReluThenRelu6(lambda z, up: RefSoft.apply(z, T, up)).double(), x.double(), 1)
        assert rel_err(sf.pullback(1, T).double(), want) < 1e-4, T

def test_double_backward_jvp():
    "The pullback's linear map differentiated once more (the double-backward JVP trick, at grad 0) gives each class's pullback."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)).eval()
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    with gates.soft_gates(net, 0.5):
        x0 = x.clone().requires_grad_()
        logits = net(x0)
        u = torch.zeros_like(logits, requires_grad=True)  # the grad at the logits: the pullback is linear in it
        g = torch.autograd.grad(logits, x0, u, create_graph=True)[0]
        jvp = torch.autograd.grad(g, u, v)[0]  # [N, classes]: <pullback of class c, v> per sample
    want = torch.stack([(gates.excitation_pullback(net, x, c, 0.5) * v).flatten(1).sum(1) for c in range(3)], 1)
    assert jvp.abs().min() > 0 and rel_err(jvp, want) < 1e-5
