"""PISA in PyTorch, for inference: a diffusers attention processor and the function it calls.

Written from SPEC section 2 with the pinned conventions of the JAX code (``bokehdiff_jax.pisa``), so the
two agree to float rounding (tests/torch/test_torch_pisa.py):

- token ``(i, j)`` of the true ``h x w`` grid is centred at image pixel ``((j + .5) W / w, (i + .5) H / h)``;
  its disparity ``d_j`` is the exact area mean over its pixels and its CoC radius ``r_j = K |d_j - d_f|``;
- ``C_ij = sigmoid(beta (r_j - |P_i - P_j|))``, or ``[|P_i - P_j| <= r_j]`` for ``beta = inf``;
- softmaxQ normalises each key's column over queries; the visibility ``Vis_ij`` multiplies the
  normalised weights; it reads the disparity area-resampled to ``3h x 3w`` bilinearly, at ``T`` ray
  samples ``t = c d + (1 - c)``, ``c = linspace(0.1, 0.9, T)``, from ``S`` source positions at the fixed
  rank-1 lattice offsets of ``pisa.geometry.stratified_offsets`` (the ray keeps the key's disparity);
- disparity is clamped to ``1 - 1e-4`` in the ray formula.

None of SPEC section 6's faults: no dropout, no random jitter (same inputs, same output), the hardness
is the config's fixed inference value, the grid is the real ``(h, w)`` of the layer (read from the
enclosing ``Transformer2DModel``'s input by a forward pre-hook, never guessed from the token count), so
any aspect ratio works and the CoC stays a circle.

Memory: queries are processed in chunks (two passes for softmaxQ: column statistics, then outputs), so
the largest intermediate is ``chunk x N x S x T`` ray samples, never ``N x N x S x T``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.physics.occlusion import DISPARITY_EPS

# The area-resampling weights are the JAX code's own (one home: physics.optics), built in NumPy.
from bokehdiff_jax.physics.optics import _area_matrix
from bokehdiff_jax.pisa.config import DEFAULT_CONFIG, PisaConfig
from bokehdiff_jax.pisa.geometry import FINE_FACTOR, stratified_offsets

# Ray samples held at once (queries per chunk x keys x S x T); ~16M float32 = 64 MB per buffer.
DEFAULT_SAMPLE_BUDGET = 1 << 24


def _segment_fractions(segments: int) -> torch.Tensor:
    # float32 linspace computed as JAX does (start + i * step in float32), so the thresholds t match.
    return torch.from_numpy(np.linspace(0.1, 0.9, segments, dtype=np.float32))


def area_resize(x_bhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Exact area resampling ``[B, H, W] -> [B, h, w]`` (``physics.optics.area_resize``)."""
    h_in, w_in = x_bhw.shape[-2:]
    r_h = torch.from_numpy(_area_matrix(h_in, size[0])).to(x_bhw.device)
    r_w = torch.from_numpy(_area_matrix(w_in, size[1])).to(x_bhw.device)
    return torch.einsum("hH,bHW,wW->bhw", r_h, x_bhw, r_w)


