"""A tiny random-weight Stable Diffusion pipeline (a few hundred kB), built in seconds with no download.

For tests, benchmarks and trying the diffusers teachers offline: its images are noise, but it runs the same code
paths (tokenizer, text encoder, UNet, VAE, scheduler, safetensors loading) as a real checkpoint. The tokenizer's
vocabulary is written here: the 256 byte symbols of CLIP's byte-level BPE, no merges."""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_vocab(folder: Path, max_length: int = 16) -> Path:
    """A CLIP tokenizer folder: special tokens, every byte symbol alone and word-final ('</w>'), no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def save_tiny_pipeline(dest: Path, kind: str = "sd", seed: int = 0, max_length: int = 16) -> Path:
    """Save a random-weight pipeline to `dest` (safetensors): `sd` (StableDiffusionPipeline, loads as img2img and
    text-to-image) or `instruct-pix2pix` (8-channel UNet). Works at any size that is a multiple of 4 px."""
    import tempfile

    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_vocab(Path(tok_dir), max_length))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
            max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=8 if kind == "instruct-pix2pix" else 4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(steps_offset=1)
    cls = StableDiffusionInstructPix2PixPipeline if kind == "instruct-pix2pix" else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    return Path(dest)
