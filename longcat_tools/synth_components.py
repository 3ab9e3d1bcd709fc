"""The non-DiT parts of a synthetic checkpoint: tokenizer, UMT5 text encoder, Wan VAE.

They are written in the formats ``transformers`` and ``diffusers`` load with ``from_pretrained``.
The tokenizer and text encoder are written without importing transformers (it would triple the
time of ``synth``; a test checks the tensor list against the real class); the VAE's tensor list
comes from diffusers' class built on the meta device (no memory). Values come from the same seeded
generator as the DiT.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from longcat_tools.io.safetensors import TensorSpec, write_file, write_json, write_sharded
from longcat_tools.synth_presets import ST_METADATA, Preset, random_tensor

# The Wan 2.1 VAE statistics that LongCat ships (vae/config.json).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

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


def tokenizer_vocab(vocab_size: int = 384) -> list[tuple[str, float]]:
    """A unigram vocabulary counted from ``CORPUS``: T5's special tokens, every character, then
    words and character n-grams by frequency (ties by the piece itself), scored by log frequency.

    Counted, not trained: ``tokenizers``' UnigramTrainer gives scores that differ in the last bits
    from run to run, so near-tied pieces swapped ids and the same prompt got other token ids.
    """
    words = Counter(f"▁{w}" for line in CORPUS for w in line.split())
    grams: Counter[str] = Counter()
    for w, n in words.items():
        for size in (2, 3):
            for i in range(len(w) - size + 1):
                grams[w[i:i + size]] += n
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    total = sum(words.values()) + sum(grams.values()) + sum(chars.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, math.log(n / total) - 10.0) for c, n in sorted(chars.items())]
    taken = {p for p, _ in vocab}
    for counts in (words, grams):
        for piece, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(vocab) == vocab_size:
                return vocab
            if piece not in taken:
                vocab.append((piece, math.log(n / total)))
                taken.add(piece)
    raise ValueError(f"the corpus gives only {len(vocab)} pieces, fewer than {vocab_size}")


def write_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    """Save a tiny unigram tokenizer with T5's special tokens as ``AutoTokenizer`` loads a umt5
    tokenizer (``tokenizer.json`` + configs); returns its vocabulary size.

    Written with ``tokenizers`` alone: importing transformers would triple the time of ``synth``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.Unigram(tokenizer_vocab(vocab_size), unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                            special_tokens=[("</s>", 1)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    write_json(folder / "tokenizer_config.json",
               {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
                "additional_special_tokens": [], **special})
    write_json(folder / "special_tokens_map.json", special)
    return tok.get_vocab_size()


def umt5_encoder_specs(d_model: int, d_ff: int, d_kv: int, num_heads: int, num_layers: int,
                       vocab_size: int, num_buckets: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of ``UMT5EncoderModel``'s weights as ``save_pretrained`` writes them (the
    tied ``encoder.embed_tokens`` once, as ``shared``); every layer has its own position bias."""
    inner = num_heads * d_kv
    specs: list[tuple[str, tuple[int, ...]]] = [("shared.weight", (vocab_size, d_model))]
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        specs += [(f"{b}.0.SelfAttention.q.weight", (inner, d_model)),
                  (f"{b}.0.SelfAttention.k.weight", (inner, d_model)),
                  (f"{b}.0.SelfAttention.v.weight", (inner, d_model)),
                  (f"{b}.0.SelfAttention.o.weight", (d_model, inner)),
                  (f"{b}.0.SelfAttention.relative_attention_bias.weight", (num_buckets, num_heads)),
                  (f"{b}.0.layer_norm.weight", (d_model,)),
                  (f"{b}.1.DenseReluDense.wi_0.weight", (d_ff, d_model)),
                  (f"{b}.1.DenseReluDense.wi_1.weight", (d_ff, d_model)),
                  (f"{b}.1.DenseReluDense.wo.weight", (d_model, d_ff)),
                  (f"{b}.1.layer_norm.weight", (d_model,))]
    specs.append(("encoder.final_layer_norm.weight", (d_model,)))
    return specs


def wan_vae_specs(base_dim: int, z_dim: int = 16, dim_mult: tuple[int, ...] = (1, 2, 4, 4),
                  num_res_blocks: int = 2,
                  temperal_downsample: tuple[bool, ...] = (False, True, True),
                  ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of diffusers' ``AutoencoderKLWan`` weights (Wan 2.1, no attention scales),
    in state_dict order."""
    specs: list[tuple[str, tuple[int, ...]]] = []

    def conv(name: str, out: int, inp: int, kernel: tuple[int, ...]) -> None:
        specs.extend([(f"{name}.weight", (out, inp, *kernel)), (f"{name}.bias", (out,))])

    def resnet(name: str, inp: int, out: int) -> None:
        specs.append((f"{name}.norm1.gamma", (inp, 1, 1, 1)))
        conv(f"{name}.conv1", out, inp, (3, 3, 3))
        specs.append((f"{name}.norm2.gamma", (out, 1, 1, 1)))
        conv(f"{name}.conv2", out, out, (3, 3, 3))
        if inp != out:
            conv(f"{name}.conv_shortcut", out, inp, (1, 1, 1))

    def mid(name: str, dim: int) -> None:
        specs.append((f"{name}.attentions.0.norm.gamma", (dim, 1, 1)))
        conv(f"{name}.attentions.0.to_qkv", 3 * dim, dim, (1, 1))
        conv(f"{name}.attentions.0.proj", dim, dim, (1, 1))
        resnet(f"{name}.resnets.0", dim, dim)
        resnet(f"{name}.resnets.1", dim, dim)

    dims = [base_dim * m for m in (1, *dim_mult)]
    conv("encoder.conv_in", base_dim, 3, (3, 3, 3))
    k = 0
    for i, (inp, out) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        for _ in range(num_res_blocks):
            resnet(f"encoder.down_blocks.{k}", inp, out)
            inp, k = out, k + 1
        if i != len(dim_mult) - 1:
            conv(f"encoder.down_blocks.{k}.resample.1", out, out, (3, 3))
            if temperal_downsample[i]:
                conv(f"encoder.down_blocks.{k}.time_conv", out, out, (3, 1, 1))
            k += 1
    top = dims[-1]
    mid("encoder.mid_block", top)
    specs.append(("encoder.norm_out.gamma", (top, 1, 1, 1)))
    conv("encoder.conv_out", 2 * z_dim, top, (3, 3, 3))
    conv("quant_conv", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("post_quant_conv", z_dim, z_dim, (1, 1, 1))

    up = [base_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
    temporal_up = tuple(temperal_downsample[::-1])
    conv("decoder.conv_in", up[0], z_dim, (3, 3, 3))
    mid("decoder.mid_block", up[0])
    for i, (inp, out) in enumerate(zip(up[:-1], up[1:], strict=False)):
        if i > 0:
            inp //= 2  # the previous upsampler halved the channels
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", inp if j == 0 else out, out)
        if i != len(dim_mult) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.resample.1", out // 2, out, (3, 3))
            if temporal_up[i]:
                conv(f"decoder.up_blocks.{i}.upsamplers.0.time_conv", 2 * out, out, (3, 1, 1))
    specs.append(("decoder.norm_out.gamma", (up[-1], 1, 1, 1)))
    conv("decoder.conv_out", 3, up[-1], (3, 3, 3))
    return specs


def vae_config(preset: Preset) -> dict:
    """``vae/config.json`` as diffusers saves ``AutoencoderKLWan``, with LongCat's statistics."""
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.1", "attn_scales": [],
            "base_dim": preset.vae["base_dim"], "decoder_base_dim": None,
            "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 3, "is_residual": False,
            "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD,
            "num_res_blocks": preset.vae["num_res_blocks"], "out_channels": 3,
            "patch_size": None, "scale_factor_spatial": 8, "scale_factor_temporal": 4,
            "temperal_downsample": [False, True, True], "z_dim": 16}


def text_encoder_config(preset: Preset, vocab: int) -> dict:
    """``text_encoder/config.json``: the hub's umt5-xxl fields with the preset's dimensions."""
    te = preset.text_encoder
    return {
        "_name_or_path": "google/umt5-xxl", "architectures": ["UMT5EncoderModel"],
        "classifier_dropout": 0.0, "d_ff": te["d_ff"], "d_kv": te["d_kv"],
        "d_model": te["d_model"], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
        "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_decoder_layers": te["num_layers"],
        "num_heads": te["num_heads"], "num_layers": te["num_layers"], "output_past": True,
        "pad_token_id": 0, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "scalable_attention": True,
        "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "torch_dtype": "float32",
        "transformers_version": "4.48.0.dev0", "use_cache": True,
        "vocab_size": te.get("vocab_size", vocab),
    }


def write_text_encoder(folder: Path, preset: Preset, vocab: int, seed: int, dtype: torch.dtype,
                       sparse: bool) -> None:
    """``text_encoder/``: config.json + model-0000k-of-0000n.safetensors + index, like the hub."""
    cfg = {**text_encoder_config(preset, vocab),  # the stored dtype, as convert records it
           "torch_dtype": str(dtype).removeprefix("torch.")}
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    shapes = umt5_encoder_specs(cfg["d_model"], cfg["d_ff"], cfg["d_kv"], cfg["num_heads"],
                                cfg["num_layers"], cfg["vocab_size"])
    specs = [TensorSpec(n, dtype, s, lambda n=n, s=s: random_tensor(f"text_encoder/{n}", s,
                                                                     seed, dtype))
             for n, s in shapes]
    write_sharded(folder, "model", specs, preset.te_shard_bytes, ST_METADATA, sparse=sparse,
                  force_index=True)


def write_vae(folder: Path, preset: Preset, seed: int, sparse: bool) -> None:
    """``vae/``: an ``AutoencoderKLWan`` (fp32, one file) with LongCat's latent statistics."""
    cfg = vae_config(preset)
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    specs = [TensorSpec(n, torch.float32, s, lambda n=n, s=s: random_tensor(
                 f"vae/{n[: -len('gamma')] + 'norm.weight' if n.endswith('gamma') else n}", s,
                 seed, torch.float32))
             for n, s in wan_vae_specs(cfg["base_dim"], num_res_blocks=cfg["num_res_blocks"])]
    write_file(folder / "diffusion_pytorch_model.safetensors", specs, ST_METADATA, sparse=sparse)
