"Property tests of the excitation pullback: random Linear/ReLU networks against the closed form, many shapes and seeds."
import pytest, torch, torch.nn as nn
from excitation_workbench.gates import excitation_pullback, relu_sites, GATES

def closed_form(linears, x, c, T, gate):
    "W_1^T diag(g_1) ... W_{L+1}^T e_c for one sample, with g_l = gate(z_l / T)."
    gates, h = [], x
    for lin in linears[:-1]:
        z = lin.weight @ h + lin.bias
        gates.append(gate(z / T)); h = z.clamp(min=0)
    v = linears[-1].weight[c]
    for lin, g in zip(linears[-2::-1], gates[::-1]): v = lin.weight.T @ (g * v)
    return v

@pytest.mark.parametrize('seed', range(12))
def test_random_mlp_matches_closed_form(seed):
    rng = torch.Generator().manual_seed(seed)
    widths = torch.randint(1, 9, (int(torch.randint(3, 7, (1,), generator=rng)),), generator=rng).tolist()  # 2 to 5 linears
    torch.manual_seed(seed)
    linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    styles = [nn.ReLU(), nn.ReLU(inplace=True)]
    layers = []
    for i, lin in enumerate(linears):
        layers.append(lin)
        if i < len(linears) - 1: layers.append(styles[i % 2])
    net = nn.Sequential(*layers).double()
    x = torch.randn(3, widths[0], dtype=torch.float64)
    c = torch.randint(0, widths[-1], (3,), generator=rng)
    T = float(torch.empty(1).uniform_(0.05, 3.0, generator=rng))
    gate = ['sigmoid', 'normal_cdf'][seed % 2]
    want = torch.stack([closed_form(linears, x[i], int(c[i]), T, GATES[gate]) for i in range(3)])
    got = excitation_pullback(net, x, c, T, gate=gate)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(relu_sites(net, x)) == len(linears) - 1

def test_no_relu_is_an_error():
    with pytest.raises(ValueError, match='no ReLU'):
        excitation_pullback(nn.Linear(4, 2), torch.randn(2, 4), 0, 0.3)

def test_float32_gate_error_is_small():
    "Float16 storage of z: the float32 pullback stays within 1e-3 of the float64 one on a deep random MLP."
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 5))
    for m in net:
        if isinstance(m, nn.Linear): nn.init.normal_(m.weight, std=(2 / 32) ** 0.5)
    x = torch.randn(16, 32)
    p32 = excitation_pullback(net, x, 1, 0.3)
    p64 = excitation_pullback(net.double(), x.double(), 1, 0.3)
    assert ((p32.double() - p64).norm() / p64.norm()) < 1e-3
