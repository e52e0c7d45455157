"""Benchmark: per-image inference time and peak memory of every method, as appendix Table A.3.

Every method (the peers of :data:`pfl.baselines.REGISTRY` and Bayes-PFL with B = 3, R = 10)
runs on the same backbone, image size, batch and images, in this one process, from pixels to
maps and scores (the image tower is part of every method's time; text features a method
caches per class are warmed up first, as in a long evaluation). Time is the median over
``--repeats`` runs of a batch, divided by the batch size; each method's time is also given as
a ratio to APRIL-GAN's. Memory is the peak while the method runs: on CUDA
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``); on CPU the process's
resident set size, sampled every 0.5 ms by a thread (``/proc/self/statm``; freed heap is
returned to the OS with glibc's ``malloc_trim`` before each method), so very short spikes can
be missed. Both the total peak and the rise above the level before the call are
printed.

It also times a straightforward reference implementation of Bayes-PFL's inference, written
here from the paper's equations: for every image, every Monte Carlo sample, every bank prompt
and both states, one text-tower call on the full 77-token context; a Python loop over layers
and prompt pairs, with per-head RCA attention and both logits upsampled before the softmax.
``pfl``'s maps and scores must equal it to 1e-4 (the script exits with status 1 otherwise);
the speed-up of pfl's batched path is printed, and the maps' largest difference.

The goals of issue #20 are printed as ratios of Bayes-PFL's time to APRIL-GAN's, with the
peak memory per image: within 1.15x on a GPU, within 2x on the CPU smoke profile. Options:

* ``--dtype float64`` builds everything in float64 (the smoke profile's reproducible mode);
* ``--half fp16`` (or ``bf16``) also times APRIL-GAN and Bayes-PFL under ``torch.autocast``
  in that precision (Bayes-PFL through ``predict(precision=...)``: towers, RCA and logits in
  half, maps in full precision) and prints the half maps' and scores' largest difference
  from the full-precision ones (same seeds);
* ``--map-std`` also times Bayes-PFL with its per-pixel uncertainty map (``map_std``);
* ``--compiled-maps`` also times Bayes-PFL with its maps made by one compiled kernel
  (``predict(map_kernel="compiled")``, :func:`pfl.method.maps.compiled_maps`; needs a C++
  compiler on a CPU, Triton on a GPU; the compilation is part of the warm-up) and checks
  those maps against the reference too;
* ``--interleaved K`` also times APRIL-GAN and Bayes-PFL alternately K times and prints the
  ratio of their fastest runs: on a machine shared with other jobs the load can change
  several-fold between the methods' turns, which medians taken one method after the other
  do not survive. With one CPU thread it also gives the ratio of the least CPU time of the
  calling thread (time spent waiting for a core does not count: the steadiest figure on a
  loaded machine).

Usage::

    python benchmarks/inference.py                      # smoke: pfl-tiny at 224 px, CPU
    python benchmarks/inference.py --profile paper-random --device cuda   # ViT-L-14-336, 518 px
    python benchmarks/inference.py --results figures/07_results.csv --dataset target
    python benchmarks/inference.py --dtype float64 --half bf16 --map-std

``paper-random`` builds ViT-L-14-336 at 518 px with a random init (timing does not need the
weights; nothing is downloaded). Timings depend on the machine: compare ratios, not
milliseconds. ``--results`` fills the metric columns from a :class:`pfl.run.results.Results` CSV
(e.g. the one notebook 07 writes); without it they are left empty, because untrained methods
on random images have no metrics worth printing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pfl.baselines import REGISTRY, build
from pfl.clip.backbone import Backbone, create_clip
from pfl.config import BackboneConfig, ModelConfig
from pfl.method.contract import Batch, Prediction
from pfl.method.model import HALF, BayesPFL
from pfl.method.prompts import class_words, template_text
from pfl.method.sampling import draw_noise
from pfl.run.timing import measure, run_once

PROFILES = {
    "smoke": BackboneConfig(model_name="pfl-tiny", image_size=224),
    "paper-random": BackboneConfig(model_name="ViT-L-14-336", image_size=518,
                                   layers=(6, 12, 18, 24)),
}
CLASS_NAMES = ("bottle", "metal_nut", "screw", "pcb1")  # cycled over the batch
TOLERANCE = 1e-4
COMPILED = "Bayes-PFL (compiled maps)"
METRIC_COLUMNS = (("image_auroc", "img AUROC"), ("image_ap", "img AP"),
                  ("pixel_auroc", "px AUROC"), ("pixel_ap", "px AP"))


# --- backbone ----------------------------------------------------------------------------------
def make_backbone(profile: str, device: str) -> Backbone:
    """The profile's tower; ``paper-random`` is built with a seeded random init, no weights."""
    cfg = PROFILES[profile]
    if profile == "smoke":
        clip = create_clip(cfg)
    else:
        import open_clip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            clip = open_clip.create_model(cfg.model_name, pretrained=None,
                                          force_image_size=cfg.image_size)
    return Backbone(clip, cfg.layers).to(device)


