"""The non-DiT parts of a synthetic checkpoint: tokenizer, UMT5 text encoder, Wan VAE.

They are written in the formats ``transformers`` and ``diffusers`` load with ``from_pretrained``.
Module shapes come from the real classes built on the meta device (no memory), so the tensor names
always match the installed library; values come from the same seeded generator as the DiT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longcat_tools.safetensors_io import TensorSpec, write_file, write_sharded
from longcat_tools.synth import LATENTS_MEAN, LATENTS_STD, ST_METADATA, Preset, random_tensor

# A small corpus in the style of LongCat prompts, enough to train a tokenizer with a few hundred
# pieces; the real one is umt5's 256k-piece sentencepiece model.
CORPUS = [
    "A cat sits on a sunny windowsill and watches birds fly past the garden.",
    "In a realistic photography style, a white boy around seven or eight years old sits on a "
    "park bench, wearing a light blue T-shirt, denim shorts, and white sneakers.",
    "A skateboarder glides down a city street at dusk, neon lights reflecting on wet asphalt.",
    "A woman rides a motorcycle along a coastal road, the camera following from behind.",
    "Close-up of raindrops falling on green leaves, slow motion, shallow depth of field.",
    "A chef chops vegetables in a bright kitchen; steam rises from a pot on the stove.",
    "Aerial view of mountains covered in snow, clouds drifting slowly over the peaks.",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards",
    "一只小猫在阳光下的窗台上睡觉。 Die Katze schläft. Le chat dort au soleil.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2025 720p 480p 30fps 15fps",
]


def write_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    """Train a tiny unigram tokenizer with T5's special tokens and save it as a T5 tokenizer
    (``tokenizer.json`` + configs); returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size,
                                      special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                            special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=512)
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def _meta_specs(module: torch.nn.Module, seed: int, dtype: torch.dtype,
                prefix: str) -> list[TensorSpec]:
    """Specs for a module's parameters and persistent buffers (tied weights once)."""
    specs = []
    for name, p in module.named_parameters():
        key = f"{prefix}/{name}"
        specs.append(TensorSpec(name, dtype, tuple(p.shape),
                                lambda key=key, shape=tuple(p.shape): random_tensor(
                                    _canonical(key), shape, seed, dtype)))
    return specs


def _canonical(key: str) -> str:
    # RMS-norm scales in the Wan VAE are called gamma; treat them like norm weights.
    return key[: -len("gamma")] + "norm.weight" if key.endswith("gamma") else key


def text_encoder_config(preset: Preset, vocab: int):
    from transformers import UMT5Config

    te = dict(preset.text_encoder)
    return UMT5Config(
        vocab_size=te.pop("vocab_size", vocab), num_decoder_layers=te["num_layers"],
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
        layer_norm_epsilon=1e-6, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, scalable_attention=True, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
        tokenizer_class="T5Tokenizer", architectures=["UMT5EncoderModel"], **te)


def write_text_encoder(folder: Path, preset: Preset, vocab: int, seed: int, dtype: torch.dtype,
                       sparse: bool) -> None:
    """``text_encoder/``: config.json + model-0000k-of-0000n.safetensors + index, like the hub."""
    from transformers import UMT5EncoderModel

    cfg = text_encoder_config(preset, vocab)
    folder.mkdir()
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    write_sharded(folder, "model", _meta_specs(model, seed, dtype, "text_encoder"),
                  preset.te_shard_bytes, ST_METADATA, sparse=sparse, force_index=True)


def write_vae(folder: Path, preset: Preset, seed: int, sparse: bool) -> None:
    """``vae/``: an ``AutoencoderKLWan`` (fp32, one file) with LongCat's latent statistics."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[],
                               temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                               latents_std=LATENTS_STD, **preset.vae)
    folder.mkdir()
    vae.save_config(folder)
    write_file(folder / "diffusion_pytorch_model.safetensors",
               _meta_specs(vae, seed, torch.float32, "vae"), ST_METADATA, sparse=sparse)
