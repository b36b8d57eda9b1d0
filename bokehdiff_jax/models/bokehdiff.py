"""The BokehDiff model: one-step SDXL (SPEC section 3) with PISA, as pure functions over explicit pytrees.

::

    z   = (E(I_f) - shift) * scaling_factor              latent mean, no noise (E: VAE encoder)
    eps = U(z, T, c; PISA(disparity, focus, strength))   one U-Net call at T = 499, fixed prompt c
    z0  = (z - sqrt(1 - abar_T) eps) / sqrt(abar_T)      abar from the scheduler config
    I_b = D(z0 / scaling_factor + shift)                 D: VAE decoder (frozen in training)

``BokehDiff`` holds only static structure (the Flax modules and the schedule constants); every array
lives in an explicit ``variables`` pytree, passed to each call::

    {"unet": {"params": ..., "lora": ...},               "lora" only for a model built with LoRA
     "vae":  {"params": ...},
     "cond": {"prompt_embeds": [1, L, C], "text_embeds": [1, P]}}   the fixed prompt (SPEC section 3)

``models.partition.split`` cuts it into trainable and frozen trees and ``merge`` joins them again;
``convert.base.load_base`` builds the base part from a converted checkpoint or a seeded random init.

Images are ``NHWC`` in [-1, 1] (diffusers' convention), disparity ``[B, H, W]`` in [0, 1] (1 nearest),
focus ``[B]`` a disparity, strength ``[B]`` the CoC radius in input-image pixels per unit disparity.
Any ``H, W >= 1`` works: an image whose sides are not multiples of the VAE's downsampling factor (8 for
SDXL) is padded at the bottom and right (reflect by default, or edge replication) to the next multiple,
with its disparity padded the same way, and the result is cropped back to ``H x W``, so pixel
coordinates (PISA's token centres, the CoC) are those of the input. ``time_ids`` are the real (unpadded)
size, in SDXL's ``(H, W)`` order (SPEC section 6: the released code passed ``(W, H)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting, PisaInputs
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.layers import LORA_COLLECTION
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.schedule import ONE_STEP_TIMESTEP, OneStepSchedule
from bokehdiff_jax.models.unet import UNet2DConditionModel
from bokehdiff_jax.models.vae import AutoencoderKL

Variables = dict[str, Any]
Dtype = Any
PAD_MODES = ("reflect", "edge")
PROMPT_SEQ_LEN = 77  # CLIP's token count
SPEC_ROUTING = AttentionRouting()  # PISA in SPEC's layers (down_blocks.1.attentions.0.*.attn1)


def sdxl_time_ids(height: int, width: int, batch: int) -> jax.Array:
    """SDXL's micro-conditioning ``[batch, 6]`` float32: original size ``(H, W)``, crop top-left
    ``(0, 0)``, target size ``(H, W)`` (diffusers' ``_get_add_time_ids`` order)."""
    return jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (batch, 1))


def random_prompt_embeds(unet_config: UNetConfig, seed: int = 0, seq_len: int = PROMPT_SEQ_LEN) -> dict:
    """Fixed random stand-ins for the prompt embeddings of a base that has none (a tiny or from-scratch
    model): ``{"prompt_embeds": [1, seq_len, cross_attention_dim], "text_embeds": [1, text_embeds_dim]}``,
    float32 standard normal from ``seed`` (same seed, same arrays).

    A pretrained SDXL needs its real embeddings (``convert.prompt``); the loader that decides to use
    these instead says so with a warning.
    """
    rng = np.random.default_rng([seed, 0x70726F6D])  # a stream of its own, apart from other seed users
    return {
        "prompt_embeds": rng.standard_normal((1, seq_len, unet_config.cross_attention_dim), np.float32),
        "text_embeds": rng.standard_normal((1, unet_config.text_embeds_dim), np.float32),
    }


def pad_to_multiple(x: jax.Array, multiple: int, mode: str = "reflect") -> jax.Array:
    """Pads axes 1 and 2 (``H, W`` of ``[B, H, W, ...]``) at the bottom and right up to multiples of
    ``multiple``, by ``"reflect"`` (mirror without repeating the edge) or ``"edge"`` (replicate)."""
    if mode not in PAD_MODES:
        raise InputError(f"pad mode {mode!r}: expected one of {PAD_MODES}")
    h, w = x.shape[1], x.shape[2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    widths = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, widths, mode=mode)


