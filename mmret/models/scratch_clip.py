"""CLIP architectures built from a config with random weights, for training from scratch.

`clip-b16` is ViT-B/16 (768 wide, 12 layers, 224 px) with a 12-layer, 512-wide text transformer;
`clip-tiny` is a CPU-sized version of the same design (128 wide, 4 layers each, 64 px, patch 8).
The towers are the transformers CLIP modules; each projects its pooled state (the class token for
images, the last real token for text, as CLIP pools at the end-of-text token) to the shared space.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmret.encoders.presets import CLIP_TEXT_B, CLIP_VISION_B
from mmret.errors import MmretError
from mmret.models.dual import DualEncoder
from mmret.models.temperature import build_temperature

ARCHS = {
    "clip-b16": dict(vision={**CLIP_VISION_B, "patch_size": 16}, text=CLIP_TEXT_B),
    "clip-tiny": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                  patch_size=8, image_size=64),
                      text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)),
}


class ClipVisionTower(nn.Module):
    def __init__(self, config, embed_dim: int) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.model = CLIPVisionModel(config)
        self.proj = nn.Linear(config.hidden_size, embed_dim, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(self.model(pixel_values=pixels).pooler_output)  # (B, E)


class ClipTextTower(nn.Module):
    def __init__(self, config, embed_dim: int) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        self.model = CLIPTextModel(config)
        self.proj = nn.Linear(config.hidden_size, embed_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, W)
        last = attention_mask.sum(1).clamp_min(1) - 1  # the end-of-text token closes every caption
        return self.proj(states[torch_arange(states), last])  # (B, E)


def torch_arange(x: Tensor) -> Tensor:
    import torch

    return torch.arange(x.shape[0], device=x.device)


def random_clip(arch: str, vocab_size: int, max_length: int, embed_dim: int = 512, image_size: int | None = None,
                temperature: str = "learned", init_temperature: float = 0.07) -> DualEncoder:
    """A CLIP of architecture `arch` with random weights, for `vocab_size` tokens of text."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    if arch not in ARCHS:
        raise MmretError(f"unknown --arch {arch!r}; choose one of miniclip, {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    vision = CLIPVisionConfig(**{**spec["vision"], **({"image_size": image_size} if image_size else {})})
    # pooling reads the last real token itself, so the special ids only need to lie in the vocabulary
    text = CLIPTextConfig(**spec["text"], vocab_size=vocab_size, max_position_embeddings=max_length,
                          pad_token_id=0, bos_token_id=None, eos_token_id=min(2, vocab_size - 1))
    return DualEncoder(ClipVisionTower(vision, embed_dim), ClipTextTower(text, embed_dim), embed_dim,
                       build_temperature(temperature, init_temperature))
