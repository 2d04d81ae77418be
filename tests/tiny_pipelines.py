"""Tiny diffusers pipelines with random weights, built from configs and saved in pipeline layout (no download): the
three layouts learnsteps loads as teachers, as diffusers' own pipeline tests build them (get_dummy_components).
The CLIP tokenizer is written from a character vocabulary, so nothing is fetched from the hub."""
import json
from pathlib import Path

import torch

LATENT = 4  # latent side (and channels)


def clip_tokenizer(directory: Path, max_length: int = 12):
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length,
                         pad_token="!")


def vae(channels: int = 3, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=channels, out_channels=channels, latent_channels=LATENT,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, sample_size=2 * LATENT, **config)


def clip_text(hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=hidden, intermediate_size=16,
                            num_attention_heads=2, num_hidden_layers=2, vocab_size=80, projection_dim=hidden,
                            max_position_embeddings=12)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def stable_diffusion(directory: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=LATENT, in_channels=LATENT,
                                out_channels=LATENT, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2, attention_head_dim=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae(), text_encoder=clip_text(8),
                                   tokenizer=clip_tokenizer(directory / "_tok"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def dit(directory: Path, flow: bool = False) -> Path:
    """DiT layout; flow=True: a class-conditional flow-matching model (FlowMatchEulerDiscreteScheduler, shift 2),
    the layout of learnsteps' shipped latent digits model."""
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, Transformer2DModel

    torch.manual_seed(0)
    transformer = Transformer2DModel(sample_size=LATENT, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, in_channels=LATENT, out_channels=2 * LATENT,
                                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                     norm_type="ada_norm_zero", norm_elementwise_affine=False)
    # grey 8x8 images, as the digits: eval.py scores them with the shipped digits feature network
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0) if flow else DPMSolverMultistepScheduler()
    pipe = DiTPipeline(transformer=transformer, vae=vae(channels=1), scheduler=scheduler)
    pipe.save_pretrained(directory)
    index = json.loads((directory / "model_index.json").read_text())  # as facebook/DiT-XL-2-256 ships its labels
    (directory / "model_index.json").write_text(json.dumps(dict(index, id2label={"0": "zero", "1": "one", "2": "two"})))
    return directory


def sd3(directory: Path, shift: float = 3.0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=1, in_channels=LATENT, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=LATENT)
    tok = clip_tokenizer(directory / "_tok")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=clip_text(32, True), tokenizer=tok,
                                    text_encoder_2=clip_text(32, True), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(directory)
    return directory
