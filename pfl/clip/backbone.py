"""The frozen CLIP: global image feature, patch tokens at chosen layers, text tower on embeddings.

docs/reproduction.md, "Backbone": patch features are the raw residual stream after the chosen blocks
(CLS dropped, before ``ln_post`` and the projection); positional embeddings are resized
bicubically (antialias) to the input size; both towers stay frozen. The text path takes token
*embeddings* so that learnable vectors can be spliced in (docs/reproduction.md, "Prompts"), and cuts
every batch right after its longest EOT token: the causal mask makes that exact.

Nothing here downloads: the ``smoke`` tower is a JSON config shipped in ``pfl/clip/assets`` (with
shipped weights when they exist, else a seeded random init), and the ``paper`` tower reads
OpenAI's ViT-L-14-336 weights from a local file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from torch import nn

from pfl.config import BackboneConfig, active
from pfl.utils import content_keys, default_dtype

ASSETS = Path(__file__).resolve().parent / "assets"
# The smoke profile's shipped towers, by name (README, "The shipped tiny CLIPs"). v1 was pretrained
# on procedural patterns only; v2 continues v1 on photographs from a Debian package
# (pfl.data.photos). Each has a record ``<stem>.json`` (command, data, versions, SHA-256) and a
# loss history ``<stem>_history.csv`` next to its weights.
TOWERS: dict[str, Path] = {
    "tiny-v1": ASSETS / "tiny_clip.safetensors",
    "tiny-v2": ASSETS / "tiny_clip_v2.safetensors",
}
DEFAULT_TOWER = "tiny-v2"
TINY_WEIGHTS = TOWERS[DEFAULT_TOWER]
_REGISTERED = False

# Where OpenAI's ViT-L-14-336 file usually sits when a user has downloaded it before.
_OPENAI_CACHE_GLOBS = (
    "~/.cache/clip/ViT-L-14-336px.pt",
    "~/.cache/huggingface/hub/models--timm--vit_large_patch14_clip_336.openai/snapshots/*/"
    "open_clip_*",
)


def register_configs() -> None:
    """Make the configs shipped in ``pfl/clip/assets`` (e.g. ``pfl-tiny``) known to open_clip."""
    global _REGISTERED
    if not _REGISTERED:
        for path in sorted(ASSETS.glob("pfl-*.json")):
            open_clip.add_model_config(path)
        _REGISTERED = True


def default_layers(n_blocks: int, n_taps: int = 4) -> tuple[int, ...]:
    """Evenly spaced 1-based block indices, ending at the last block.

    >>> default_layers(24), default_layers(12), default_layers(4)
    ((6, 12, 18, 24), (3, 6, 9, 12), (1, 2, 3, 4))
    """
    return tuple(round(n_blocks * (i + 1) / n_taps) for i in range(n_taps))


class MissingWeightsError(FileNotFoundError):
    """The ``paper`` profile was asked for but the CLIP weights file is not on disk."""


def tower_record(name: str = DEFAULT_TOWER) -> tuple[dict, Path]:
    """The record of the shipped tower ``name`` (a key of :data:`TOWERS`) and its history CSV."""
    if name not in TOWERS:
        raise KeyError(f"no shipped tower {name!r}; the shipped ones are {sorted(TOWERS)}")
    stem = TOWERS[name].with_suffix("")
    record = json.loads(stem.with_suffix(".json").read_text())
    return record, stem.parent / record["history"]


def resolve_weights(cfg: BackboneConfig) -> Path | None:
    """The weights file for ``cfg``, or None for a seeded random init (smoke profile only).

    ``cfg.weights`` is a local file, or the name of a shipped tower (:data:`TOWERS`, e.g.
    ``"tiny-v1"`` for the patterns-only tower); None gives :data:`DEFAULT_TOWER` for ``pfl-tiny``.
    """
    if cfg.weights in TOWERS:
        if cfg.model_name != "pfl-tiny":
            raise ValueError(f"the shipped tower {cfg.weights!r} holds pfl-tiny weights, but the "
                             f"backbone is {cfg.model_name!r}: set BackboneConfig.model_name to "
                             "'pfl-tiny' or weights to a file of that model")
        return TOWERS[cfg.weights]
    if cfg.weights:
        path = Path(os.path.expanduser(cfg.weights))
        if not path.is_file():
            raise MissingWeightsError(
                f"CLIP weights file {str(path)!r} does not exist. Set PFL_CLIP_WEIGHTS to the "
                f"local path of the {cfg.model_name} weights (OpenAI 'ViT-L-14-336px.pt' or an "
                "open_clip .safetensors/.bin of it); pfl never downloads weights."
            )
        return path
    if cfg.model_name.startswith("pfl-"):
        return TINY_WEIGHTS if cfg.model_name == "pfl-tiny" and TINY_WEIGHTS.is_file() else None
    for pattern in _OPENAI_CACHE_GLOBS:
        hits = sorted(Path(os.path.expanduser(pattern)).parent.glob(Path(pattern).name))
        if hits:
            return hits[0]
    raise MissingWeightsError(
        f"The {cfg.model_name!r} backbone needs its OpenAI CLIP weights, and none were found: "
        "PFL_CLIP_WEIGHTS is not set and there is no ~/.cache/clip/ViT-L-14-336px.pt. Copy the "
        "weights file to this machine and run `export PFL_CLIP_WEIGHTS=/path/to/"
        "ViT-L-14-336px.pt` (or use the default smoke profile: `export PFL_PROFILE=smoke`)."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """State dict from safetensors, a torch pickle, or OpenAI's TorchScript archive."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in
                                        zipfile.ZipFile(path).namelist()):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    return sd