# --- Bayes-PFL as a Method (its own predict when the model has one) ----------------------------
class BayesPFLInference:
    """``predict`` of Bayes-PFL, with its half-precision and uncertainty switches."""

    name = "Bayes-PFL"

    def __init__(self, model: BayesPFL, precision: str | None = None, map_std: bool = False,
                 map_kernel: str = "fused"):
        self.model, self.backbone = model, model.backbone
        self.precision, self.map_std, self.map_kernel = precision, map_std, map_kernel

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        return self.model.predict(batch, generator, map_std=self.map_std,
                                  precision=self.precision, map_kernel=self.map_kernel)


class Autocast:
    """A peer's ``predict`` under ``torch.autocast`` (its half-precision time)."""

    def __init__(self, method, device: torch.device, precision: str):
        self.method, self.backbone, self.name = method, method.backbone, method.name
        self.device, self.dtype = device, HALF[precision]

    def predict(self, batch: Batch, generator: torch.Generator) -> Prediction:
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            pred = self.method.predict(batch, generator)
        dt = torch.get_default_dtype()
        return Prediction(maps=pred.maps.to(dt), scores=pred.scores.to(dt))


# --- the straightforward reference --------------------------------------------------------------
def text_full_context(backbone: Backbone, emb: torch.Tensor, eot: int) -> torch.Tensor:
    """One prompt ``(77, D)`` through the whole text tower, all 77 positions -> ``(E,)``."""
    clip = backbone.clip
    x = (emb + clip.positional_embedding)[None]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))[0, eot]
    proj = clip.text_projection
    x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def rca_loop(model: BayesPFL, t: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    """RCA for one text feature ``(E,)`` on one layer's patches ``(T, E)``, head by head."""
    rca = model.rca
    q = rca.query(t)
    e = t.shape[0]
    d = e // rca.heads
    heads = []
    for h in range(rca.heads):
        sl = slice(h * d, (h + 1) * d)
        att = torch.softmax((fs[:, sl] @ q[sl]) * rca.scale, dim=0)  # over patches
        heads.append(att @ fs[:, sl])
    return F.normalize(torch.cat(heads) + t, dim=-1)


def reference_bayes_pfl(model: BayesPFL, images: torch.Tensor, cls_names: list[str],
                        seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bayes-PFL inference the straightforward way (module docstring): maps (N,S,S), scores."""
    bb, cfg = model.backbone, model.cfg
    B, R, P, Q = cfg.n_prompts, cfg.mc_test, cfg.n_ctx, cfg.n_state
    D, S = bb.text_width, bb.image_size
    gh, gw = bb.grid
    maps, scores = [], []
    with torch.no_grad():
        for n in range(images.shape[0]):
            feats = bb.encode_image(images[n:n + 1])
            dt = model.tau_pix.dtype
            g, patches = feats.global_.to(dt), feats.patches[0].to(dt)
            ids = bb.tokenize([template_text(P, Q, class_words(cls_names[n]))])
            eot = int(ids.argmax(-1))
            emb0 = bb.token_embedding(ids.to(images.device))[0]
            eps = draw_noise([seeds[n]], (3, R, D), dtype=g.dtype, device=images.device)[0]
            # One sample at a time: the ISD offset (context) and the two IAD offsets (states).
            offsets = []
            for r in range(R):
                isd = model.isd(model.isd_input(g), 1, eps=eps[0, r].view(1, 1, D)).z.view(D)
                iad = [flow(model.iad_state[s:s + 1], 1, eps=eps[1 + s, r].view(1, 1, D)).z.view(D)
                       for s, flow in enumerate((model.iad_normal, model.iad_abnormal))]
                offsets.append((isd, iad))
            pairs = []  # (normal, abnormal) text features, bank-major then sample
            for b in range(B):
                for isd, iad in offsets:
                    pair = []
                    for s, state in enumerate((model.bank.normal, model.bank.abnormal)):
                        emb = emb0.clone()
                        emb[1:1 + P] = model.bank.context[b] + isd
                        emb[1 + P:1 + P + Q] = state[b] + iad[s]
                        pair.append(text_full_context(bb, emb, eot))
                    pairs.append(pair)
            total = torch.zeros(S, S, device=images.device)
            for layer in range(patches.shape[0]):
                fs = F.normalize(patches[layer] @ model.proj.weight[layer].T, dim=-1)
                for t_n, t_a in pairs:
                    refined = torch.stack([rca_loop(model, t_n, fs), rca_loop(model, t_a, fs)])
                    logits = model.tau_pix.exp() * (refined @ fs.T)  # (2, T)
                    up = F.interpolate(logits.view(1, 2, gh, gw), size=(S, S), mode="bilinear",
                                       align_corners=False)[0]
                    total += up.softmax(0)[1]
            maps.append(total / (patches.shape[0] * len(pairs)))
            gn = F.normalize(g[0], dim=-1)
            probs = []
            for t_n, t_a in pairs:
                phi = F.normalize(model.phi(torch.stack([t_n, t_a])), dim=-1)
                probs.append((model.tau_img.exp() * (phi @ gn)).softmax(0)[1])
            scores.append(torch.stack(probs).mean())
    return torch.stack(maps), torch.stack(scores)


def metric_cells(results_csv: str | None, dataset: str, method: str) -> list[str]:
    if results_csv is None:
        return ["" for _ in METRIC_COLUMNS]
    from pfl.run.results import Results

    frame = Results.from_csv(results_csv).frame
    f = frame[(frame["dataset"] == dataset) & (frame["method"] == method)]
    cells = []
    for metric, _ in METRIC_COLUMNS:
        values = f[f["metric"] == metric].groupby("seed")["value"].mean()
        cells.append(f"{100 * values.mean():.1f}" if len(values) else "")
    return cells


GOALS = {"cuda": 1.15, "cpu": 2.0}  # issue #20: Bayes-PFL / APRIL-GAN time


def print_table(rows: dict, batch: int, results: str | None, dataset: str, what: str) -> None:
    base = rows.get("APRIL-GAN", {}).get("ms")
    head = ["method", *(c for _, c in METRIC_COLUMNS), "peak (MB)", "rise (MB)",
            "rise/img (MB)", "time (ms/img)", "x APRIL-GAN"]
    table = [head]
    for name, r in rows.items():
        ratio = f"{r['ms'] / base:.2f}" if base else ""
        table.append([name, *metric_cells(results, dataset, name.split(" (")[0]),
                      f"{r['peak_mb']:.0f}", f"{r['rise_mb']:.0f}", f"{r['rise_mb'] / batch:.1f}",
                      f"{r['ms']:.1f}", ratio])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print(f"Table A.3-style ({what}; metrics: "
          f"{'from ' + results + ', ' + dataset if results else 'not given'}):")
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--ref-batch", type=int, default=2,
                        help="images the slow reference runs on (its time is per image too)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"peers to time (default all: {list(REGISTRY)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives steadier timings on a shared machine)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="default dtype of every model and image (float64: smoke's exact mode)")
    parser.add_argument("--half", choices=sorted(HALF), default=None,
                        help="also time APRIL-GAN and Bayes-PFL under autocast in this precision")
    parser.add_argument("--map-std", action="store_true",
                        help="also time Bayes-PFL with its per-pixel uncertainty map")
    parser.add_argument("--compiled-maps", action="store_true",
                        help="also time Bayes-PFL with map_kernel='compiled' (torch.compile)")
    parser.add_argument("--interleaved", type=int, default=0, metavar="K",
                        help="also time APRIL-GAN and Bayes-PFL alternately K times and give the "
                             "ratio of their fastest runs (steadier on a loaded machine)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the slow straightforward reference")
    parser.add_argument("--results", default=None, help="Results CSV for the metric columns")
    parser.add_argument("--dataset", default="target", help="dataset of --results to report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    device = torch.device(args.device)

    bb = make_backbone(args.profile, args.device)
    S = bb.image_size
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, S, S, generator=gen).to(device)
    cls_names = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(args.batch)]
    model_cfg = ModelConfig()  # B = 3, R = 10 at inference
    bayes = BayesPFL(bb, model_cfg, seed=args.seed).to(device).eval()

    methods = {}
    for name in args.methods if args.methods is not None else list(REGISTRY):  # paper order
        m = build(name, bb, generator=torch.Generator().manual_seed(args.seed))
        methods[m.name] = m.to(device).eval() if hasattr(m, "to") else m
    peers = dict(methods)
    methods["Bayes-PFL"] = BayesPFLInference(bayes)
    if args.map_std:
        methods["Bayes-PFL (+map_std)"] = BayesPFLInference(bayes, map_std=True)
    if args.compiled_maps:
        methods[COMPILED] = BayesPFLInference(bayes, map_kernel="compiled")
    if args.half:
        if "APRIL-GAN" in peers:
            methods[f"APRIL-GAN ({args.half})"] = Autocast(peers["APRIL-GAN"], device, args.half)
        methods[f"Bayes-PFL ({args.half})"] = BayesPFLInference(bayes, precision=args.half)

    print(f"profile {args.profile}: {bb.clip.visual.__class__.__name__} "
          f"{len(bb.clip.visual.transformer.resblocks)} blocks x width {bb.vision_width}, "
          f"{S} px, layers {bb.layers}; batch {args.batch}; device {device}"
          + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "")
          + f"; {args.dtype}")
    print(f"Bayes-PFL: B = {model_cfg.n_prompts}, R = {model_cfg.mc_test}, "
          f"K = {model_cfg.flow_length}; time = median of {args.repeats} runs per batch / batch\n")

    rows, failed = {}, []
    for name, m in methods.items():
        try:
            rows[name] = measure(m, images, cls_names, device, args.repeats)
        except Exception as err:  # report and go on: one broken peer must not hide the rest
            failed.append(name)
            print(f"{name} FAILED: {type(err).__name__}: {err}")
    what = "GPU memory allocated" if device.type == "cuda" else "process RSS"
    print_table(rows, args.batch, args.results, args.dataset, what)
    if "Bayes-PFL" not in rows:
        return 1

    # Goals: Bayes-PFL / APRIL-GAN, in full precision and (if asked) in half precision.
    goal = GOALS.get(device.type)
    print()
    for tag in ["", *([f" ({args.half})"] if args.half else [])]:
        a, b = rows.get("APRIL-GAN" + tag), rows.get("Bayes-PFL" + tag)
        if a and b:
            ratio = b["ms"] / a["ms"]
            verdict = "" if goal is None else (
                f" (goal <= {goal:.2f}x on {device.type}: {'met' if ratio <= goal else 'NOT met'})")
            print(f"GOAL{tag or ' (' + args.dtype + ')'}: Bayes-PFL / APRIL-GAN = "
                  f"{b['ms']:.1f} / {a['ms']:.1f} ms/img = {ratio:.2f}x{verdict}; peak rise per "
                  f"image {b['rise_mb'] / args.batch:.1f} vs {a['rise_mb'] / args.batch:.1f} MB")
    if COMPILED in rows and "APRIL-GAN" in rows:
        ratio = rows[COMPILED]["ms"] / rows["APRIL-GAN"]["ms"]
        print(f"GOAL (compiled maps): Bayes-PFL / APRIL-GAN = {rows[COMPILED]['ms']:.1f} / "
              f"{rows['APRIL-GAN']['ms']:.1f} ms/img = {ratio:.2f}x")
    if args.interleaved and "APRIL-GAN" in methods:
        pair = {k: methods[k] for k in ("APRIL-GAN", "Bayes-PFL", "Bayes-PFL (+map_std)",
                                        COMPILED) if k in methods}
        for m in pair.values():  # warm-up
            run_once(m, images, cls_names, device)
        fastest = {k: float("inf") for k in pair}
        least_cpu = dict(fastest)
        for _ in range(args.interleaved):
            for k, m in pair.items():
                cpu0 = time.thread_time()
                fastest[k] = min(fastest[k], run_once(m, images, cls_names, device)[0])
                least_cpu[k] = min(least_cpu[k], time.thread_time() - cpu0)
        for what, best in (("wall", fastest), ("CPU time of this thread", least_cpu)):
            if what != "wall" and (device.type != "cpu" or torch.get_num_threads() != 1):
                continue  # a thread's CPU time is the method's cost only with one thread
            ms = {k: 1e3 * t / args.batch for k, t in best.items()}
            print(f"GOAL (interleaved, least {what} of {args.interleaved}): " + ", ".join(
                f"{k} {v:.1f} ms/img ({v / ms['APRIL-GAN']:.2f}x)" for k, v in ms.items()))
    if args.map_std and "Bayes-PFL (+map_std)" in rows:
        print(f"map_std costs {rows['Bayes-PFL (+map_std)']['ms'] - rows['Bayes-PFL']['ms']:.1f}"
              " ms/img on top of Bayes-PFL")

    n_ref = min(args.ref_batch, args.batch)
    seeds = list(range(1000, 1000 + n_ref))
    with torch.no_grad():
        fast = bayes.forward_features(bb.encode_image(images[:n_ref]), cls_names[:n_ref],
                                      seeds=seeds)
    ok = True
    if args.half:  # half against full precision, same seeds, whole batch
        full = BayesPFLInference(bayes).predict(Batch(cls_names, images=images),
                                                torch.Generator().manual_seed(0))
        half = BayesPFLInference(bayes, precision=args.half).predict(
            Batch(cls_names, images=images), torch.Generator().manual_seed(0))
        print(f"Bayes-PFL {args.half} vs {args.dtype}: max |map diff| = "
              f"{float((half.maps - full.maps).abs().max()):.2e}, mean |map diff| = "
              f"{float((half.maps - full.maps).abs().mean()):.2e}, max |score diff| = "
              f"{float((half.scores - full.scores).abs().max()):.2e} ({args.batch} images)")
    if not args.no_reference:
        # The straightforward reference: equality first (same seeds), then its time.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ref_maps, ref_scores = reference_bayes_pfl(bayes, images[:n_ref], cls_names[:n_ref],
                                                   seeds)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ref_ms = 1e3 * (time.perf_counter() - t0) / n_ref
        map_err = float((fast.anomaly_map - ref_maps).abs().max())
        score_err = float((fast.score - ref_scores).abs().max())
        print(f"Bayes-PFL reference (per image x sample x prompt x state text calls on 77 "
              f"tokens, Python loops over layers and pairs; {n_ref} images): {ref_ms:.1f} "
              f"ms/img; pfl: {rows['Bayes-PFL']['ms']:.1f} ms/img; speed-up "
              f"{ref_ms / rows['Bayes-PFL']['ms']:.1f}x")
        ok = map_err <= TOLERANCE and score_err <= TOLERANCE
        print(f"pfl vs reference: max |map diff| = {map_err:.2e}, max |score diff| = "
              f"{score_err:.2e} (tolerance {TOLERANCE:.0e}): {'OK' if ok else 'MISMATCH'}")
    if COMPILED in rows:  # the compiled kernel against the fused one and the reference
        with torch.no_grad():
            comp = bayes.forward_features(bb.encode_image(images[:n_ref]), cls_names[:n_ref],
                                          seeds=seeds, map_kernel="compiled")
        against = {"fused maps": fast.anomaly_map}
        if not args.no_reference:
            against["reference"] = ref_maps
        for what, maps in against.items():
            err = float((comp.anomaly_map - maps).abs().max())
            ok = ok and err <= TOLERANCE
            print(f"compiled maps vs {what}: max |map diff| = {err:.2e}: "
                  f"{'OK' if err <= TOLERANCE else 'MISMATCH'}")
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
