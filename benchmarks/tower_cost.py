"""What a bigger smoke tower would cost: image and text encoding of the shipped configs.

The smoke profile's tower is chosen against CI's time budget, since every notebook encodes its
images and trains prompts through the text tower. For each open_clip config shipped in
``pfl/clip/assets`` (``pfl-tiny``, ``pfl-small``) and image side, this times the image tower on a
batch of 16 images and the text tower on 60 prompts (Bayes-PFL's text work per image at the
smoke recipe: 2 banks x B = 3 prompts x R = 10 samples), in the smoke profile's float64 on one
thread, best of ``--repeats``, random init (the cost does not depend on the weights), and prints
each as a ratio to ``pfl-tiny`` at 224 px measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/tower_cost.py
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

import pfl
from pfl.clip.backbone import create_clip
from pfl.config import BackboneConfig


def best_time(fn, arg, repeats: int) -> float:
    """Least wall time of ``fn(arg)`` over ``repeats`` calls, after one warm-up call."""
    fn(arg)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--towers", nargs="+", default=["pfl-tiny", "pfl-small"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    pfl.setup()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a damaged object."] * 60)
    rows = []
    for name in args.towers:
        for size in args.sizes:
            clip = create_clip(BackboneConfig(model_name=name, image_size=size, precision="fp64"),
                               load=False).eval()
            images = torch.randn(16, 3, size, size, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                img = best_time(clip.encode_image, images, args.repeats) / 16
                txt = best_time(clip.encode_text, tokens, args.repeats)
            params = sum(p.numel() for p in clip.visual.parameters())
            rows.append((name, size, params, img, txt))
            print(f"  {name} {size} px: {img * 1e3:.1f} ms per image, {txt * 1e3:.1f} ms per 60 "
                  "prompts", flush=True)
    ref = next((r for r in rows if r[:2] == ("pfl-tiny", 224)), rows[0])
    print(f"\n{'tower':10s} {'size':>5s} {'visual params':>14s} {'image ms':>9s} {'x':>6s} "
          f"{'text ms':>8s} {'x':>6s}")
    for name, size, params, img, txt in rows:
        print(f"{name:10s} {size:5d} {params / 1e6:13.2f}M {img * 1e3:9.1f} {img / ref[3]:6.2f} "
              f"{txt * 1e3:8.1f} {txt / ref[4]:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