def _per_image(x: Any, batch: int, name: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.shape not in ((), (batch,)):
        raise InputError(f"{name} shape {x.shape}: expected [batch={batch}] (or a scalar for all images)")
    return jnp.broadcast_to(x, (batch,))


def _base_leaf(name: str, shape: tuple[int, ...]) -> float | tuple[float]:
    """A base parameter's init: the lecun-normal std of a kernel (``[..., in, out]``: fan-in is every
    axis but the last), or ``(constant,)`` for a bias (0) or a norm scale (1)."""
    if name == "kernel":
        return float(np.sqrt(1.0 / np.prod(shape[:-1])) / _TRUNCATED_STD)
    if name in ("bias", "scale"):
        return (float(name == "scale"),)
    raise InputError(f"random init: no rule for a parameter named {name!r} (expected kernel, bias, scale)")


# Std of a standard normal truncated to [-2, 2]: lecun-normal divides by it to keep variance 1 / fan_in.
_TRUNCATED_STD = 0.87962566103423978


def _draw(abstract: Any, key: jax.Array, rule: Any, *, truncated: bool) -> Any:
    """Arrays shaped like ``abstract``: ``rule(leaf name, shape)`` gives a std (a random leaf, N(0, std^2),
    truncated to +-2 std if ``truncated``) or ``(constant,)``.

    All random leaves come from one flat draw, cut into leaves on the host: one small XLA program
    instead of one per leaf (on CPU a program with hundreds of outputs takes tens of seconds to compile).
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    specs = [(tuple(x.shape), x.dtype, rule(path[-1].key, tuple(x.shape))) for path, x in paths]
    total = sum(int(np.prod(shape)) for shape, _, r in specs if not isinstance(r, tuple))
    sample = jax.random.truncated_normal if truncated else jax.random.normal
    args = (-2.0, 2.0) if truncated else ()
    flat = np.asarray(sample(key, *args, (total,), jnp.float32))
    out, at = [], 0
    for shape, dtype, r in specs:
        if isinstance(r, tuple):
            out.append(jnp.asarray(np.full(shape, r[0], dtype)))
            continue
        n = int(np.prod(shape))
        out.append(jnp.asarray((flat[at : at + n].reshape(shape) * r).astype(dtype)))
        at += n
    return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class BokehDiff:
    """The one-step model's static structure. Build it with ``create``; every method is a pure function
    of explicit arrays (safe to ``jax.jit`` by closing over the model).

    Attributes:
      unet: the U-Net (its ``routing`` places PISA, its ``lora`` the LoRA adapters).
      vae: the VAE (fp16 computes in fp32 where its config says ``force_upcast``; ``vae_dtype``).
      schedule: timestep ``T`` and ``abar_T``.
      pad_mode: how images are padded to the VAE's multiple (``"reflect"`` or ``"edge"``).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: OneStepSchedule
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise InputError(f"pad_mode {self.pad_mode!r}: expected one of {PAD_MODES}")
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise InputError(
                f"U-Net in_channels {self.unet.config.in_channels} != VAE latent_channels "
                f"{self.vae.config.latent_channels}"
            )
        cfg = self.unet.config
        if cfg.addition_embed_type == "text_time" and getattr(cfg, "num_time_ids", 6) != 6:
            raise InputError(
                f"the one-step model conditions on SDXL base's 6 time ids; this U-Net takes "
                f"{cfg.num_time_ids}"
            )

    @classmethod
    def create(
        cls,
        unet_config: UNetConfig,
        vae_config: VAEConfig,
        *,
        routing: AttentionRouting = SPEC_ROUTING,
        lora: LoRAConfig | None = None,
        remat: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        scheduler_config: Any = None,
        timestep: int = ONE_STEP_TIMESTEP,
        pad_mode: str = "reflect",
    ) -> BokehDiff:
        """The model for these configs.

        Args:
          routing: PISA placement (default SPEC's ``down_blocks.1.attentions.0.*.attn1``);
            ``AttentionRouting(pisa_paths=())`` turns PISA off.
          lora: LoRA on the U-Net (``partition.PartitionConfig.unet_lora``), or None.
          remat: recompute the U-Net's blocks and the VAE's (``AutoencoderKL.remat``) in the backward
            pass; same values and gradients, far less activation memory.
          dtype: compute dtype of the U-Net and the VAE (fp16: the VAE in fp32 under ``force_upcast``);
            None: fp32 inputs.
          param_dtype: dtype of randomly initialised base params (loaded ones keep theirs).
          scheduler_config: diffusers scheduler config (dict or path); None: SDXL's.
          timestep: the one-step timestep ``T``.
        """
        unet = UNet2DConditionModel(
            config=unet_config, routing=routing, lora=lora, remat=remat, dtype=dtype, param_dtype=param_dtype
        )
        vae = AutoencoderKL(config=vae_config, dtype=dtype, param_dtype=param_dtype, remat=remat)
        return cls(unet, vae, OneStepSchedule.from_config(scheduler_config, timestep), pad_mode)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel (8 for SDXL)."""
        return self.vae.config.downsample_factor

    # ------------------------------------------------------------------------------ initialisation
    def abstract_variables(self) -> Variables:
        """``{"unet": {"params", ["lora"]}, "vae": {"params"}}`` as ``jax.ShapeDtypeStruct``s (no arrays)."""
        side = 2 ** len(self.unet.config.block_out_channels)  # shapes do not depend on the input size
        unet_in = self.unet.init_inputs(batch=1, size=(side, side), seq=4)
        vae_in = jnp.zeros((1, self.vae_factor, self.vae_factor, self.vae.config.in_channels), jnp.float32)
        key = jax.random.key(0)
        return {
            "unet": jax.eval_shape(self.unet.init, key, *unet_in),
            "vae": jax.eval_shape(self.vae.init, key, vae_in),
        }

    def init_base_params(self, key: jax.Array) -> Variables:
        """Random base weights ``{"unet": {"params"}, "vae": {"params"}}`` for models trained from scratch
        and tests (no ``"cond"``: see ``random_prompt_embeds``). Same key, same weights.

        The distributions of the modules' initializers (lecun-normal kernels, zero biases, unit norm
        scales), drawn as one flat array and cut into leaves: building them through ``module.init`` under
        ``jit`` compiles the whole forward pass and one RNG graph per parameter (minutes on CPU).
        """
        abstract = self.abstract_variables()
        k_unet, k_vae = jax.random.split(key)
        return {
            "unet": {"params": _draw(abstract["unet"]["params"], k_unet, _base_leaf, truncated=True)},
            "vae": {"params": _draw(abstract["vae"]["params"], k_vae, _base_leaf, truncated=True)},
        }

    def init_lora(self, key: jax.Array) -> dict:
        """A fresh ``"lora"`` collection, or ``{}`` without LoRA: peft's ``init_lora_weights="gaussian"``,
        ``A ~ N(0, (1/rank)^2)`` and ``B = 0``, so a fresh adapter changes nothing. Same key, same arrays."""
        lora = self.unet.lora
        if lora is None:
            return {}
        abstract = self.abstract_variables()["unet"][LORA_COLLECTION]
        leaf = lambda name, shape: 1.0 / lora.rank if name == "A" else 0.0
        return _draw(abstract, key, leaf, truncated=False)

    def add_lora(self, variables: Variables, key: jax.Array) -> Variables:
        """``variables`` plus a fresh LoRA collection under ``"unet"`` (other arrays shared, not copied)."""
        if self.unet.lora is None:
            return variables
        return {**variables, "unet": {**variables["unet"], LORA_COLLECTION: self.init_lora(key)}}

    # -------------------------------------------------------------------------------------- parts
    def encode(self, variables: Variables, image_bhwc: jax.Array, *, tile: int | None = None) -> jax.Array:
        """``z = (mean - shift) * scaling_factor``: ``[B, H, W, 3]`` in [-1, 1] -> ``[B, H/f, W/f, C]`` fp32.
        Sides should be multiples of ``vae_factor`` (``apply`` pads); otherwise the VAE rounds down.

        ``tile``: run the exact tiled VAE (``models.vae_tiling``, output tiles of ``tile`` px; host-driven,
        not jittable) instead of the whole map at once; same values, bounded device memory."""
        cfg = self.vae.config
        if tile is None:
            mean, _ = self.vae.apply(variables["vae"], image_bhwc, method="encode")
        else:
            from bokehdiff_jax.models.vae_tiling import encode_tiled

            mean, _ = encode_tiled(self.vae, variables["vae"], image_bhwc, tile=tile)
        return (mean.astype(jnp.float32) - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, variables: Variables, z_bhwc: jax.Array, *, tile: int | None = None) -> jax.Array:
        """``D(z / scaling_factor + shift)``: scaled latents -> ``[B, f h, f w, 3]``, about [-1, 1], fp32.

        ``tile``: the exact tiled VAE with output tiles of ``tile`` latents (``tile * f`` px), as in
        ``encode``."""
        cfg = self.vae.config
        z = z_bhwc / cfg.scaling_factor + cfg.shift_factor
        if tile is None:
            x = self.vae.apply(variables["vae"], z, method="decode")
        else:
            from bokehdiff_jax.models.vae_tiling import decode_tiled

            x = decode_tiled(self.vae, variables["vae"], z, tile=tile)
        return x.astype(jnp.float32)

    def predict_noise(
        self, variables: Variables, z_bhwc: jax.Array, time_ids: jax.Array, pisa: PisaInputs | None
    ) -> jax.Array:
        """``eps(z, T, c)``: the U-Net at the fixed timestep with the fixed prompt; fp32 ``[B, h, w, C]``.

        ``time_ids``: ``[B, 6]`` (``sdxl_time_ids``); ``pisa``: the per-call PISA inputs, or None for
        vanilla attention everywhere."""
        b = z_bhwc.shape[0]
        cond = variables["cond"]
        prompt = jnp.asarray(cond["prompt_embeds"])
        prompt = jnp.broadcast_to(prompt, (b, *prompt.shape[1:]))
        extra = ()
        if self.unet.config.addition_embed_type == "text_time":
            text = jnp.asarray(cond["text_embeds"])
            extra = (jnp.broadcast_to(text, (b, text.shape[-1])), time_ids)
        t_b = jnp.full((b,), self.schedule.timestep, jnp.float32)
        eps = self.unet.apply(variables["unet"], z_bhwc, t_b, prompt, *extra, attention_context=pisa)
        return eps.astype(jnp.float32)

    def denoise(self, z_bhwc: jax.Array, eps_bhwc: jax.Array) -> jax.Array:
        """``z0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``, in fp32."""
        s = self.schedule
        return (z_bhwc.astype(jnp.float32) - s.sqrt_one_minus_alpha_bar * eps_bhwc) / s.sqrt_alpha_bar

    # ------------------------------------------------------------------------------------ the model
    def apply(
        self,
        variables: Variables,
        image_bhwc: jax.Array,
        disparity_bhw: jax.Array,
        focus_b: jax.Array,
        strength_b: jax.Array,
        *,
        step: jax.Array | int | None = None,
        key: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """The bokeh rendering ``I_b`` of ``image_bhwc``.

        Args:
          variables: the full tree (see the module docstring; ``partition.merge`` of trainable and frozen).
          image_bhwc: ``[B, H, W, 3]`` all-in-focus image in [-1, 1], any ``H, W >= 1``.
          disparity_bhw: ``[B, H, W]`` in [0, 1], 1 nearest.
          focus_b: ``[B]`` focus disparity (or a scalar for every image).
          strength_b: ``[B]`` blur strength ``K``: CoC radius in pixels per unit disparity (or a scalar).
          step: training step for PISA's hardness schedule ``beta = log(3 + step)``
            (``pisa.training_hardness``); None uses the inference hardness of the routing's ``PisaConfig``.
          key: ``jax.random`` key for PISA's training jitter and dropout (``train=True``); same key, same
            result. Unused at inference.
          train: training mode of PISA (jitter from ``key``, dropout); static.

        Returns ``[B, H, W, 3]`` float32, about [-1, 1] (not clipped: losses see the raw decoder output).
        """
        image_bhwc = jnp.asarray(image_bhwc)
        disparity_bhw = jnp.asarray(disparity_bhw)
        if image_bhwc.ndim != 4 or image_bhwc.shape[-1] != self.vae.config.in_channels:
            raise InputError(
                f"image shape {image_bhwc.shape}: expected [batch, H, W, {self.vae.config.in_channels}]"
            )
        b, h, w, _ = image_bhwc.shape
        if disparity_bhw.shape != (b, h, w):
            raise InputError(f"disparity shape {disparity_bhw.shape}: expected [batch, H, W] = {(b, h, w)}")
        pisa = PisaInputs(
            disparity=pad_to_multiple(disparity_bhw.astype(jnp.float32), self.vae_factor, self.pad_mode),
            focus=_per_image(focus_b, b, "focus"),
            strength=_per_image(strength_b, b, "strength"),
            step=step,
            key=key,
            train=train,
        )
        x = pad_to_multiple(image_bhwc.astype(jnp.float32), self.vae_factor, self.pad_mode)
        z = self.encode(variables, x)
        eps = self.predict_noise(variables, z, sdxl_time_ids(h, w, b), pisa)
        return self.decode(variables, self.denoise(z, eps))[:, :h, :w]
