"""One side of a trained model as one module, from the raw inputs people have to the normalized
embedding: pixels (or a sound's input features) for the item side, token ids and an attention mask
for the text side. A frozen tower that stands outside the model (its outputs were cached in
training) runs first and hands the trained part the output it was trained on. Exports convert
this module whole, so the file they write needs nothing of mmret."""

from __future__ import annotations

from torch import Tensor, nn

from mmret.models.batch import call

TEXT_INPUTS = ("input_ids", "attention_mask")


class FusedSide(nn.Module):
    """inputs -> [frozen tower -> its `output`] -> the model's `encode_item` / `encode_text` -> (B, D)."""

    def __init__(self, model: nn.Module, side: str, frozen: nn.Module | None = None, output: str = "pooled",
                 item_input: str = "pixels") -> None:
        super().__init__()
        self.model, self.side, self.frozen, self.output = model, side, frozen, output
        self.input_names = TEXT_INPUTS if side == "text" else (item_input,)

    def forward(self, *inputs: Tensor) -> Tensor:
        x = dict(zip(self.input_names, inputs))
        if self.frozen is not None:
            x = getattr(self.frozen(**x), self.output)  # (B, D) pooled, or (B, T, Dt) token states
        encode = self.model.encode_text if self.side == "text" else self.model.encode_item
        return call(encode, x)  # (B, D), normalized
