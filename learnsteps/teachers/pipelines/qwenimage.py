"""Qwen-Image: a flow transformer over packed latent tokens (as FLUX), Qwen2.5-VL text embeddings with their mask,
and true CFG (`true_cfg_scale` with a negative prompt) renormalised to the conditional output's norm per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter import latents_normalised, register
from .flux import PackedNet


@register
class QwenImageNet(PackedNet):
    pipelines = ("QwenImagePipeline",)
    summary = "QwenImageTransformer2DModel, text prompts (Qwen2.5-VL), flow matching, packed latents, true CFG"

    def call(self, x, timestep, c):
        b, _, h, w = x.shape
        mask = self.mask[c]
        out = self.net(hidden_states=self.to_pipeline(x), timestep=timestep, guidance=self.embedded_guidance(b, x),
                       encoder_hidden_states_mask=None if mask.all() else mask, encoder_hidden_states=self.embeds[c],
                       img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return self.from_pipeline(out, x.shape[1:])

    def combine(self, cond, uncond, scale):
        """QwenImagePipeline's true CFG: neg + s (cond - neg), rescaled per token to the conditional output's norm
        (over the 4C channels of a packed 2x2 patch)."""
        cond_t, comb_t = self.to_pipeline(cond), self.to_pipeline(uncond + scale * (cond - uncond))
        out = comb_t * (torch.norm(cond_t, dim=-1, keepdim=True) / torch.norm(comb_t, dim=-1, keepdim=True))
        return self.from_pipeline(out, cond.shape[1:])

    @classmethod
    def encode(cls, pipe, prompts, negative, length):
        rows = [pipe.encode_prompt(prompts, device="cpu", max_sequence_length=length)]
        if negative is not None:
            rows.append(pipe.encode_prompt([negative], device="cpu", max_sequence_length=length))
        # one table: every row padded to the longest, its mask saying which tokens are the prompt's
        n = max(e.shape[1] for e, _ in rows)
        embeds = [F.pad(e, (0, 0, 0, n - e.shape[1])) for e, _ in rows]
        masks = [F.pad(torch.ones(e.shape[:2], dtype=torch.long) if m is None else m.long(), (0, n - e.shape[1]))
                 for e, m in rows]
        if negative is None:  # no negative branch: the row is never read
            embeds.append(embeds[0][:1] * 0)
            masks.append(masks[0][:1])
        return dict(embeds=torch.cat(embeds), mask=torch.cat(masks))

    @staticmethod
    def decode(vae, z):
        return vae.decode(latents_normalised(vae, z[:, :, None]), return_dict=False)[0][:, :, 0]
