"""Frozen pretrained towers: load by preset, hub id or local folder, with each model's own
preprocessing, pooling and output shapes, with weights or (for shapes only) without.

Every tower is an `nn.Module` wrapper around the library's own model (`.model`: a transformers or
timm module, so peft can put adapters inside it):

- `ImageEncoder.forward(pixels (B, 3, H, W)) -> EncoderOutput(pooled (B, D), tokens (B, T, Dt))`
- `AudioEncoder.forward(features) -> EncoderOutput(pooled, tokens)` (AST's log-mel frames, CLAP's)
- `SpectrogramEncoder` (`spectrogram:NAME`): a picture tower over log-mel pictures of sounds
- `TextEncoder.forward(input_ids (B, L), attention_mask (B, L)) -> EncoderOutput(pooled, tokens, mask)`

`forward` never turns gradients off (later methods train inside the towers); callers that only
encode wrap it in `torch.inference_mode()`. Parameters start frozen (`requires_grad=False`) and
the model in eval mode.

Where the weights come from, in the order tried:
- a preset name (`ENCODERS`, e.g. `dinov2-vits14`) stands for a hub id and a pooling;
- a local folder: transformers if its `config.json` has a `model_type`, timm if it names an
  `architecture` (what `timm.models.save_for_hf` writes) next to a weights file;
- `timm:NAME` for a timm model by name (weights from the hub, or from `weights=` a local file);
- a hub id `owner/name[@revision]`: the local Hugging Face cache first, the network only when the
  cache lacks it, with short timeouts, so an offline machine fails at once with one clear line.
A hub id and the folder it was downloaded to load through the same code.

`.spec` holds everything that changes the numbers (model id and revision or a hash of the folder's
files, pooling, image size and normalisation, text length): the feature cache key is its hash.

Modules: `hub` (where weights come from), `presets` (the names users type), `registry` (the table
where each modality's family registers its builder), `load` (by name, with or without weights; it
names the built-in families), `base` (what every tower shares), `preprocess` (a picture tower's
resize/crop/normalise), `image`, `audio` and `text` (the families), `spectrogram` (the
picture-tower-over-spectrograms wrapper).
"""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "AudioEncoder": "mmret.encoders.audio",
    "SpectrogramEncoder": "mmret.encoders.spectrogram",
    "build_audio_encoder": "mmret.encoders.audio",
    "register_wrapper": "mmret.encoders.registry",
    "tower_modality": "mmret.encoders.load",
    "DEFAULT_MAX_LENGTH": "mmret.encoders.base",
    "ENCODERS": "mmret.encoders.presets",
    "EncoderOutput": "mmret.encoders.base",
    "ImageEncoder": "mmret.encoders.image",
    "ImagePreprocess": "mmret.encoders.preprocess",
    "ImageTransform": "mmret.encoders.preprocess",
    "LOADS": "mmret.encoders.load",
    "ModelSource": "mmret.encoders.hub",
    "Preset": "mmret.encoders.presets",
    "TextEncoder": "mmret.encoders.text",
    "TimmImageEncoder": "mmret.encoders.image",
    "Tower": "mmret.encoders.base",
    "TransformersImageEncoder": "mmret.encoders.image",
    "build_image_encoder": "mmret.encoders.image",
    "build_text_encoder": "mmret.encoders.text",
    "encoder_names": "mmret.encoders.presets",
    "load_image_encoder": "mmret.encoders.load",
    "load_text_encoder": "mmret.encoders.load",
    "load_tower": "mmret.encoders.load",
    "register_family": "mmret.encoders.registry",
    "register_preset": "mmret.encoders.presets",
    "resolve_source": "mmret.encoders.hub",
})
__all__ = ["AudioEncoder", "DEFAULT_MAX_LENGTH", "ENCODERS", "EncoderOutput", "ImageEncoder", "ImagePreprocess",
           "ImageTransform", "LOADS", "ModelSource", "Preset", "SpectrogramEncoder", "TextEncoder",
           "TimmImageEncoder", "Tower", "TransformersImageEncoder", "build_audio_encoder", "build_image_encoder",
           "build_text_encoder", "encoder_names", "load_image_encoder", "load_text_encoder", "load_tower",
           "register_family", "register_preset", "register_wrapper", "resolve_source", "tower_modality"]
