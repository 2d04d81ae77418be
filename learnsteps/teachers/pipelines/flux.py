"""FLUX.1 and FLUX.2: rectified-flow transformers over packed latent tokens with position ids, the timestep t itself
(the pipelines pass timestep / 1000, which is the flow "sigma"), the guidance scale as an input of
guidance-distilled models, and a resolution-dependent shift of the sampling grid."""
from __future__ import annotations

import torch

from .adapter import FamilyError, PipelineNet, call_default, register


def _packed_shape(cls, pipe, size, channels: int, packed: bool) -> tuple[int, ...]:
    """(C, H, W) latents of 2x2-packed families; height and width must be multiples of 2 vae_scale_factor (the
    pipelines round other sizes down, and a schedule's size must be the pipeline's)."""
    m = 2 * pipe.vae_scale_factor
    for key in ("height", "width"):
        if size[key] % m:
            raise FamilyError(f"{key}={size[key]} is not a multiple of {m} ({type(pipe).__name__} packs 2x2 latent "
                              f"patches; it would sample at {size[key] // m * m}): use {size[key] // m * m} or "
                              f"{(size[key] // m + 1) * m}")
    h, w = size["height"] // m, size["width"] // m
    return (channels, 2 * h, 2 * w) if packed else (channels, h, w)


class PackedNet(PipelineNet):
    """What FLUX.1 and Qwen-Image share: a flow transformer taking the timestep t itself (the pipelines' timestep /
    1000) over 2x2-packed latent tokens, guidance as an input where distilled, true CFG with a negative prompt, and
    the grid shifted by `calculate_shift` of the image tokens (Qwen-Image's is FLUX's, copied). Our state is the
    unpacked (C, H, W) latents; the call packs them into (H/2 W/2) tokens of 4C with FluxPipeline's own
    _pack_latents (QwenImagePipeline's is the same permutation)."""

    true_cfg = True
    guidance_input = True
    sigma_timestep = True
    timestep_in_network_dtype = True

    @staticmethod
    def to_pipeline(x):
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(x, *x.shape)

    @staticmethod
    def from_pipeline(latents, shape):
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, shape[-2], shape[-1], 1)

    @classmethod
    def latent_shape(cls, pipe, size):
        return _packed_shape(cls, pipe, size, pipe.transformer.config.in_channels // 4, packed=True)

    def mu(self, scheduler_config, steps):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler_config
        return calculate_shift((self.shape[1] // 2) * (self.shape[2] // 2), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))


@register
class FluxNet(PackedNet):
    """FLUX.1 [dev] (guidance embedded: `guidance` is an input, one pass), [schnell] (no guidance), and true CFG
    (`true_cfg_scale` with a negative prompt: a second pass) where asked."""

    pipelines = ("FluxPipeline",)
    summary = "FluxTransformer2DModel (FLUX.1 dev / schnell), text prompts, flow matching, packed latents"

    def call(self, x, timestep, c):
        out = self.net(hidden_states=self.to_pipeline(x), timestep=timestep, guidance=self.embedded_guidance(len(x), x),
                       pooled_projections=self.pooled[c], encoder_hidden_states=self.embeds[c], txt_ids=self.txt_ids,
                       img_ids=self.img_ids, return_dict=False)[0]
        return self.from_pipeline(out, x.shape[1:])

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        emb, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=length)
        if negative is None:  # no negative branch: the row is never read
            return dict(embeds=torch.cat([emb, emb[:1] * 0]), pooled=torch.cat([pooled, pooled[:1] * 0]))
        neg, neg_pooled, _ = pipe.encode_prompt([negative], None, device="cpu", max_sequence_length=length)
        return dict(embeds=torch.cat([emb, neg]), pooled=torch.cat([pooled, neg_pooled]))

    @classmethod
    def build(cls, pipe, tables, shape, size, **kwargs):
        dtype = tables["embeds"].dtype
        ids = dict(img_ids=pipe._prepare_latent_image_ids(1, shape[1] // 2, shape[2] // 2, "cpu", dtype),
                   txt_ids=torch.zeros(tables["embeds"].shape[1], 3, dtype=dtype))
        return cls(pipe.transformer, dict(tables, **ids), shape, **kwargs)


@register
class Flux2Net(PipelineNet):
    """FLUX.2 [dev]: one pass with the guidance as an input (Flux2Pipeline has no negative branch), Mistral-3 text
    embeddings, 4-component position ids. Our state is what Flux2Pipeline's `latents=` takes: the 2x2-patchified
    latents (4C, H/2, W/2), flattened into tokens by its own _pack_latents."""

    pipelines = ("Flux2Pipeline",)
    summary = "Flux2Transformer2DModel (FLUX.2 dev), text prompts (Mistral 3), flow matching, guidance embedded"
    guidance_input = True
    sigma_timestep = True
    timestep_in_network_dtype = True

    def call(self, x, timestep, c):
        from diffusers import Flux2Pipeline

        b = len(x)
        tokens = Flux2Pipeline._pack_latents(x)
        out = self.net(hidden_states=tokens, timestep=timestep, guidance=self.embedded_guidance(b, x),
                       encoder_hidden_states=self.embeds[c], txt_ids=self.txt_ids.expand(b, -1, -1),
                       img_ids=self.img_ids.expand(b, -1, -1), return_dict=False)[0]
        return self.from_pipeline(out[:, : tokens.shape[1]], x.shape[1:])

    @staticmethod
    def from_pipeline(latents, shape):
        """Flux2Pipeline's tokens (B, H W, C) back to (B, C, H, W): the inverse of its _pack_latents (its
        _unpack_latents_with_ids scatters by position ids, which for its own ids is this reshape)."""
        return latents.permute(0, 2, 1).reshape(len(latents), *shape)

    @classmethod
    def latent_shape(cls, pipe, size):
        return _packed_shape(cls, pipe, size, pipe.transformer.config.in_channels, packed=False)

    def mu(self, scheduler_config, steps):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(self.shape[1] * self.shape[2], steps)

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        if negative is not None:
            raise FamilyError("Flux2Pipeline has no negative prompt (FLUX.2 [dev] is guidance-distilled: guidance= "
                              "is its input)")
        emb, _ = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=length,
                                    text_encoder_out_layers=call_default(pipe, "text_encoder_out_layers", (10, 20, 30)))
        return dict(embeds=torch.cat([emb, emb[:1] * 0]))  # no negative branch: the last row is never read

    @classmethod
    def build(cls, pipe, tables, shape, size, **kwargs):
        from diffusers import Flux2Pipeline

        ids = dict(img_ids=Flux2Pipeline._prepare_latent_ids(torch.zeros(1, *shape)),
                   txt_ids=Flux2Pipeline._prepare_text_ids(tables["embeds"][:1]))
        return cls(pipe.transformer, dict(tables, **ids), shape, **kwargs)

    @staticmethod
    def decode(vae, z):
        from diffusers import Flux2Pipeline

        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        return vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample
