"""Where the pullback's extra time goes on a GPU: wall time against the GPU's kernel time (torch.profiler), plain gradient and pullback.

Run from the repo root on a machine with CUDA: `python tools/profile_gpu.py`. Random weights, BatchNorm calibrated, 224x224, T = 1.
"""
import time, statistics, torch
from torch.profiler import profile, ProfilerActivity
from excitation_workbench.gates import excitation_pullback
from excitation_workbench.bench import plain_gradient, _model

def main(models=('resnet50', 'vgg11_bn'), batches=(64, 1), rounds=10):
    device = torch.device('cuda')
    for name in models:
        for batch in batches:
            model = _model(name, 'calibrated', 224, device)
            x = torch.rand(batch, 3, 224, 224, device=device)
            fns = {'plain': lambda: plain_gradient(model, x, 1), 'pullback': lambda: excitation_pullback(model, x, 1),
                   'pullback hard pool': lambda: excitation_pullback(model, x, 1, maxpool='hard')}
            for f in fns.values(): f(); f()  # warm up
            cells = []
            for k, f in fns.items():
                walls = []
                for _ in range(rounds):
                    torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize()
                    walls.append(time.perf_counter() - t)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5): f()
                    torch.cuda.synchronize()
                kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
                cells.append(f'{k}: wall {statistics.median(walls) * 1e3:.1f} ms, GPU kernels {kernels:.1f} ms')
            print(f'{name}, batch {batch}, {torch.cuda.get_device_name()}: ' + ' | '.join(cells), flush=True)

if __name__ == '__main__': main()
