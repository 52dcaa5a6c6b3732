"""The presets a user types (`dinov2-vits14`, `minilm`, `clip-b32`, ...): one table.

Each preset stands for a hub id, the pooling it is used with per modality, and the published
architecture of that checkpoint, so a tower can be built without weights (for memory probing and
parameter counts) even on a machine that has never downloaded it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmret.common.registry import Registry

# CLIP ViT-B (the published openai/clip-vit-base-patch16/32 configs; the patch size differs)
CLIP_VISION_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224)
CLIP_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
CLIP_TEXT_VOCAB = dict(vocab_size=49408, max_position_embeddings=77)


@dataclass(frozen=True)
class Architecture:
    """A published architecture: a timm model name, or a transformers model_type and config values."""

    library: str  # timm | transformers
    name: str  # timm model name, or transformers model_type
    values: dict = field(default_factory=dict)  # transformers config values
    input_size: int = 224  # the side the preset's preprocessing crops pictures to


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # the hub id the preset stands for
    help: str
    options: dict[str, dict]  # modality -> the loader's options for it (e.g. pooling)
    architecture: Architecture

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.options)


ENCODERS: Registry = Registry("encoder preset")  # name -> Preset


def register_preset(preset: Preset) -> Preset:
    """Add a preset name; a taken name raises."""
    return ENCODERS.add(preset.name, preset, f"the preset for {preset.source}")


def encoder_names(modality: str) -> list[str]:
    return [name for name, preset in ENCODERS.items() if modality in preset.modalities]


def _clip(patch: int) -> Architecture:
    return Architecture("transformers", "clip", dict(
        text_config={**CLIP_TEXT_B, **CLIP_TEXT_VOCAB}, vision_config={**CLIP_VISION_B, "patch_size": patch},
        projection_dim=512))


register_preset(Preset(
    "dino-vits16", "timm/vit_small_patch16_224.dino",
    "DINO ViT-S/16 (timm): 197 tokens x 384 at 224 px, CLS pooled 384.",
    {"image": {}}, Architecture("timm", "vit_small_patch16_224")))
register_preset(Preset(
    "dinov2-vits14", "facebook/dinov2-small",
    "DINOv2 ViT-S/14 (transformers): 257 tokens x 384 at 224 px, CLS pooled 384.",
    {"image": {"pooling": "cls"}}, Architecture("transformers", "dinov2", dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518, mlp_ratio=4,
        layerscale_value=1.0))))
register_preset(Preset(
    "distilbert", "distilbert/distilbert-base-uncased", "DistilBERT base uncased: tokens x 768, CLS pooled 768.",
    {"text": {"pooling": "cls"}}, Architecture("transformers", "distilbert")))  # DistilBertConfig() is distilbert-base
register_preset(Preset(
    "minilm", "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L6-v2 sentence embedder: tokens x 384, mask-aware mean pooled 384.",
    {"text": {"pooling": "mean"}}, Architecture("transformers", "bert", dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))))
register_preset(Preset(
    "clip-b32", "openai/clip-vit-base-patch32",
    "CLIP ViT-B/32 towers: projected 512; tokens 50 x 768 (image), L x 512 (text).",
    {"image": {"pooling": "proj"}, "text": {"pooling": "proj"}}, _clip(32)))
register_preset(Preset(
    "clip-b16", "openai/clip-vit-base-patch16",
    "CLIP ViT-B/16 towers: projected 512; tokens 197 x 768 (image), L x 512 (text).",
    {"image": {"pooling": "proj"}, "text": {"pooling": "proj"}}, _clip(16)))

# Audio towers. AST's published config is ASTConfig's defaults (MIT/ast-finetuned-audioset-10-10-0.4593:
# 768 wide, 12 layers, 16x16 patches with stride 10 over 1024 frames x 128 mel bins). CLAP HTSAT-unfused:
# a Swin-T audio tower (96 wide at the patches, depths 2-2-6-2) and RoBERTa-base text, both projected to 512.
CLAP_HTSAT_AUDIO = dict(window_size=8, num_mel_bins=64, spec_size=256, patch_size=4, patch_stride=[4, 4],
                        hidden_size=768, patch_embeds_hidden_size=96, depths=[2, 2, 6, 2],
                        num_attention_heads=[4, 8, 16, 32], enable_fusion=False, projection_dim=512)
CLAP_ROBERTA_TEXT = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, projection_dim=512)

register_preset(Preset(
    "ast-audioset", "MIT/ast-finetuned-audioset-10-10-0.4593",
    "Audio Spectrogram Transformer fine-tuned on AudioSet, 16 kHz: 1214 tokens x 768 over 10.24 s, "
    "CLS+distillation pooled 768.",
    {"audio": {"pooling": "cls"}}, Architecture("transformers", "audio-spectrogram-transformer")))
register_preset(Preset(
    "clap-htsat", "laion/clap-htsat-unfused",
    "LAION CLAP HTSAT-unfused towers, 48 kHz audio: projected 512; tokens 64 x 768 (audio), L x 768 (text).",
    {"audio": {"pooling": "proj"}, "text": {"pooling": "proj"}},
    Architecture("transformers", "clap", dict(audio_config=CLAP_HTSAT_AUDIO, text_config=CLAP_ROBERTA_TEXT,
                                              projection_dim=512))))
