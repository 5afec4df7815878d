"""Seconds per training step, float32 against bfloat16 autocast, measured side by side in one process
(same model, same batch, alternating), on this machine's CPU or a GPU.

    python benchmarks/train_step_speed.py --n 96 --m 144 --batch 8 --patch 128 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from nicd.codec.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--m", type=int, default=144)
    parser.add_argument("--hyper-width", type=int, default=None, help="h_s hidden width (default M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model({"kind": "mean-scale", "n": args.n, "m": args.m, "h": args.hyper_width}).to(device)
    x = torch.rand(args.batch, 3, args.patch, args.patch, device=device)
    q = torch.randint(0, 8, (args.batch,), device=device)

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, q)
        rate = sum(torch.log(lk.float()).sum() for lk in out["likelihoods"].values())
        (((out["x_hat"].float() - x) ** 2).sum() - rate).backward()

    times = {False: [], True: []}
    for bf16 in (False, True):  # warm-up
        step(bf16)
    for _ in range(args.repeats):
        for bf16 in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(bf16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[bf16].append(time.perf_counter() - t0)
    fp32, bf16 = min(times[False]), min(times[True])
    print(f"{args.batch}×{args.patch}² N={args.n} M={args.m}{f' h={args.hyper_width}' if args.hyper_width else ''} on {args.device}, {args.threads} thread(s): "
          f"float32 {fp32:.3f} s/step, bfloat16 autocast {bf16:.3f} s/step, speed-up {fp32 / bf16:.2f}×")


if __name__ == "__main__":
    main()
