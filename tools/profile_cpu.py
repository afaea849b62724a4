"""Where the pullback's extra time goes on a CPU: the forward, the activations' backward (z rebuilt, the gate, the flush) and the
max-pools' backward, plain gradient against pullback.

Run from the repo root: `python tools/profile_cpu.py [threads]`. Random weights, BatchNorm calibrated, 224x224, batch 2, T = 1.
Forward and whole calls: wall time, medians of interleaved rounds. The backward nodes: CPU time in `torch.profiler` (which adds
its own cost to every op), per call.
"""
import sys, statistics, torch
from torch.profiler import profile, ProfilerActivity
from excitation_workbench import gates
from excitation_workbench.bench import plain_gradient, round_seconds, _model

ACTIVATIONS = {'ReluBackward0', 'HardtanhBackward0', '_SoftReLUBackward'}  # the backward nodes of ReLU, ReLU6 and the soft gate
POOLS = {'MaxPool2DWithIndicesBackward0', '_SoftMaxPoolBackward'}
PARTS = {'aten::batch_norm': 'z rebuilt', 'aten::add_': 'z rebuilt', 'aten::add': 'z rebuilt',
         'aten::softplus_backward': 'gate kernel', 'aten::threshold_backward': 'gate kernel', 'aten::hardtanh_backward': 'gate kernel',
         'aten::hardshrink': 'flush'}

def nodes(fn, calls=3):
    "CPU ms per call in the activations' and max-pools' backward nodes, the activations' split into `PARTS` (the rest: Python and small ops)."
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls): fn()
    ms = dict.fromkeys(['activations', 'z rebuilt', 'gate kernel', 'flush', 'max-pools'], 0.0)
    for e in prof.events():
        if e.name in POOLS: ms['max-pools'] += e.cpu_time_total / 1e3 / calls
        if e.name not in ACTIVATIONS: continue
        ms['activations'] += e.cpu_time_total / 1e3 / calls
        for child in e.cpu_children:
            if child.name in PARTS: ms[PARTS[child.name]] += child.cpu_time_total / 1e3 / calls
    return ms

def main(models=('resnet50', 'vgg11_bn', 'densenet121', 'mobilenet_v2'), batch=2, rounds=7):
    cpu = torch.device('cpu')
    print(f'CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {batch}, 224x224, T = {gates.TEMPERATURE}: ms per call')
    print(f"{'':14}{'':10}{'whole':>8}{'forward':>9}{'activations':>12}{'z rebuilt':>10}{'gate':>7}{'flush':>7}{'max-pools':>10}")
    for name in models:
        model = _model(name, 'calibrated', 224, cpu)
        x = torch.rand(batch, 3, 224, 224)
        xg = x.clone().requires_grad_()
        def soft_forward():
            with gates.soft_gates(model): model(xg.clone())
        walls = round_seconds({'plain': lambda: plain_gradient(model, x, 1), 'pullback': lambda: gates.excitation_pullback(model, x, 1),
                               'plain forward': lambda: model(xg.clone()), 'soft forward': soft_forward}, rounds, cpu)
        med = {k: statistics.median(v) * 1e3 for k, v in walls.items()}
        for what, fn in (('plain', lambda: plain_gradient(model, x, 1)), ('pullback', lambda: gates.excitation_pullback(model, x, 1))):
            ms = nodes(fn)
            forward = med['plain forward' if what == 'plain' else 'soft forward']
            print(f"{name if what == 'plain' else '':14}{what:10}{med[what]:8.1f}{forward:9.1f}{ms['activations']:12.1f}"
                  f"{ms['z rebuilt']:10.1f}{ms['gate kernel']:7.1f}{ms['flush']:7.1f}{ms['max-pools']:10.1f}", flush=True)

if __name__ == '__main__':
    if len(sys.argv) > 1: torch.set_num_threads(int(sys.argv[1]))
    main()
