"""Dense skips: does UNet++'s concatenation of X(i,0..j-1) cost memory traffic worth removing? (CPU or GPU)

    python benchmarks/bench_concat.py [--device cpu|cuda] [--size 512]

For every nested node of em-membranes' architecture (X(i,j), j >= 1) on one 512 x 512 image, the first convolution
of the node three ways, in the memory format predict uses (channels-last):
- cat: ``torch.cat`` of the j skips and the upsampled input, then one convolution (what the network does);
- buffer: the inputs written into a preallocated buffer (``torch.cat(out=)``), then the same convolution;
- split: the convolution's weight split by input and the partial convolutions summed (no concatenation at all);
and the ReLU fused or not (the folded network's conv + ReLU, against ``relu_`` in place). Prints the time per node
and in all, with the CPU flags and precision; results agree to float rounding (checked).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

FEATURES = (32, 64, 128, 256, 512)


def timed(fn, repeats=5):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    dev = torch.device(args.device)
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"device {dev}, CPU flags {' '.join(flags)}, threads {torch.get_num_threads()}, fp32, channels-last\n")
    print("| node | inputs x ch | cat+conv ms | buffer+conv ms | split convs ms | split/cat |")
    print("|---|---|---|---|---|---|")
    tot = {"cat": 0.0, "buf": 0.0, "split": 0.0}
    torch.manual_seed(0)
    with torch.inference_mode():
        for i in range(4):
            f = FEATURES[i]
            s = args.size >> i
            for j in range(1, 5 - i):
                parts = [
                    torch.randn(1, f, s, s, device=dev).contiguous(memory_format=torch.channels_last)
                    for _ in range(j + 1)
                ]
                w = torch.randn(f, f * (j + 1), 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
                b = torch.randn(f, device=dev)
                ws = [w[:, c * f : (c + 1) * f].contiguous(memory_format=torch.channels_last) for c in range(j + 1)]
                buf = torch.empty(1, f * (j + 1), s, s, device=dev).contiguous(memory_format=torch.channels_last)

                def cat():
                    return F.conv2d(torch.cat(parts, 1), w, b, padding=1)

                def buffered():
                    for c, p in enumerate(parts):
                        buf[:, c * f : (c + 1) * f] = p
                    return F.conv2d(buf, w, b, padding=1)

                def split():
                    out = F.conv2d(parts[0], ws[0], b, padding=1)
                    for p, wc in zip(parts[1:], ws[1:]):
                        out += F.conv2d(p, wc, None, padding=1)
                    return out

                ref = cat()
                assert torch.allclose(split(), ref, atol=1e-2, rtol=1e-3) and torch.allclose(buffered(), ref, atol=1e-3)
                t = {"cat": timed(cat), "buf": timed(buffered), "split": timed(split)}
                for k in tot:
                    tot[k] += t[k]
                print(
                    f"| x_{i}_{j} | {j + 1} x {f} | {t['cat'] * 1e3:.1f} | {t['buf'] * 1e3:.1f} | "
                    f"{t['split'] * 1e3:.1f} | {t['split'] / t['cat']:.2f} |"
                )
        print(
            f"| **all** | | {tot['cat'] * 1e3:.0f} | {tot['buf'] * 1e3:.0f} | {tot['split'] * 1e3:.0f} | "
            f"{tot['split'] / tot['cat']:.2f} |"
        )
        x = torch.randn(1, 32, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 32, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
        t_sep = timed(lambda: F.relu(F.conv2d(x, w, None, padding=1)))
        t_inp = timed(lambda: F.conv2d(x, w, None, padding=1).relu_())
        print(f"\nconv 32->32 at {args.size}^2 + ReLU: separate {t_sep * 1e3:.1f} ms, in place {t_inp * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
