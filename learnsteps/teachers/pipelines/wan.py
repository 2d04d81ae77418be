"""Wan 2.1 / 2.2 text-to-video: a flow transformer on 5-D video latents (B, C, F, H, W), UMT5 text embeddings,
classifier-free guidance with a negative prompt, the timestep t * 1000, and a static flow shift (the scheduler's
`flow_shift` or `shift`: the pipeline does not shift with the resolution)."""
from __future__ import annotations

import torch

from .adapter import FamilyError, PipelineNet, call_default, latents_normalised, register


@register
class WanNet(PipelineNet):
    pipelines = ("WanPipeline",)
    summary = "WanTransformer3DModel (Wan 2.1, Wan 2.2 TI2V), text prompts (UMT5), flow matching, video latents"
    size_keys = ("height", "width", "frames")
    expand_timesteps = False  # Wan 2.2 TI2V's pipeline config: a timestep per latent token

    def call(self, x, timestep, c):
        if self.expand_timesteps:
            f, h, w = x.shape[2:]  # Wan 2.2 TI2V: one timestep per token, as WanPipeline's mask[:, ::2, ::2]
            timestep = timestep[:, None].expand(-1, f * ((h + 1) // 2) * ((w + 1) // 2))
        return self.net(hidden_states=x, timestep=timestep, encoder_hidden_states=self.embeds[c],
                        return_dict=False)[0]

    @classmethod
    def default_size(cls, pipe):
        return dict(height=call_default(pipe, "height", 480), width=call_default(pipe, "width", 832),
                    frames=call_default(pipe, "num_frames", 81))

    @classmethod
    def latent_shape(cls, pipe, size):
        s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        p = pipe.transformer.config.patch_size
        m = s * p[1]
        for key in ("height", "width"):
            if size[key] % m:
                raise FamilyError(f"{key}={size[key]} is not a multiple of {m} (WanPipeline: VAE factor {s} times "
                                  f"patch {p[1]})")
        if (size["frames"] - 1) % t:
            raise FamilyError(f"frames={size['frames']} is not 1 + a multiple of {t} (WanPipeline would use "
                              f"{size['frames'] // t * t + 1} frames)")
        return (pipe.transformer.config.in_channels, (size["frames"] - 1) // t + 1, size["height"] // s,
                size["width"] // s)

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        emb, neg = pipe.encode_prompt(prompts, negative_prompt=None if negative is None else [negative] * len(prompts),
                                      do_classifier_free_guidance=True, device="cpu",
                                      max_sequence_length=length)
        return dict(embeds=torch.cat([emb, neg[:1]]))

    @classmethod
    def build(cls, pipe, tables, shape, size, **kwargs):
        if pipe.transformer_2 is not None or pipe.config.get("boundary_ratio") is not None:
            raise FamilyError("this WanPipeline switches between two transformers (Wan 2.2 A14B, boundary_ratio): "
                              "learnsteps loads one-network pipelines (Wan 2.1, Wan 2.2 TI2V-5B)")
        net = cls(pipe.transformer, tables, shape, **kwargs)
        net.expand_timesteps = bool(pipe.config.get("expand_timesteps"))
        return net

    @staticmethod
    def decode(vae, z):
        return vae.decode(latents_normalised(vae, z), return_dict=False)[0]
