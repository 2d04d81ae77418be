"""The UNet and DiT families: Stable Diffusion 1.x / 2.x, SDXL, DiT, and SD3 / SD3.5 (whose MMDiT takes the
unpacked latents and pooled text embeddings)."""
from __future__ import annotations

import torch

from .adapter import FamilyError, PipelineNet, register


@register
class StableDiffusionNet(PipelineNet):
    pipelines = ("StableDiffusionPipeline",)
    summary = "UNet2DConditionModel, text prompts, epsilon or v-prediction"
    denoiser = "unet"

    def call(self, x, timestep, c):
        return self.net(x, timestep, encoder_hidden_states=self.embeds[c]).sample

    @classmethod
    def default_size(cls, pipe):
        s = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return dict(height=s, width=s)

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        emb, neg = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None if negative is None else [negative] * len(prompts))
        return dict(embeds=torch.cat([emb, neg[:1]]))


@register
class SDXLNet(PipelineNet):
    """SDXL's UNet: two text encoders' hidden states, the pooled embedding and the size "time ids" of
    `_get_add_time_ids` (original size = target size = the sampled size, no crop) as added conditions."""

    pipelines = ("StableDiffusionXLPipeline",)
    summary = "UNet2DConditionModel with text_time conditions (two text encoders), epsilon or v-prediction"
    denoiser = "unet"

    def call(self, x, timestep, c):
        added = dict(text_embeds=self.pooled[c], time_ids=self.time_ids.expand(len(c), -1))
        return self.net(x, timestep, encoder_hidden_states=self.embeds[c], added_cond_kwargs=added).sample

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True,
                                                          negative_prompt=negative)
        return dict(embeds=torch.cat([emb, neg[:1]]), pooled=torch.cat([pooled, neg_pooled[:1]]))

    @classmethod
    def build(cls, pipe, tables, shape, size, **kwargs):
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise FamilyError("this SDXL UNet takes a guidance embedding (time_cond_proj_dim: an LCM-distilled model); "
                              "learnsteps learns schedules for the undistilled ODE")
        te2 = pipe.text_encoder_2
        dim = te2.config.projection_dim if te2 is not None else int(tables["pooled"].shape[-1])
        hw = (size["height"], size["width"])
        time_ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=tables["embeds"].dtype, text_encoder_projection_dim=dim)
        return cls(pipe.unet, dict(tables, time_ids=time_ids), shape, **kwargs)


@register
class DiTNet(PipelineNet):
    pipelines = ("DiTPipeline",)
    summary = "Transformer2DModel, class labels"
    class_conditional = True
    size_keys = ()  # DiTPipeline samples at its transformer's one size

    def call(self, x, timestep, c):
        return self.net(x, timestep=timestep, class_labels=self.labels[c]).sample

    @classmethod
    def default_size(cls, pipe):
        return {}

    @classmethod
    def latent_shape(cls, pipe, size):
        cfg = pipe.transformer.config
        s = cfg.sample_size
        return (cfg.in_channels, *((s, s) if isinstance(s, int) else s))

    @staticmethod
    def decode(vae, z):
        return vae.decode(z / vae.config.scaling_factor).sample


@register
class SD3Net(PipelineNet):
    """SD3 and SD3.5 (MMDiT): the latents unpacked, the timestep t * 1000, pooled and sequence text embeddings of
    two CLIP and one (optional) T5 encoder."""

    pipelines = ("StableDiffusion3Pipeline",)
    summary = "SD3Transformer2DModel (SD3, SD3.5), text prompts, flow matching"

    def call(self, x, timestep, c):
        return self.net(hidden_states=x, timestep=timestep, encoder_hidden_states=self.embeds[c],
                        pooled_projections=self.pooled[c]).sample

    @classmethod
    def latent_shape(cls, pipe, size):
        p = pipe.transformer.config.patch_size
        shape = super().latent_shape(pipe, size)
        if shape[1] % p or shape[2] % p:
            raise FamilyError(f"height and width must be multiples of {pipe.vae_scale_factor * p} for this "
                              f"transformer (patch size {p})")
        return shape

    def mu(self, scheduler_config, steps):
        c = scheduler_config
        if not c.get("use_dynamic_shifting"):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.net.config.patch_size
        return calculate_shift((self.shape[1] // p) * (self.shape[2] // p), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative,
            max_sequence_length=length)
        return dict(embeds=torch.cat([emb, neg[:1]]), pooled=torch.cat([pooled, neg_pooled[:1]]))
