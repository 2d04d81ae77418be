"""Tiny diffusers pipelines with random weights, built from configs and saved in pipeline layout (no download): every
family learnsteps loads as a teacher, as diffusers' own pipeline tests build them (get_dummy_components), and the
helpers that call them as their users do. The tokenizers (CLIP, T5 / UMT5, Qwen's byte-level BPE, a chat-template
one for FLUX.2's Mistral) are written from a character vocabulary, so nothing is fetched from the hub."""
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


# ---------------------------------------------------------------------- the families users bring today (#29)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def t5_tokenizer(directory: Path | None = None, chat: bool = False):
    """A sentencepiece-free T5 tokenizer from a character vocabulary (transformers builds it from the pieces);
    chat=True adds a chat template (FLUX.2's Mistral processor is called through apply_chat_template)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in CHARS] \
        + [(c, -2.0) for c in CHARS + "[]:.,'"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    if chat:
        tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{% for c in m.content %}{{ c.text }}{% endfor %}"
                             "{% endfor %}")
    return tok


T5_VOCAB = 3 + 2 * len(CHARS) + 6


def t5_encoder(hidden: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    kw = dict(vocab_size=T5_VOCAB, d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
              relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def sdxl(directory: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=LATENT, in_channels=LATENT,
                                out_channels=LATENT, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
                                cross_attention_dim=32, norm_num_groups=2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")  # as SDXL base 1.0 ships it
    tok = clip_tokenizer(directory / "_tok")
    pipe = StableDiffusionXLPipeline(unet=unet, scheduler=scheduler, vae=vae(scaling_factor=0.13025),
                                     text_encoder=clip_text(16), tokenizer=tok, text_encoder_2=clip_text(16, True),
                                     tokenizer_2=tok)
    pipe.save_pretrained(directory)
    return directory


def flux(directory: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1 [dev] layout (guidance_embeds=False: [schnell]), with FLUX.1-dev's dynamically shifting scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=clip_text(16),
                        tokenizer=clip_tokenizer(directory / "_tok"), text_encoder_2=t5_encoder(16),
                        tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(directory)
    return directory


def flux2(directory: Path) -> Path:
    """FLUX.2 [dev] layout: a Mistral-3 text encoder (31 layers, so that the pipeline's layers 10, 20, 30 exist)
    behind a chat-template tokenizer."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 16,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=T5_VOCAB, hidden_size=16, intermediate_size=37,
                         max_position_embeddings=1024, num_attention_heads=4, num_hidden_layers=31, num_key_value_heads=2,
                         rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, image_size=30, patch_size=6, num_channels=3),
        bos_token_id=2, eos_token_id=1, pad_token_id=0, image_seq_length=4, vision_feature_layer=-1,
        image_token_index=T5_VOCAB - 1)
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    autoencoder = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                     latent_channels=LATENT, norm_num_groups=2, sample_size=16)
    pipe = Flux2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0,
                         use_dynamic_shifting=True), vae=autoencoder, text_encoder=text_encoder,
                         tokenizer=t5_tokenizer(chat=True))
    pipe.save_pretrained(directory)
    return directory


def qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen's chat tokens and no merges: every character is a token."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def qwenimage(directory: Path) -> Path:
    """Qwen-Image layout with Qwen-Image's own scheduler config (dynamic shift, shift_terminal 0.02)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT, out_channels=LATENT, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    autoencoder = AutoencoderKLQwenImage(base_dim=24, z_dim=LATENT, dim_mult=[1, 2, 4], num_res_blocks=1,
                                         temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                         latents_std=[1.5, 2.0, 1.0, 0.5])
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    tok = qwen_tokenizer()
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default",
                                                                  type="default"), rope_theta=1e6, vocab_size=len(tok),
                         bos_token_id=len(tok) - 3, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 3),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tok), bos_token_id=len(tok) - 3, eos_token_id=len(tok) - 1,
        pad_token_id=len(tok) - 3, vision_end_token_id=len(tok) - 1, vision_start_token_id=len(tok) - 1,
        vision_token_id=len(tok) - 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler, text_encoder=text_encoder,
                             tokenizer=tok)
    pipe.save_pretrained(directory)
    return directory


def wan(directory: Path, expand_timesteps: bool = False) -> Path:
    """Wan 2.1 text-to-video layout: UMT5, a 3-D VAE (8x spatial, 4x temporal), UniPC with flow sigmas as Wan
    ships it (flow_shift 3.0: its 480p setting); expand_timesteps: Wan 2.2 TI2V's one timestep per token."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    autoencoder = AutoencoderKLWan(base_dim=3, z_dim=LATENT, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                   latents_std=[1.5, 2.0, 1.0, 0.5])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=LATENT, out_channels=LATENT, text_dim=16, freq_dim=256, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler, text_encoder=t5_encoder(16, True),
                       tokenizer=t5_tokenizer(), expand_timesteps=expand_timesteps)
    pipe.save_pretrained(directory)
    return directory


BUILD = {"sdxl": sdxl, "flux": flux, "schnell": lambda d: flux(d, guidance_embeds=False), "flux2": flux2,
         "qwen": qwenimage, "wan": wan, "wan22": lambda d: wan(d, expand_timesteps=True)}


# ---------------------------------------------------------------------- calling them as their users do
def load_pipeline(directory):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, teacher, x_T, **kwargs):
    """The pipeline called as a user calls it for the teacher's prompts, guidance and size, from our state x_T
    (packed where the pipeline packs), its latents returned as our state."""
    from learnsteps.teachers.pipelines import FAMILIES, latents_state, pipeline_latents

    c = teacher.config
    family = FAMILIES[c["pipeline"]]
    kw = dict(height=c["height"], width=c["width"], **({"num_frames": c["frames"]} if "frames" in c else {}))
    kw["guidance_scale"] = c["guidance"] if not family.guidance_input or teacher.net.guidance is not None else None
    if family.true_cfg:
        kw["true_cfg_scale"] = c["true_cfg"]
    if "max_sequence_length" in c:
        kw["max_sequence_length"] = c["max_sequence_length"]
    if c.get("negative_prompt") is not None:
        kw["negative_prompt"] = [c["negative_prompt"]] * len(teacher.conditions)
    out = pipe(prompt=teacher.conditions, latents=pipeline_latents(pipe, x_T), output_type="latent", **kw, **kwargs)
    return latents_state(pipe, out.images if hasattr(out, "images") else out.frames, teacher.shape)


def own_grid(pipe, teacher):
    """The grid the pipeline's own scheduler ran on (after the call), in our time, and its solver."""
    s, sc = teacher.noise_schedule, pipe.scheduler
    if s.kind == "flow":
        grid = sc.sigmas.double().clone()
    else:  # EulerDiscreteScheduler's timesteps, then sigma = 0
        grid = torch.cat([sc.timesteps.double(), torch.tensor([s.t_zero], dtype=torch.float64)])
    if type(sc).__name__ == "UniPCMultistepScheduler":
        return grid, dict(solver="unipc", order=sc.config.solver_order, variant=sc.config.solver_type)
    return grid, dict(solver="euler", order=1)


def dinov2(directory: Path, size: int = 32) -> Path:
    """A tiny DINOv2 (random weights) with its image processor, saved as a local copy of facebook/dinov2-small is:
    the vision model a user hands the feature terms (feature_net=<folder>)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=size, patch_size=8)).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory
