"""The audio parts of a synthetic LongCat-Video-Avatar checkpoint: its audio encoder (wav2vec2 for
1.0, whisper for 1.5) and its vocal separator (an ONNX graph), in the files the original's loaders
read.

* ``chinese-wav2vec2-base/``: ``config.json`` and a torch-pickled ``pytorch_model.bin`` whose keys
  carry the ``wav2vec2.`` prefix and the positional conv's weight-norm as ``weight_g``/``weight_v``
  (the original loads that file, not safetensors, and needs every key: it builds on the meta
  device). ``preprocessor_config.json`` is written too, although the original ignores it, and
  ``model.safetensors`` with the same tensors, which our runner loads (it never unpickles).
* ``whisper-large-v3/``: ``config.json``, ``generation_config.json``, ``preprocessor_config.json``
  and an fp16 ``model.safetensors`` with ``model.``-prefixed keys, as the hub's. The encoder keeps
  its 32 layers and 1500 positions at every size: the avatar's layer groups need them.
* ``vocal_separator/Kim_Vocal_2.onnx``: a soft mask over an MDX spectrogram, with the I/O the
  separator feeds it: ``input`` float32 [batch, 4, 3072, 256] (L.re, L.im, R.re, R.im over 3072
  frequency bins and 256 frames), one output of the same shape.

Tensor lists come from transformers' classes built on the meta device; values from the same seeded
generator as the DiT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longcat_tools.errors import LongcatError
from longcat_tools.io.safetensors import TensorSpec, write_file, write_json
from longcat_tools.model import avatar
from longcat_tools.synth_presets import ST_METADATA, Preset, generator, random_tensor

# chinese-wav2vec2-base: the wav2vec2-base architecture (fairseq's BASE, 95M parameters).
WAV2VEC2_CONFIG: dict[str, Any] = {
    "architectures": ["Wav2Vec2Model"], "model_type": "wav2vec2", "activation_dropout": 0.0,
    "apply_spec_augment": True, "attention_dropout": 0.1, "conv_bias": False,
    "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "do_stable_layer_norm": False,
    "feat_extract_activation": "gelu", "feat_extract_norm": "group", "feat_proj_dropout": 0.1,
    "final_dropout": 0.0, "hidden_act": "gelu", "hidden_dropout": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "layerdrop": 0.1, "mask_feature_prob": 0.0, "mask_time_length": 10, "mask_time_prob": 0.05,
    "num_attention_heads": 12, "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128, "num_feat_extract_layers": 7, "num_hidden_layers": 12,
    "vocab_size": 32, "torch_dtype": "float32",
}
WAV2VEC2_PREPROCESSOR = {
    "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
    "sampling_rate": 16000,
}
WAV2VEC2_PREFIX = "wav2vec2."

# openai/whisper-large-v3
WHISPER_CONFIG: dict[str, Any] = {
    "_name_or_path": "openai/whisper-large-v3", "activation_dropout": 0.0,
    "activation_function": "gelu", "apply_spec_augment": False,
    "architectures": ["WhisperForConditionalGeneration"], "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257], "bos_token_id": 50257, "classifier_proj_size": 256,
    "d_model": 1280, "decoder_attention_heads": 20, "decoder_ffn_dim": 5120,
    "decoder_layerdrop": 0.0, "decoder_layers": 32, "decoder_start_token_id": 50258,
    "dropout": 0.0, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
    "encoder_layerdrop": 0.0, "encoder_layers": 32, "eos_token_id": 50257, "init_std": 0.02,
    "is_encoder_decoder": True, "mask_feature_length": 10, "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0, "mask_time_length": 10, "mask_time_min_masks": 2,
    "mask_time_prob": 0.05, "max_length": 448, "max_source_positions": 1500,
    "max_target_positions": 448, "median_filter_width": 7, "model_type": "whisper",
    "num_hidden_layers": 32, "num_mel_bins": 128, "pad_token_id": 50256,
    "scale_embedding": False, "torch_dtype": "float16", "use_cache": True,
    "use_weighted_layer_sum": False, "vocab_size": 51866,
}
WHISPER_GENERATION = {
    "begin_suppress_tokens": [220, 50257], "bos_token_id": 50257, "decoder_start_token_id": 50258,
    "eos_token_id": 50257, "is_multilingual": True, "max_length": 448,
    "no_timestamps_token_id": 50364, "pad_token_id": 50256,
}
WHISPER_PREPROCESSOR = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
    "padding_side": "right", "padding_value": 0.0, "processor_class": "WhisperProcessor",
    "return_attention_mask": False, "sampling_rate": 16000,
}
WHISPER_PREFIX = "model."
WHISPER_DTYPE = torch.float16

# The MDX separator's spectrogram: 4 real channels, 3072 of n_fft 7680's bins, 256 hops.
SEPARATOR_INPUT = "input"
SEPARATOR_SHAPE = ("batch", 4, 3072, 256)
SEPARATOR_OPSET = 17
SEPARATOR_IR_VERSION = 8  # what onnxruntime releases of the last years all read


def wav2vec2_config(preset: Preset) -> dict[str, Any]:
    return {**WAV2VEC2_CONFIG, **preset.wav2vec2}


def whisper_config(preset: Preset) -> dict[str, Any]:
    return {**WHISPER_CONFIG, **preset.whisper}


def audio_width(encoder: str, preset: Preset) -> int:
    """The audio encoder's width: the avatar DiT's ``audio_channel``."""
    if encoder == avatar.WAV2VEC2:
        return wav2vec2_config(preset)["hidden_size"]
    return whisper_config(preset)["d_model"]


def _meta_state(cls_name: str, config_cls: str, cfg: dict[str, Any]) -> list[tuple[str, tuple]]:
    import transformers

    config = getattr(transformers, config_cls)(**{k: v for k, v in cfg.items()
                                                  if not k.startswith("_")})
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def wav2vec2_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the ``pytorch_model.bin`` the original loads: ``Wav2Vec2Model``'s state
    dict under ``wav2vec2.``, with the weight-norm halves under their saved names."""
    rename = {".parametrizations.weight.original0": ".weight_g",
              ".parametrizations.weight.original1": ".weight_v"}
    out = []
    for name, shape in _meta_state("Wav2Vec2Model", "Wav2Vec2Config", cfg):
        for old, new in rename.items():
            name = name.replace(old, new)
        out.append((WAV2VEC2_PREFIX + name, shape))
    return out


