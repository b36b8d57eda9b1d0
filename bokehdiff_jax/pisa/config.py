"""``PisaConfig``: the static switches and numbers of PISA (SPEC section 2); hashable (jit static)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from bokehdiff_jax.errors import InputError

IMPLS = ("auto", "dense", "blockwise", "sparse")
UNITS = ("pixels", "released")

# The released code's inference hardness: the soft edge sigmoid(beta (r - dist)) with beta = log(1e7).
INFERENCE_HARDNESS = math.log(1e7)


@dataclasses.dataclass(frozen=True)
class PisaConfig:
    """PISA options. Every physical ingredient is a switch; all off is ordinary softmax attention.

    Attributes:
      softmax_q: normalise each key's column over queries (Eq. 3: every key spends energy 1) instead of
        each query's row over keys.
      coc: multiply by the circle-of-confusion mask ``C_ij = sigmoid(beta (r_j - |P_i - P_j|))`` inside the
        normalisation (Eq. 5-6).
      occlusion: multiply the normalised weights by the visibility ``Vis_ij`` (Eq. 8-9).
      segments: ``T``, ray samples per pair.
      supersample: ``S``, jittered source positions per pair.
      hardness: ``beta`` at inference (``step=None``), per image pixel; ``math.inf`` makes the edge a hard
        step ``C = [dist <= r]`` (an in-focus key, ``r = 0``, still reaches its own query). With a
        ``step`` the training schedule ``beta = log(3 + step)`` is used.
      dropout: dropout rate on the weights, in training only (the released code uses 0.1).
      train_occlusion_clamp: if set, the occlusion ``1 - Vis`` is clamped to at most this value in
        training (the released code's 0.99; off by default: it is a train/test mismatch).
      t_from_query: sample ``t`` between the *query's* disparity and 1 (released code) instead of the
        key's (SPEC). Needed only to load the released weights.
      units: ``"pixels"`` (SPEC: distances and radii in input-image pixels) or ``"released"``: token
        centres on a unit grid, distances times ``released_scale`` (51.2), and the CoC radius
        ``|d - d_f| K released_upsample / 10`` (the released code's CoC channel).
      released_scale, released_upsample: the constants of the ``"released"`` units.
      impl: ``"dense"`` (reference; materialises N x N, and N x N x T x S for occlusion), ``"blockwise"``
        (O(N * block) memory, forward and backward), ``"sparse"`` (blockwise skipping block pairs the
        CoC cannot reach) or ``"auto"``: chosen per call from the backend and sizes (``resolve_impl``).
        All give the same result up to rounding (sparse: up to ``sparse_tolerance``).
      block_q, block_k: query and key block sizes (tokens) of blockwise and sparse.
      keys_per_step: work per loop iteration of blockwise/sparse, as keys: ``keys_per_step // block_k``
        (query block, key block) pairs are computed together (at least one). A CPU is fastest with one
        pair per iteration, an accelerator needs a device's worth of work per iteration. None:
        ``KEYS_PER_STEP`` of the backend.
      sparse_tolerance: sparse skips a pair of blocks when the soft edge is below this value on every
        (query, key) pair in it; 0 skips nothing (unless the edge is hard, where it skips exact zeros).
    """

    softmax_q: bool = True
    coc: bool = True
    occlusion: bool = True
    segments: int = 7
    supersample: int = 5
    hardness: float = INFERENCE_HARDNESS
    dropout: float = 0.0
    train_occlusion_clamp: float | None = None
    t_from_query: bool = False
    units: str = "pixels"
    released_scale: float = 51.2
    released_upsample: float = 1.0
    impl: str = "auto"
    block_q: int = 128
    block_k: int = 128
    keys_per_step: int | None = None
    sparse_tolerance: float = 1e-6

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise InputError(f"PisaConfig.impl={self.impl!r}: expected one of {IMPLS}")
        if self.units not in UNITS:
            raise InputError(f"PisaConfig.units={self.units!r}: expected one of {UNITS}")
        if self.segments < 1 or self.supersample < 1:
            raise InputError(
                f"PisaConfig segments={self.segments}, supersample={self.supersample}: expected both >= 1"
            )
        if not (self.hardness > 0):
            raise InputError(f"PisaConfig.hardness={self.hardness}: expected > 0 (math.inf = hard edge)")
        if not (0.0 <= self.dropout < 1.0):
            raise InputError(f"PisaConfig.dropout={self.dropout}: expected in [0, 1)")
        clamp = self.train_occlusion_clamp
        if clamp is not None and not (0.0 <= clamp <= 0.99):
            raise InputError(f"PisaConfig.train_occlusion_clamp={clamp}: expected None or in [0, 0.99]")
        if self.block_q < 1 or self.block_k < 1:
            raise InputError(f"PisaConfig blocks ({self.block_q}, {self.block_k}): expected >= 1")
        if self.keys_per_step is not None and self.keys_per_step < 1:
            raise InputError(f"PisaConfig.keys_per_step={self.keys_per_step}: expected None or >= 1")
        if not (0.0 <= self.sparse_tolerance < 0.5):
            raise InputError(f"PisaConfig.sparse_tolerance={self.sparse_tolerance}: expected in [0, 0.5)")

    @property
    def hard_edge(self) -> bool:
        """True when the inference edge is a hard step (``hardness = inf``)."""
        return math.isinf(self.hardness)


DEFAULT_CONFIG = PisaConfig()

# impl="auto": dense while its working set, the [B, heads, Nq, Nk] float32 weights plus (with occlusion)
# the [B, Nq, Nk, S] visibility samples, fits this many bytes (a training call, which keeps them for the
# backward pass, gets a quarter); beyond it sparse (blockwise without the CoC). On a CPU dense loses to
# sparse early (bench pisa: 5.6x slower at N = 1024); an accelerator runs dense fastest while it fits.
DENSE_BUDGET = {"cpu": 16 * 2**20, "accelerator": 2**30}
# keys_per_step=None: keys per loop iteration of blockwise/sparse (8192: 64 pairs of 128-token blocks).
# 0: one block pair (a CPU's caches).
KEYS_PER_STEP = {"cpu": 0, "accelerator": 8192}


def _kind(backend: str) -> str:
    return "cpu" if backend == "cpu" else "accelerator"


def resolve_impl(
    config: PisaConfig, *, batch: int, heads: int, n_q: int, n_k: int, train: bool, backend: str
) -> tuple[str, int]:
    """``(impl, keys_per_step)`` of a call: ``config.impl`` unless ``"auto"`` (see ``DENSE_BUDGET``), and
    ``config.keys_per_step`` unless None (``KEYS_PER_STEP``; at least one key block)."""
    kind = _kind(backend)
    impl = config.impl
    if impl == "auto":
        per_pair = heads + (config.supersample if config.occlusion else 0)
        dense_bytes = 4 * batch * n_q * n_k * per_pair
        budget = DENSE_BUDGET[kind] // (4 if train else 1)
        impl = "dense" if dense_bytes <= budget else "sparse" if config.coc else "blockwise"
    keys = config.keys_per_step if config.keys_per_step is not None else KEYS_PER_STEP[kind]
    return impl, max(keys, config.block_k)


def training_hardness(step):
    """The released training schedule ``beta = log(3 + step)``: a pure function of the step (SPEC 2)."""
    return jnp.log(3.0 + jnp.asarray(step, jnp.float32))
