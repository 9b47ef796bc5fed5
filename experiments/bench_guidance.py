"""Benchmark: batched JointCFG step time vs. (number of branches × one single-branch forward).

    .venv/bin/python experiments/bench_guidance.py [--device cpu|cuda] [--repeats 10] [--warmup 3]

Model: the ``small`` preset at the default latent shapes (video [B,16,192,8,8], audio [B,1,200,64]),
with random CLIP-like condition features (text tokens [B,77,512], pooled [B,512], image [B,512]) and a
negative prompt, so every branch is computed: w_v, w_a, w_txt, w_neg, w_img all non-zero.

Reports, under torch.inference_mode (median of ``--repeats`` after ``--warmup``):
  single   one forward of the positive branch alone (batch B, mode full)
  jointcfg one guided step: JointCFG.__call__ = build branches + ONE batched forward + combine
           (5 branches: pos, iso, no_text, neg_text, no_image; iso_v/iso_a share the iso branch)
  literal6 the same step with the seed's 6 branches (iso_v and iso_a separately) batched in one forward
  sequential the 6 branches one after another (the seed code's way)
  ratio = jointcfg / (branches × single)   — target ≤ 1.05
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import jointdit  # noqa: F401
from jointdit.diffusion.guidance import JointCFG
from jointdit.models import Condition, build_model


def timeit(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.preset).to(device, dtype).eval()
    # non-zero adaLN so every branch does real work (a fresh adaLN-Zero model is the identity)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "_out" in name:
                p.normal_(0, 0.02)
    b = args.batch
    zv = torch.randn(b, 16, 192, 8, 8, device=device, dtype=dtype)
    za = torch.randn(b, 1, 200, 64, device=device, dtype=dtype)
    tv, ta = torch.full((b,), 0.5, device=device), torch.full((b,), 0.5, device=device)
    cfgd = model.config
    cond = Condition(torch.randn(b, cfgd.text_len, cfgd.text_token_dim, device=device),
                     torch.randn(b, cfgd.text_pooled_dim, device=device),
                     torch.randn(b, cfgd.image_embed_dim, device=device))
    neg = Condition(torch.randn(1, cfgd.text_len, cfgd.text_token_dim, device=device),
                    torch.randn(1, cfgd.text_pooled_dim, device=device))
    g = JointCFG(w_v=1.2, w_a=1.2, w_txt=1.5, w_neg=0.5, w_img=1.0)
    n_branches = len(g.branches(cond, neg, b))
    branches6 = g.branches(cond, neg, b)
    iso = branches6[1]
    branches6 = [branches6[0], type(iso)("iso_v", "iso_v", iso.cond), type(iso)("iso_a", "iso_a", iso.cond),
                 *branches6[2:]]

    def literal6():
        c = Condition.cat([br.cond for br in branches6])
        n = len(branches6)
        v, a = model(zv.repeat(n, 1, 1, 1, 1), za.repeat(n, 1, 1, 1), tv.repeat(n), ta.repeat(n), c,
                     [br.mode for br in branches6 for _ in range(b)])
        return g.combine({br.name: (vv, aa) for br, vv, aa in zip(branches6, v.split(b), a.split(b))})

    def sequential():
        return g.combine({br.name: model(zv, za, tv, ta, br.cond, br.mode) for br in branches6})

    with torch.inference_mode():
        single = timeit(lambda: model(zv, za, tv, ta, branches6[0].cond, "full"), device, args.warmup, args.repeats)
        joint = timeit(lambda: g(model, zv, za, tv, ta, cond, neg), device, args.warmup, args.repeats)
        lit = timeit(literal6, device, args.warmup, args.repeats)
        seq = timeit(sequential, device, args.warmup, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={name} preset={args.preset} batch={b} dtype={args.dtype} warmup={args.warmup} repeats={args.repeats}")
    print(f"single forward (B={b})            {single * 1e3:9.2f} ms")
    print(f"jointcfg step ({n_branches} branches, batched) {joint * 1e3:9.2f} ms  "
          f"ratio = {joint / (n_branches * single):.3f}   (vs 6 single forwards: {joint / (6 * single):.3f})")
    print(f"literal 6 branches, batched       {lit * 1e3:9.2f} ms  ratio = {lit / (6 * single):.3f}")
    print(f"6 branches one after another      {seq * 1e3:9.2f} ms  ratio = {seq / (6 * single):.3f}")


if __name__ == "__main__":
    main()
