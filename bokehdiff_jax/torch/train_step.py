"""One BokehDiff LoRA training step in PyTorch: the reference half of ``bokehdiff-jax bench train-step``.

The same computation as ``train.objective.Objective.loss`` + ``train.step.make_train_step`` with PISA off
and no adversarial term, written the way a PyTorch user would (eager, NCHW)::

    z    = (E(I_f).mean - shift) * s                      diffusers AutoencoderKL
    eps  = U(z, T, prompt; time_ids = (H, W, 0, 0, H, W))  diffusers UNet2DConditionModel + peft LoRA
    I_b  = D((z - sqrt(1 - abar) eps) / sqrt(abar) / s + shift)
    loss = w_mse MSE(I_b, target) + w_edge edge(clip(I_b), target, I_f) + w_lpips LPIPS(clip(I_b), target)
    backward; per-group gradient clipping; torch.optim.AdamW

``TorchTrainStep.from_jax`` builds it from the JAX side's trees, so both start from the same weights:
base weights through ``convert.mapping.flax_to_diffusers``, the LoRA through ``convert.lora`` into
``unet.add_adapter(peft.LoraConfig(...))``; exactly the JAX trainable tree's tensors get gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bokehdiff_jax.convert.lora import flax_lora_to_peft
from bokehdiff_jax.convert.mapping import flax_to_diffusers
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses.config import LossConfig
from bokehdiff_jax.models.bokehdiff import BokehDiff
from bokehdiff_jax.models.layers import LORA_COLLECTION
from bokehdiff_jax.torch import losses as torch_losses
from bokehdiff_jax.torch.lpips import LPIPSVGG

ADAPTER = "default"


def _tensors(flat: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in flat.items()}


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".lora_" not in k]
    if missing or result.unexpected_keys:
        raise InputError(
            f"{what}: the JAX weights do not map one to one: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


class TorchTrainStep:
    """The one-step model, its loss and AdamW in PyTorch. Build it with ``from_jax``.

    ``step(batch)`` runs one update and returns the step's loss terms (floats, computed before the
    update); ``loss(batch)`` the ``(loss, terms)`` of the current weights. Batches hold NCHW tensors:
    ``aif``/``bokeh`` ``[B, 3, H, W]`` in [0, 1] (the loader's range; the model sees [-1, 1]).
    """

    def __init__(
        self,
        model: BokehDiff,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        cond: Mapping[str, torch.Tensor],
        losses: LossConfig,
        lpips: LPIPSVGG | None,
        groups: Mapping[str, list[torch.nn.Parameter]],
        optimizer: Mapping[str, Any],
    ):
        if losses.adv_weight > 0:
            raise InputError("the PyTorch reference step has no adversarial term: use adv_weight=0")
        if losses.lpips_weight > 0 and lpips is None:
            raise InputError("lpips_weight > 0 needs the LPIPS network")
        self.model, self.unet, self.vae, self.losses, self.lpips = model, unet, vae, losses, lpips
        self.prompt_embeds, self.text_embeds = cond["prompt_embeds"], cond["text_embeds"]
        self.groups = {g: list(ps) for g, ps in groups.items()}
        o = optimizer
        self.clip_norm = float(o["clip_norm"])
        # foreach: torch's fastest AdamW on CPU (the default there is one tensor at a time).
        self.opt = torch.optim.AdamW(
            [{"params": ps, "lr": float(o["lr"]) * float(o["lr_scale"][g])} for g, ps in self.groups.items()],
            betas=(float(o["b1"]), float(o["b2"])),
            eps=float(o["eps"]),
            weight_decay=float(o["weight_decay"]),
            foreach=True,
        )

    @classmethod
    def from_jax(
        cls,
        model: BokehDiff,
        trainable: Mapping[str, Any],
        frozen: Mapping[str, Any],
        losses: LossConfig,
        optimizer: Mapping[str, Any],
        *,
        lpips_weights: str | None = None,
    ) -> TorchTrainStep:
        """The PyTorch step with the JAX model's weights.

        ``trainable`` / ``frozen``: ``models.partition.split``'s trees of the model's variables (LoRA mode:
        the U-Net's ``"lora"`` collection and full VAE parts; PISA must be off). ``optimizer``: ``lr``,
        ``lr_scale`` (per group ``lora`` / ``vae``), ``b1``, ``b2``, ``eps``, ``weight_decay``,
        ``clip_norm`` (per group; 0: none), e.g. a training config's ``optimizer`` group (a constant
        schedule is assumed).
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        from bokehdiff_jax.models.partition import merge

        if model.unet.routing.pisa_paths:
            raise InputError("the PyTorch reference step has no PISA: build the model with pisa_paths=()")
        lora_cfg = model.unet.lora
        if lora_cfg is None or set(trainable.get("unet", {})) != {LORA_COLLECTION}:
            raise InputError('the PyTorch reference step trains LoRA + VAE parts (trainable="lora")')
        variables = merge(trainable, frozen)
        unet = UNet2DConditionModel.from_config(model.unet.config.to_diffusers())
        _load_strict(unet, _tensors(flax_to_diffusers(variables["unet"]["params"])), "U-Net")
        vae = AutoencoderKL.from_config(model.vae.config.to_diffusers())
        _load_strict(vae, _tensors(flax_to_diffusers(variables["vae"]["params"])), "VAE")
        unet.add_adapter(
            LoraConfig(
                r=lora_cfg.rank,
                lora_alpha=lora_cfg.alpha,
                init_lora_weights="gaussian",
                target_modules=list(lora_cfg.targets),
            ),
            adapter_name=ADAPTER,
        )
        want = _tensors(flax_lora_to_peft(trainable["unet"][LORA_COLLECTION], prefix=""))
        set_peft_model_state_dict(unet, want, adapter_name=ADAPTER)
        got = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        if got.keys() != want.keys() or any(not torch.equal(got[k], want[k]) for k in want):
            raise InputError("the LoRA did not map one to one onto peft's adapter")
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        lora = [p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        vae_params = dict(vae.named_parameters())
        vae_names = list(flax_to_diffusers(trainable.get("vae", {}).get("params", {})))
        groups = {"lora": lora, "vae": [vae_params[n] for n in vae_names]}
        for p in (*groups["lora"], *groups["vae"]):
            p.requires_grad_(True)
        cond = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in variables["cond"].items()}
        lpips = LPIPSVGG.from_cache(lpips_weights) if losses.lpips_weight > 0 else None
        if lpips is not None:
            lpips.requires_grad_(False)
        return cls(model, unet.train(), vae.train(), cond, losses, lpips, groups, optimizer)

    def render(self, image: torch.Tensor) -> torch.Tensor:
        """The model's output ``[B, 3, H, W]`` (about [-1, 1]) for images in [-1, 1] whose sides are
        multiples of the VAE factor."""
        b, _, h, w = image.shape
        vcfg, s = self.model.vae.config, self.model.schedule
        z = (self.vae.encode(image).latent_dist.mean - vcfg.shift_factor) * vcfg.scaling_factor
        added = None
        if self.model.unet.config.addition_embed_type == "text_time":
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(b, 6)
            added = {"text_embeds": self.text_embeds.expand(b, -1), "time_ids": time_ids}
        t = torch.full((b,), float(s.timestep))
        eps = self.unet(
            z, t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1), added_cond_kwargs=added
        ).sample
        z0 = (z - math.sqrt(1.0 - s.alpha_bar) * eps) / math.sqrt(s.alpha_bar)
        return self.vae.decode(z0 / vcfg.scaling_factor + vcfg.shift_factor).sample

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weighted total, unweighted terms)``, as ``losses.total_loss``."""
        f = self.model.vae_factor
        if batch["aif"].shape[-1] % f or batch["aif"].shape[-2] % f:
            raise InputError(f"the PyTorch reference step needs image sides that are multiples of {f}")
        aif, target = batch["aif"] * 2.0 - 1.0, batch["bokeh"] * 2.0 - 1.0
        pred = self.render(aif)
        lc = self.losses
        clipped = pred.clamp(-1.0, 1.0) if lc.clamp_prediction else pred
        terms: dict[str, torch.Tensor] = {}
        total = pred.new_zeros(())
        if lc.mse_weight > 0:
            terms["mse"] = torch_losses.mse(pred, target)
            total = total + lc.mse_weight * terms["mse"]
        if lc.edge_weight > 0:
            terms["edge"] = torch_losses.edge_loss(
                clipped, target, aif, variant=lc.edge_variant, scales=lc.edge_scales
            )
            total = total + lc.edge_weight * terms["edge"]
        if lc.lpips_weight > 0:
            terms["lpips"] = self.lpips(clipped, target).mean()
            total = total + lc.lpips_weight * terms["lpips"]
        return total, terms

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One update; the loss terms of the weights before it (``loss`` = the weighted total)."""
        self.opt.zero_grad(set_to_none=True)
        loss, terms = self.loss(batch)
        loss.backward()
        if self.clip_norm > 0:  # per group, as train.optim
            for ps in self.groups.values():
                torch.nn.utils.clip_grad_norm_(ps, self.clip_norm)
        self.opt.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