def token_centres(grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``[h*w, 2]`` row-major token centres ``(x, y)`` in image pixels (``pisa.geometry.token_centres``)."""
    h, w = grid
    big_h, big_w = image_size
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    xy = np.stack([(jj + 0.5) * big_w / w, (ii + 0.5) * big_h / h], axis=-1).reshape(h * w, 2)
    return torch.from_numpy(xy.astype(np.float32))


def bilinear_sample(img_bhw: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Edge-clamped bilinear lookup of ``img[B, H, W]`` at pixel-centre coordinates ``x, y: [B, ...]``
    (``physics.optics.bilinear_sample``, per batch element)."""
    b, h, w = img_bhw.shape
    fx = torch.clamp(x - 0.5, 0.0, w - 1.0)
    fy = torch.clamp(y - 0.5, 0.0, h - 1.0)
    x0 = torch.clamp(torch.floor(fx).to(torch.int64), 0, max(w - 2, 0))
    y0 = torch.clamp(torch.floor(fy).to(torch.int64), 0, max(h - 2, 0))
    x1 = torch.clamp(x0 + 1, max=w - 1)
    y1 = torch.clamp(y0 + 1, max=h - 1)
    ax = fx - x0
    ay = fy - y0
    flat = img_bhw.reshape(b, h * w)
    shape = x.shape

    def at(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return torch.gather(flat, 1, (yi * w + xi).reshape(b, -1)).reshape(shape)

    top = at(y0, x0) * (1 - ax) + at(y0, x1) * ax
    bot = at(y1, x0) * (1 - ax) + at(y1, x1) * ax
    return top * (1 - ay) + bot * ay


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Per-call token geometry (inference). xy ``[N, 2]``; disp, radius ``[B, N]``; fine ``[B, 3h, 3w]``;
    offsets ``[S, 2]`` pixels; metric: distance units per pixel along (x, y); beta: hardness."""

    xy: torch.Tensor
    disp: torch.Tensor
    radius: torch.Tensor
    fine: torch.Tensor
    offsets: torch.Tensor
    image_size: tuple[int, int]
    metric: tuple[float, float]
    beta: float
    hard_edge: bool


def prepare(
    config: PisaConfig,
    grid: tuple[int, int],
    disparity: torch.Tensor,
    focus: torch.Tensor,
    strength: torch.Tensor,
) -> Geometry:
    """The geometry of one call. ``disparity``: ``[B, H, W]``; ``focus``, ``strength``: ``[B]``."""
    disparity = disparity.detach().to(torch.float32)
    focus = focus.detach().to(disparity.device, torch.float32)
    strength = strength.detach().to(disparity.device, torch.float32)
    b, big_h, big_w = disparity.shape
    h, w = grid
    d_tok = area_resize(disparity, (h, w)).reshape(b, h * w)
    radius = strength[:, None] * torch.abs(d_tok - focus[:, None])  # K |d - d_f|, image pixels
    if config.units == "pixels":
        metric = (1.0, 1.0)
    else:
        metric = (config.released_scale / big_w, config.released_scale / big_h)
        radius = radius * (config.released_upsample / 10.0)
    fine = area_resize(disparity, (FINE_FACTOR * h, FINE_FACTOR * w))
    token_size = np.asarray([big_w / w, big_h / h], np.float32)
    offsets = torch.from_numpy(stratified_offsets(config.supersample) * token_size).to(disparity.device)
    return Geometry(
        xy=token_centres(grid, (big_h, big_w)).to(disparity.device),
        disp=d_tok,
        radius=radius,
        fine=fine,
        offsets=offsets,
        image_size=(big_h, big_w),
        metric=metric,
        beta=float(np.float32(min(config.hardness, 3.0e38))),
        hard_edge=config.hard_edge,
    )


def log_coc(g: Geometry, q_slice: slice) -> torch.Tensor:
    """``log C_ij``: ``[B, 1, nq, N]`` for the queries in ``q_slice`` (``-inf`` outside a hard edge)."""
    xq, xk = g.xy[q_slice], g.xy
    dx = (xq[:, None, 0] - xk[None, :, 0]) * g.metric[0]
    dy = (xq[:, None, 1] - xk[None, :, 1]) * g.metric[1]
    dist = torch.sqrt(dx * dx + dy * dy)[None]  # [1, nq, N]
    r = g.radius[:, None, :]  # [B, 1, N]
    if g.hard_edge:
        # SPEC 2: ||P_i - P_j|| <= r_j, so an in-focus key (r_j = 0) still reaches its own query.
        out = torch.where(dist <= r, 0.0, -math.inf)
    else:
        out = F.logsigmoid(torch.tensor(g.beta, dtype=torch.float32, device=r.device) * (r - dist))
    return out[:, None]


def visibility(g: Geometry, q_slice: slice, segments: int, t_from_query: bool) -> torch.Tensor:
    """``Vis_ij``: ``[B, 1, nq, N]``, the fraction of source super-samples whose ray from key ``j`` to
    query ``i`` is unblocked at every sample ``t`` (``physics.occlusion.visibility``)."""
    big_h, big_w = g.image_size
    f_h, f_w = g.fine.shape[-2:]
    c = _segment_fractions(segments).to(g.xy.device)  # [T]
    d_k = g.disp  # [B, N]
    d_ref = d_k[:, None, :] if not t_from_query else g.disp[:, q_slice, None]  # [B, 1 or nq, N or 1]
    t = c * d_ref[..., None] + (1.0 - c)  # [B, ., ., T]
    p_s = g.xy[:, None, :] + g.offsets[None]  # [N, S, 2]
    # Broadcast to [B, nq, N, S, T].
    qx, qy = (g.xy[q_slice][None, :, None, None, None, i] for i in (0, 1))
    sx, sy = (p_s[None, None, :, :, None, i] for i in (0, 1))
    tt = t[:, :, :, None, :]  # [B, nq or 1, N or 1, 1, T]
    d_s = torch.clamp(d_k, max=1.0 - DISPARITY_EPS)[:, None, :, None, None]  # Eq. 7 with d_s < 1
    factor = (1.0 - tt) * d_s / ((1.0 - d_s) * tt)
    px = qx + factor * (sx - qx)
    py = qy + factor * (sy - qy)
    scene = bilinear_sample(g.fine, px * (f_w / big_w), py * (f_h / big_h))
    unblocked = torch.all(scene <= tt, dim=-1)  # [B, nq, N, S]
    return unblocked.to(torch.float32).mean(dim=-1)[:, None]


def _chunk(n: int, budget: int, config: PisaConfig) -> int:
    per_query = n * (config.supersample * config.segments if config.occlusion else 1)
    return max(1, min(n, budget // max(per_query, 1)))


def pisa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    disparity: torch.Tensor,
    focus: torch.Tensor,
    strength: torch.Tensor,
    config: PisaConfig = DEFAULT_CONFIG,
    sample_budget: int = DEFAULT_SAMPLE_BUDGET,
) -> torch.Tensor:
    """PISA at inference (``bokehdiff_jax.pisa.pisa_attention`` with ``step=None, train=False``).

    Args:
      q, k, v: ``[batch, tokens, heads, head_dim]``, ``tokens = h * w`` row-major.
      grid: the true ``(h, w)`` token grid.
      disparity: ``[batch, H, W]`` in [0, 1] (1 nearest) at input-image resolution.
      focus, strength: ``[batch]``: focus disparity ``d_f`` and ``K`` (CoC pixels per unit disparity).
      config: the switches and numbers (``impl``, blocks, dropout and training options are unused).
      sample_budget: ray samples (or logits) held at once; sets the query chunk.

    Returns ``[batch, tokens, heads, head_dim]`` in ``q.dtype``; computed in float32.
    """
    h, w = grid
    b, n, heads, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or h * w != n or h < 1 or w < 1:
        raise InputError(
            f"PISA q, k, v {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} with grid {tuple(grid)}: "
            "expected three equal [batch, h*w, heads, head_dim]"
        )
    if disparity.ndim != 3 or disparity.shape[0] != b or tuple(focus.shape) != (b,) or strength.shape != (b,):
        raise InputError(
            f"PISA disparity {tuple(disparity.shape)}, focus {tuple(focus.shape)}, strength "
            f"{tuple(strength.shape)}: expected [batch={b}, H, W], [batch], [batch]"
        )
    g = prepare(config, (h, w), disparity, focus, strength)
    scale = d**-0.5
    qf, kf, vf = (t.to(torch.float32).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, D]
    chunk = _chunk(n, sample_budget, config)
    slices = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    def logits(sl: slice) -> torch.Tensor:
        a = torch.matmul(qf[:, :, sl], kf.transpose(-1, -2)) * scale  # [B, heads, nq, N]
        return a + log_coc(g, sl) if config.coc else a

    def finish(e: torch.Tensor, z: torch.Tensor, sl: slice) -> torch.Tensor:
        # An empty support (all C_ij = 0) has e = 0 and z = 0: it contributes nothing, without 0 / 0.
        wts = e / torch.where(z > 0, z, torch.ones_like(z))
        if config.occlusion:
            wts = wts * visibility(g, sl, config.segments, config.t_from_query)
        return torch.matmul(wts, vf)  # [B, heads, nq, D]

    outs = []
    if config.softmax_q:
        # Pass 1: each key's column max and normaliser over all queries (online over query chunks).
        m = torch.full((b, heads, 1, n), -math.inf, device=qf.device)
        z = torch.zeros((b, heads, 1, n), device=qf.device)
        for sl in slices:
            lg = logits(sl)
            m_new = torch.maximum(m, lg.amax(dim=-2, keepdim=True))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            z = z * torch.exp(torch.where(torch.isfinite(m), m - m_safe, -math.inf)) + torch.exp(
                lg - m_safe
            ).sum(dim=-2, keepdim=True)
            m = m_new
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        for sl in slices:  # pass 2: normalised weights times visibility, times values
            outs.append(finish(torch.exp(logits(sl) - m), z, sl))
    else:
        for sl in slices:
            lg = logits(sl)
            mr = lg.amax(dim=-1, keepdim=True)
            mr = torch.where(torch.isfinite(mr), mr, torch.zeros_like(mr))
            e = torch.exp(lg - mr)
            outs.append(finish(e, e.sum(dim=-1, keepdim=True), sl))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------- diffusers side
@dataclasses.dataclass
class PisaContext:
    """The per-call inputs every installed processor reads: set them before the U-Net call (the
    pipeline does), clear them after. disparity ``[B, H, W]``, focus ``[B]``, strength ``[B]``."""

    disparity: torch.Tensor | None = None
    focus: torch.Tensor | None = None
    strength: torch.Tensor | None = None


class PisaAttnProcessor:
    """A diffusers attention processor computing PISA in a self-attention layer (inference).

    ``grid`` is the layer's true ``(h, w)``; ``install_pisa`` keeps it up to date with a forward pre-hook
    on the enclosing ``Transformer2DModel``. A call without a grid or without inputs in ``context`` is an
    error, never a fallback to vanilla attention.
    """

    def __init__(self, config: PisaConfig, context: PisaContext, path: str, sample_budget: int):
        self.config = config
        self.context = context
        self.path = path
        self.sample_budget = sample_budget
        self.grid: tuple[int, int] | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctx = self.context
        if encoder_hidden_states is not None or attention_mask is not None:
            raise InputError(f"PISA at {self.path}: self-attention only (no encoder states, no mask)")
        if self.grid is None or ctx.disparity is None:
            raise InputError(
                f"PISA at {self.path}: no grid or no PISA inputs set (call through BokehDiffPipeline or set "
                "the PisaContext returned by install_pisa)"
            )
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise InputError(
                f"PISA at {self.path}: expected a transformer self-attention on [B, N, C] tokens"
            )
        residual = hidden_states
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, n, attn.heads, head_dim) for t in (q, k, v))
        if attn.norm_q is not None or attn.norm_k is not None:
            raise InputError(f"PISA at {self.path}: q/k norms are not supported")
        out = pisa_attention(
            q,
            k,
            v,
            grid=self.grid,
            disparity=ctx.disparity,
            focus=ctx.focus,
            strength=ctx.strength,
            config=self.config,
            sample_budget=self.sample_budget,
        )
        out = attn.to_out[0](out.reshape(b, n, attn.heads * head_dim).to(q.dtype))
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _transformer_of(unet: torch.nn.Module, path: str) -> str:
    """The module path of the ``Transformer2DModel`` that holds the attention layer at ``path``."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if type(unet.get_submodule(parent)).__name__ == "Transformer2DModel":
            return parent
    raise InputError(f"PISA at {path}: the layer is not inside a Transformer2DModel (its grid is unknown)")


def install_pisa(
    unet: torch.nn.Module,
    routing: AttentionRouting | None = None,
    *,
    sample_budget: int = DEFAULT_SAMPLE_BUDGET,
) -> PisaContext:
    """Puts ``PisaAttnProcessor`` on the self-attention layers of a diffusers U-Net whose module paths
    match ``routing.pisa_paths`` (fnmatch; default SPEC's ``down_blocks.1.attentions.0.*.attn1``), with
    ``routing.pisa``. Returns the shared ``PisaContext`` to fill before each call. Other layers keep
    their processors. A pattern that matches no attention layer is an error.
    """
    from diffusers.models.attention_processor import Attention

    routing = routing if routing is not None else AttentionRouting()
    context = PisaContext()
    hits: dict[str, list[PisaAttnProcessor]] = {}
    used: set[str] = set()
    for path, module in unet.named_modules():
        matched = [p for p in routing.pisa_paths if fnmatch.fnmatchcase(path, p)]
        if not matched or not isinstance(module, Attention):
            continue
        if module.is_cross_attention:
            raise InputError(f"PISA pattern {matched[0]!r} matches the cross-attention {path}: self only")
        used.update(matched)
        proc = PisaAttnProcessor(routing.pisa, context, path, sample_budget)
        module.set_processor(proc)
        hits.setdefault(_transformer_of(unet, path), []).append(proc)
    unused = [p for p in routing.pisa_paths if p not in used]
    if unused:
        raise InputError(f"PISA patterns {unused} match no attention layer of this U-Net")
    for parent, procs in hits.items():

        def record_grid(module, args, kwargs, procs=procs):
            x = args[0] if args else kwargs["hidden_states"]
            for p in procs:
                p.grid = (int(x.shape[-2]), int(x.shape[-1]))

        unet.get_submodule(parent).register_forward_pre_hook(record_grid, with_kwargs=True)
    return context