def to_model_dtype(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Cast every floating tensor of ``sd`` to the dtype of ``model``'s parameters.

    OpenAI's ``ViT-L-14-336px.pt`` is an fp16 TorchScript archive; the authors' code casts it
    to float32 and only then resizes the positional embeddings (docs/authors-code.md).
    The cast must come first: torch's bicubic/antialiased resize has no Half kernel on CPU.
    Every fp16 value is exactly representable in fp32 (and fp64), so nothing is lost.
    """
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor],
                         source: str = "state dict") -> None:
    """Load a CLIP state dict (fp16 or fp32) into an open_clip model: cast to the model's dtype,
    then resize the positional embeddings to its grid, then a strict load.

    ``source`` names the file in the error message when the keys or shapes do not fit.
    """
    sd = to_model_dtype(sd, model)
    try:
        resize_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"weights {source} does not fit the open_clip model: {err}. Check that "
            "it holds the weights of the configured backbone (BackboneConfig.model_name)."
        ) from err


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into an open_clip model (fp16 or fp32; see :func:`load_state_dict_into`)."""
    load_state_dict_into(model, _read_state_dict(Path(path)), f"file {str(path)!r}")


@contextlib.contextmanager
def _quiet_open_clip():
    # open_clip logs "No pretrained weights loaded" on the root logger for every random init;
    # pfl loads its weights itself right after, so the message is noise in notebooks.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def create_clip(cfg: BackboneConfig, load: bool = True) -> nn.Module:
    """An open_clip model for ``cfg``: random init with ``cfg.init_seed``, then local weights
    (``load=False``: the random init only, e.g. when only the tower's sizes are needed)."""
    register_configs()
    weights = resolve_weights(cfg) if load else None
    # Seed the init without disturbing the caller's global RNG stream, and build in the
    # tower's own dtype (not the process default), so a random init is the same in any process.
    build_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    with torch.random.fork_rng(devices=[]), _quiet_open_clip(), default_dtype(build_dtype):
        torch.manual_seed(cfg.init_seed)
        model = open_clip.create_model(
            cfg.model_name, pretrained=None, force_image_size=cfg.image_size,
            precision="fp32" if cfg.precision == "fp64" else cfg.precision,
        )
    if weights is not None:
        load_weights(model, weights)
    return model


# A peer method's way into a tower: ``hook(j, tokens)`` is called before block j with the
# batch-first token sequence ``(N, T, W)`` and returns the sequence block j reads.
TokensHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ImageFeatures:
    """What the image tower gives for a batch.

    global_: (N, E) projected CLS feature (after ``ln_post`` and ``proj``), not normalised.
    patches: (N, L, T, W) residual stream after each tapped block, CLS dropped, pre-``ln_post``.
    image_keys: (N,) int64 hash of each input image's pixels (:func:`pfl.utils.content_keys`),
        or None for features built by hand; methods that sample seed an image's noise with it.
    """

    global_: torch.Tensor
    patches: torch.Tensor
    image_keys: torch.Tensor | None = None

    def select(self, rows) -> ImageFeatures:
        """The rows ``rows`` (a list, slice or index tensor) of every field."""
        keys = None if self.image_keys is None else self.image_keys[rows]
        return ImageFeatures(self.global_[rows], self.patches[rows], keys)

    def to(self, device=None, dtype: torch.dtype | None = None) -> ImageFeatures:
        """Features moved/cast (the keys stay int64 on the CPU)."""
        return ImageFeatures(self.global_.to(device=device, dtype=dtype),
                             self.patches.to(device=device, dtype=dtype), self.image_keys)


class Backbone(nn.Module):
    """A frozen open_clip model with the two paths Bayes-PFL needs.

    Args:
        clip: an open_clip ``CLIP`` model (its parameters are frozen here).
        layers: 1-based blocks whose outputs are tapped; None -> :func:`default_layers`.
    """

    def __init__(self, clip: nn.Module, layers: tuple[int, ...] | None = None,
                 tokenizer_name: str = "ViT-B-32"):
        super().__init__()
        self.clip = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        n_blocks = len(clip.visual.transformer.resblocks)
        self.layers = tuple(layers) if layers else default_layers(n_blocks)
        if min(self.layers) < 1 or max(self.layers) > n_blocks:
            raise ValueError(f"layers {self.layers} outside 1..{n_blocks} for this tower")
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> Backbone:
        return cls(create_clip(cfg), cfg.layers)

    def train(self, mode: bool = True) -> Backbone:
        # The towers stay in eval mode whatever the caller does: they are frozen.
        super().train(mode)
        self.clip.eval()
        return self

    # --- sizes -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.clip.visual.image_size[0]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size)

    @property
    def vision_width(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.output_dim

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    # --- image path --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor,
                     tokens_hook: TokensHook | None = None) -> ImageFeatures:
        """images (N, 3, S, S), CLIP-normalised -> :class:`ImageFeatures` (with ``image_keys``).

        tokens_hook: the extension point for methods that change the tower (e.g. AdaCLIP's
        visual prompts): ``tokens_hook(j, x)`` gets the tokens ``(N, T', W)`` before block j
        (0-based) and returns the tokens block j reads. The image's own ``T = 1 + gh gw``
        tokens come first; the hook may append tokens after them, which never reach the
        outputs. Gradients flow through the hook's tensors (the tower's weights stay frozen);
        without a hook the pass runs under no_grad.
        """
        keys = content_keys(images)
        if tokens_hook is None:
            with torch.no_grad():
                out = self.clip.visual.forward_intermediates(
                    images.to(self.dtype),
                    indices=[i - 1 for i in self.layers],
                    output_fmt="NLC",
                )
            patches = torch.stack(out["image_intermediates"], dim=1)
            return ImageFeatures(out["image_features"], patches, keys)
        visual = self.clip.visual
        x = visual._embeds(images.to(self.dtype))
        n_tok = x.shape[1]
        taps = []
        for j, block in enumerate(visual.transformer.resblocks):
            x = _run_block(block, tokens_hook(j, x), visual.transformer)
            if j + 1 in self.layers:
                taps.append(x[:, 1:n_tok])
        pooled, _ = visual._pool(x[:, :n_tok])
        return ImageFeatures(pooled @ visual.proj, torch.stack(taps, dim=1), keys)

    def project_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens (..., W) -> CLIP's joint space (..., E) through ``ln_post`` and ``proj``.

        CLIP only ever trained the CLS token to sit in this space; applying the same map to
        patch tokens is the training-free start of WinCLIP and APRIL-GAN. Not normalised.
        """
        visual = self.clip.visual
        return visual.ln_post(patches.to(self.dtype)) @ visual.proj

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    # --- text path ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, context_length) token ids."""
        return self.tokenizer(texts)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, text_width) embeddings (frozen table)."""
        return self.clip.token_embedding(ids)

    @staticmethod
    def eot_positions(ids: torch.Tensor) -> torch.Tensor:
        """Index of the EOT token (the largest id in CLIP's vocabulary) in each row."""
        return ids.argmax(dim=-1)

    def encode_text_embeddings(
        self, x: torch.Tensor, eot: torch.Tensor, tokens_hook: TokensHook | None = None
    ) -> torch.Tensor:
        """Token embeddings (N, L, W) with EOT positions (N,) -> normalised features (N, E).

        Positions after the longest EOT are cut before the transformer. With a causal mask,
        token i attends only to tokens <= i, so the EOT output cannot depend on later tokens:
        the result equals the full 77-token pass (tested to 1e-5), at a fraction of the cost.
        Gradients flow to ``x`` (the towers' own weights stay frozen).

        tokens_hook: as in :meth:`encode_image`, called before every text block with the
        ``(N, L', W)`` tokens (after the positional embedding); it must keep the length and
        the EOT positions (e.g. deep prompt tuning overwrites positions 1..n after SOS).
        """
        clip = self.clip
        length = int(eot.max()) + 1
        x = x[:, :length].to(self.dtype) + clip.positional_embedding[:length].to(self.dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        if tokens_hook is None:
            x = clip.transformer(x, attn_mask=mask)
        else:
            for j, block in enumerate(clip.transformer.resblocks):
                x = _run_block(block, tokens_hook(j, x), clip.transformer, mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def encode_text_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor
    ) -> torch.Tensor:
        """Prompts that share their first tokens: the prefix runs once per group, exactly.

        ``prefix (G, P0, W)`` holds the shared leading token embeddings of group g (Bayes-PFL:
        [SOS], the P context vectors and their ISD draw, the same for the normal and the
        abnormal prompt), ``suffix (G, S, L1, W)`` the S continuations of each group, ``eot
        (G,)`` the EOT position of the full sequences (the same for a group's S members, at
        least P0). Returns normalised features ``(G, S, E)`` equal to
        :meth:`encode_text_embeddings` on the S full sequences ``cat(prefix, suffix)``.

        Why exact: under the causal mask a prefix token attends only to prefix tokens, so its
        hidden states, and hence its keys and values in every block, do not depend on the
        suffix; the suffix tokens attend to the cached prefix keys/values and to their own
        earlier tokens. In the last block only the EOT token's output is used, so only its
        query, attention and MLP are computed. Saves the prefix's work S - 1 times and most
        of the last block. Gradients flow as in :meth:`encode_text_embeddings`.

        Towers whose blocks are not open_clip ``ResidualAttentionBlock`` with
        ``nn.MultiheadAttention`` take the plain path (same result, no saving).
        """
        clip = self.clip
        g, s, l1, w = suffix.shape
        p0 = prefix.shape[1]
        length = int(eot.max()) + 1
        blocks = list(clip.transformer.resblocks)
        if length <= p0 or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
                                   and getattr(b.attn, "batch_first", False) for b in blocks):
            full = torch.cat([prefix[:, None].expand(g, s, p0, w), suffix], dim=2)
            out = self.encode_text_embeddings(full.reshape(g * s, p0 + l1, w),
                                              eot.repeat_interleave(s))
            return out.view(g, s, -1)
        dt = self.dtype
        pos = clip.positional_embedding[:length].to(dt)
        xp = prefix.to(dt) + pos[:p0]
        xs = suffix[:, :, : length - p0].to(dt) + pos[p0:]  # (G, S, L1', W)
        l1 = xs.shape[2]
        dev = xs.device
        # Suffix query i (position p0 + i) sees every prefix key and suffix keys j <= i.
        keep = torch.ones(l1, p0 + l1, dtype=torch.bool, device=dev)
        keep[:, p0:] = torch.ones(l1, l1, dtype=torch.bool, device=dev).tril()
        last = eot.to(dev) - p0  # (G,) EOT row inside the suffix
        for j, block in enumerate(blocks):
            if j + 1 < len(blocks):
                xp, xs = _prefix_block(block, xp, xs, keep)
            else:
                rows = last.view(g, 1).expand(g, s)
                xs = _prefix_block(block, xp, xs, keep[last], rows)[1]
        x = clip.ln_final(xs[:, :, 0])  # (G, S, W): the EOT token
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Plain prompts -> normalised text features (N, E), through the truncated path."""
        ids = self.tokenize(texts).to(self.clip.token_embedding.weight.device)
        return self.encode_text_embeddings(self.token_embedding(ids), self.eot_positions(ids))


def _run_block(block: nn.Module, x: torch.Tensor, transformer: nn.Module,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """One residual block on batch-first tokens, whatever layout the transformer uses."""
    if getattr(transformer, "batch_first", True):
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def _prefix_block(block: nn.Module, xp: torch.Tensor, xs: torch.Tensor, keep: torch.Tensor,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip ``ResidualAttentionBlock`` on a shared prefix and its continuations.

    ``xp (G, P0, W)``, ``xs (G, S, L1, W)``; ``keep`` the boolean mask of suffix queries over
    [prefix, suffix] keys (True: attend): ``(L1, P0 + L1)``, or, with ``rows (G, S)`` (the
    one suffix row to compute per sequence), that row's mask per group ``(G, P0 + L1)``.
    Returns the new ``(xp, xs)``; with ``rows`` xs is ``(G, S, 1, W)`` and xp is not
    updated. The keys and values of the prefix are computed once for the S continuations.
    """
    attn = block.attn
    g, s, l1, w = xs.shape
    heads = attn.num_heads
    dh = w // heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, dh)
        return t.unflatten(-1, (heads, dh)).transpose(1, 2)

    def merge(t: torch.Tensor) -> torch.Tensor:  # (B, heads, L, dh) -> (B, L, W)
        return attn.out_proj(t.transpose(1, 2).flatten(-2))

    qp, kp, vp = F.linear(block.ln_1(xp), weight, bias).chunk(3, -1)
    qp, kp, vp = split(qp), split(kp), split(vp)  # (G, heads, P0, dh)
    xs = xs.reshape(g * s, l1, w)
    hs = block.ln_1(xs)
    ks, vs = F.linear(hs, weight[w:], bias[w:]).chunk(2, -1)
    k = torch.cat([kp.repeat_interleave(s, 0), split(ks)], dim=2)  # (G S, heads, P0 + L1, dh)
    v = torch.cat([vp.repeat_interleave(s, 0), split(vs)], dim=2)
    mask = keep
    if rows is not None:  # one query row per sequence
        idx = rows.reshape(g * s, 1, 1).expand(g * s, 1, w)
        xs, hs = xs.gather(1, idx), hs.gather(1, idx)
        mask = keep.repeat_interleave(s, 0)[:, None, None]  # (G S, 1, 1, P0 + L1)
    att = F.scaled_dot_product_attention(split(F.linear(hs, weight[:w], bias[:w])), k, v,
                                         attn_mask=mask)
    xs = xs + block.ls_1(merge(att))
    xs = (xs + block.ls_2(block.mlp(block.ln_2(xs)))).view(g, s, -1, w)
    if rows is None:
        att = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        xp = xp + block.ls_1(merge(att))
        xp = xp + block.ls_2(block.mlp(block.ln_2(xp)))
    return xp, xs


def load_backbone(cfg: BackboneConfig | None = None) -> Backbone:
    """The backbone of ``cfg`` (default: the active profile's)."""
    if cfg is None:

        cfg = active().backbone
    return Backbone.from_config(cfg)
