"""``BokehDiffPipeline``: the one-step model in PyTorch/diffusers, from an export (``bokehdiff-jax export``).

::

    from bokehdiff_jax.torch import BokehDiffPipeline
    pipe = BokehDiffPipeline.from_export("exported/", base="stable-diffusion-xl-base-1.0/")
    bokeh = pipe(image_nchw, disparity_bhw, focus=0.5, strength=24.0)     # [-1, 1] in, [-1, 1] out

The same computation as the JAX ``models.bokehdiff.BokehDiff.apply`` (SPEC section 3), in NCHW:
``z = (E(I) - shift) * s``, one U-Net call at ``T`` with the fixed prompt and PISA on the exported layers,
``z0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``, ``I_b = D(z0 / s + shift)``. Images of any size are
padded at the bottom/right to the VAE's multiple (reflect) with their disparity, and cropped back;
``time_ids`` are the real ``(H, W)`` in SDXL's order.

Loading is strict: the base's weights load with ``strict=True``; the LoRA goes in through diffusers'
``load_lora_adapter`` and is then compared tensor by tensor with the file (nothing may be skipped); the VAE
parts load with ``strict=False`` and must produce no unexpected key; the base's content hash is compared
with the one the export records (a warning when it differs: another base, or another precision of it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bokehdiff_jax.convert.peft_files import EXPORT_FORMAT, EXPORT_MANIFEST, LORA_WEIGHTS, VAE_ENCODER
from bokehdiff_jax.convert.trained import BaseTensors, ModelSpec, base_fingerprint
from bokehdiff_jax.convert.weights import PROMPT_EMBEDS, read_config
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.schedule import OneStepSchedule
from bokehdiff_jax.torch.pisa import DEFAULT_SAMPLE_BUDGET, PisaContext, install_pisa

ADAPTER = "bokehdiff"
PAD_MODES = {"reflect": "reflect", "edge": "replicate"}


def _load_component(base: str | os.PathLike, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model built from the base's config and filled strictly from its weights (our checkpoint
    or a diffusers folder: ``BaseTensors`` gives both in diffusers names and PyTorch layouts), one tensor
    at a time into uninitialised storage (no random init, no second copy of the model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
    with BaseTensors(base, component) as t:
        config = read_config(t.folder)
        with torch.device("meta"):
            model = cls.from_config(config)
        model = model.to_empty(device="cpu")
        state = model.state_dict(keep_vars=True)
        if any(n not in state for n, _ in model.named_buffers()):
            model = cls.from_config(config)  # non-persistent buffers need their real initialisation
            state = model.state_dict(keep_vars=True)
        missing, unexpected = sorted(set(state) - set(t.specs)), sorted(set(t.specs) - set(state))
        if missing or unexpected:
            shown = (
                f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})"
            )
            raise InputError(f"{base} {component}: weights do not match its config: {shown}")
        with torch.no_grad():
            for name, tensor in state.items():
                src = torch.from_numpy(np.asarray(t.read(name)))
                if tuple(src.shape) != tuple(tensor.shape):
                    raise InputError(f"{base} {component}: {name} is {tuple(src.shape)}, the config says "
                                     f"{tuple(tensor.shape)}")  # fmt: skip
                tensor.copy_(src)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def _load_lora(unet: torch.nn.Module, export_dir: Path) -> None:
    """diffusers' ``load_lora_adapter`` (as ``load_lora_weights`` does), then a strict check that the
    adapter now holds every tensor of the file, equal (diffusers only warns about what it skipped)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = export_dir / LORA_WEIGHTS
    unet.load_lora_adapter(str(export_dir), weight_name=LORA_WEIGHTS, prefix="unet", adapter_name=ADAPTER)
    want = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
    got = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(want) & set(got) if not torch.equal(got[k].float(), want[k].float()))
    if missing or extra or differ:
        raise InputError(
            f"{path}: the LoRA did not load one to one: not loaded {missing[:5]} ({len(missing)}), "
            f"adapter tensors not in the file {extra[:5]} ({len(extra)}), different values {differ[:5]}"
        )


def _pad(x: torch.Tensor, multiple: int, mode: str) -> torch.Tensor:
    """Pads the last two axes at the bottom/right to multiples of ``multiple`` (NumPy's reflect/edge)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        # torch's reflect needs pad < size; NumPy's (the JAX model's) repeats the reflection.
        xn = x.detach().cpu().numpy()
        widths = [(0, 0)] * (xn.ndim - 2) + [(0, ph), (0, pw)]
        return torch.from_numpy(np.pad(xn, widths, mode="reflect")).to(x)
    lead = x.shape[:-2]
    y = F.pad(x.reshape(-1, 1, h, w), (0, pw, 0, ph), mode=PAD_MODES[mode])
    return y.reshape(*lead, h + ph, w + pw)


class BokehDiffPipeline:
    """The exported one-step model on a base, in PyTorch. Build it with ``from_export``.

    Attributes: ``unet`` (with the LoRA adapter and the PISA processors), ``vae`` (with the trained
    encoder parts), ``spec`` (the export's model description), ``prompt_embeds`` ``[1, L, C]``,
    ``text_embeds`` ``[1, P]``, ``schedule``, ``pisa`` (the ``PisaContext`` the processors read).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        spec: ModelSpec,
        cond: dict[str, torch.Tensor],
        pisa: PisaContext,
        pad_mode: str = "reflect",
    ):
        if pad_mode not in PAD_MODES:
            raise InputError(f"pad_mode {pad_mode!r}: expected one of {sorted(PAD_MODES)}")
        self.unet, self.vae, self.spec, self.pisa, self.pad_mode = unet, vae, spec, pisa, pad_mode
        self.prompt_embeds, self.text_embeds = cond["prompt_embeds"], cond["text_embeds"]
        self.schedule = OneStepSchedule.from_config(None, spec.timestep)

    @classmethod
    def from_export(
        cls,
        export_dir: str | os.PathLike,
        base: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        check_base: bool = True,
        sample_budget: int = DEFAULT_SAMPLE_BUDGET,
        pad_mode: str = "reflect",
    ) -> BokehDiffPipeline:
        """Loads the export folder on ``base`` (our checkpoint or a diffusers SDXL pipeline/unet+vae folder).

        ``dtype``: the U-Net's (and, unless its config says ``force_upcast``, the VAE's) dtype; PISA always
        computes in float32. ``check_base``: compare the base's content hash with the export's record.
        ``sample_budget``: PISA's working-set size (``torch.pisa.pisa_attention``).
        """
        from safetensors.torch import load_file

        export_dir = Path(export_dir)
        p = export_dir / EXPORT_MANIFEST
        try:
            manifest = json.loads(p.read_text())
        except FileNotFoundError:
            raise InputError(f"{export_dir}: not a bokehdiff_jax export (no {EXPORT_MANIFEST})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            raise InputError(f'{p}: not an export manifest (need "format": "{EXPORT_FORMAT}")')
        spec = ModelSpec.from_json(manifest, str(p))
        recorded = (spec.base or {}).get("fingerprint")
        if check_base and recorded:
            got = base_fingerprint(base)
            if got != recorded:
                warnings.warn(
                    f"{base}: its weights differ from the base {spec.base.get('path')} the model was trained "
                    "on (content hash): outputs will differ from the trained model's",
                    stacklevel=2,
                )
        unet = _load_component(base, "unet", dtype)
        vae_cfg = spec.vae_config
        vae = _load_component(base, "vae", torch.float32 if vae_cfg.force_upcast else dtype)
        _load_lora(unet, export_dir)
        if (export_dir / VAE_ENCODER).is_file():
            parts = load_file(export_dir / VAE_ENCODER)
            result = vae.load_state_dict({k: v.to(next(vae.parameters()).dtype) for k, v in parts.items()},
                                         strict=False)  # fmt: skip
            if result.unexpected_keys:
                raise InputError(
                    f"{export_dir / VAE_ENCODER}: keys the VAE lacks: {result.unexpected_keys[:10]}"
                )
        cond = {k: v.to(torch.float32) for k, v in load_file(export_dir / PROMPT_EMBEDS).items()}
        pisa = (
            install_pisa(unet, spec.routing, sample_budget=sample_budget) if spec.routing.pisa_paths else None
        )
        pipe = cls(unet, vae, spec, cond, pisa or PisaContext(), pad_mode)
        return pipe.to(device)

    def to(self, device: str | torch.device) -> BokehDiffPipeline:
        self.unet.to(device)
        self.vae.to(device)
        self.prompt_embeds = self.prompt_embeds.to(device)
        self.text_embeds = self.text_embeds.to(device)
        return self

    @property
    def vae_factor(self) -> int:
        return self.spec.vae_config.downsample_factor

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        disparity: torch.Tensor,
        focus: float | torch.Tensor,
        strength: float | torch.Tensor,
    ) -> torch.Tensor:
        """The bokeh rendering of ``image``.

        Args:
          image: ``[B, 3, H, W]`` all-in-focus image in [-1, 1], any ``H, W >= 1``.
          disparity: ``[B, H, W]`` in [0, 1], 1 nearest.
          focus: ``[B]`` (or a scalar) focus disparity.
          strength: ``[B]`` (or a scalar) ``K``: CoC radius in pixels per unit disparity.

        Returns ``[B, 3, H, W]`` float32, about [-1, 1] (not clipped).
        """
        device = self.prompt_embeds.device
        image = torch.as_tensor(image, dtype=torch.float32, device=device)
        disparity = torch.as_tensor(disparity, dtype=torch.float32, device=device)
        if image.ndim != 4 or image.shape[1] != self.spec.vae_config.in_channels:
            raise InputError(f"image shape {tuple(image.shape)}: expected [batch, 3, H, W]")
        b, _, h, w = image.shape
        if tuple(disparity.shape) != (b, h, w):
            raise InputError(
                f"disparity shape {tuple(disparity.shape)}: expected [batch, H, W] = {(b, h, w)}"
            )
        per_image = []
        for name, x in (("focus", focus), ("strength", strength)):
            x = torch.as_tensor(x, dtype=torch.float32, device=device)
            if x.shape not in ((), (b,)):
                raise InputError(f"{name} shape {tuple(x.shape)}: expected [batch={b}] or a scalar")
            per_image.append(x.expand(b).contiguous())
        x = _pad(image, self.vae_factor, self.pad_mode)
        vcfg = self.spec.vae_config
        vae_dtype = next(self.vae.parameters()).dtype
        unet_dtype = next(self.unet.parameters()).dtype
        mean = self.vae.encode(x.to(vae_dtype)).latent_dist.mean.float()
        z = (mean - vcfg.shift_factor) * vcfg.scaling_factor
        self.pisa.disparity = _pad(disparity, self.vae_factor, self.pad_mode)
        self.pisa.focus, self.pisa.strength = per_image
        try:
            added = None
            if self.spec.unet_config.addition_embed_type == "text_time":
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).expand(b, 6)
                added = {"text_embeds": self.text_embeds.expand(b, -1).to(unet_dtype), "time_ids": time_ids}
            t = torch.full((b,), float(self.schedule.timestep), device=device)
            eps = self.unet(
                z.to(unet_dtype),
                t,
                encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1).to(unet_dtype),
                added_cond_kwargs=added,
            ).sample.float()
        finally:
            self.pisa.disparity = self.pisa.focus = self.pisa.strength = None
        s = self.schedule
        z0 = (z - math.sqrt(1.0 - s.alpha_bar) * eps) / math.sqrt(s.alpha_bar)
        out = self.vae.decode((z0 / vcfg.scaling_factor + vcfg.shift_factor).to(vae_dtype)).sample.float()
        return out[:, :, :h, :w]