def whisper_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of ``model.safetensors``: ``WhisperModel``'s state dict under ``model.``, as
    ``WhisperForConditionalGeneration`` saves it (its output projection is tied, not stored)."""
    return [(WHISPER_PREFIX + n, s) for n, s in _meta_state("WhisperModel", "WhisperConfig", cfg)]


def write_wav2vec2(folder: Path, preset: Preset, seed: int, sparse: bool) -> None:
    """``chinese-wav2vec2-base/``. ``sparse`` stores each tensor as one value broadcast to its
    shape (a pickle has no holes to leave): right names and shapes, almost no disk.

    ``model.safetensors`` holds the same tensors under the same names: what converting the
    pickle gives, and the only file longcat-tools' own runner loads."""
    cfg = wav2vec2_config(preset)
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    write_json(folder / "preprocessor_config.json", WAV2VEC2_PREPROCESSOR)
    specs = wav2vec2_specs(cfg)

    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.zeros((), dtype=torch.float32).expand(shape) if sparse
                else random_tensor(f"{folder.name}/{name}", shape, seed, torch.float32))

    torch.save({n: value(n, s) for n, s in specs}, folder / avatar.WAV2VEC2_PICKLE)
    write_file(folder / "model.safetensors",
               [TensorSpec(n, torch.float32, s, lambda n=n, s=s: value(n, s).contiguous())
                for n, s in specs], ST_METADATA, sparse=sparse)


def write_whisper(folder: Path, preset: Preset, seed: int, sparse: bool,
                  progress: Any = None) -> None:
    """``whisper-large-v3/``: the four files the original and vLLM-Omni read (no tokenizer: only
    the feature extractor and the encoder are used)."""
    cfg = whisper_config(preset)
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    write_json(folder / "generation_config.json", WHISPER_GENERATION)
    write_json(folder / "preprocessor_config.json", WHISPER_PREPROCESSOR)
    specs = [TensorSpec(n, WHISPER_DTYPE, s, lambda n=n, s=s: random_tensor(
                 f"{folder.name}/{n}", s, seed, WHISPER_DTYPE))
             for n, s in whisper_specs(cfg)]
    write_file(folder / "model.safetensors", specs, ST_METADATA, sparse=sparse, progress=progress)


def require_onnx() -> None:
    """One line, before anything is written, when the ``avatar`` extra is not installed."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise LongcatError("synth --model avatar-*: the vocal separator needs the 'onnx' package "
                           "(pip install 'longcat-tools[avatar]')") from None


def separator_model(seed: int) -> bytes:
    """The vocal separator: ``output = input * sigmoid(conv1x1(input))``, a per-bin soft mask
    mixing the four spectrogram channels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = generator(seed, "vocal_separator")
    weight = (torch.randn(4, 4, 1, 1, generator=g) * 0.5).numpy()
    bias = (torch.randn(4, generator=g) * 0.1).numpy()
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(SEPARATOR_SHAPE))
          for name in (SEPARATOR_INPUT, "output")]
    graph = helper.make_graph(
        [helper.make_node("Conv", [SEPARATOR_INPUT, "mask_w", "mask_b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["mask"]),
         helper.make_node("Mul", [SEPARATOR_INPUT, "mask"], ["output"])],
        "vocal_separator", io[:1], io[1:],
        initializer=[numpy_helper.from_array(weight, "mask_w"),
                     numpy_helper.from_array(bias, "mask_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SEPARATOR_OPSET)],
                              producer_name="longcat-tools synth")
    model.ir_version = SEPARATOR_IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_separator(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(separator_model(seed))
