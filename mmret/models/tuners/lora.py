"""LoRA inside a pretrained tower, through peft: which Linear layers `--targets` names in each
architecture, and the injection.

peft's LoRA is injected with `peft.inject_adapter_in_model`, which keeps the model's own class
and forward (a `PeftModel` wrapper would not: timm's `forward_features` and the CLIP towers'
projected outputs must stay reachable). `targets` ("q,v", "q,k,v,o", "mlp") are mapped to each
architecture's module names by `target_modules`:

    target  CLIP       BERT-like / HF ViT         DINOv2, AST (transformers 5 | 4)  DistilBERT  timm ViT
    q k v   q_proj...  query key value            q_proj... | query...               q_lin...    qkv
    o       out_proj   attention.output.dense     o_proj | attention.output.dense    out_lin     attn.proj
    mlp     mlp.fc1/2  intermediate/output.dense  mlp.fc1/2 | intermediate/output...  ffn.lin1/2  mlp.fc1/2

The sound towers follow the same names: AST's blocks are DINOv2's in transformers 5 (`layers.N.
attention.q_proj`, `o_proj`, `mlp.fc1/2`) and BERT's in transformers 4 (`attention.attention.
query`, `attention.output.dense`, `intermediate.dense`, `output.dense`); CLAP's audio tower (Swin)
and its RoBERTa text tower use BERT's (`attention.self.query`, `attention.output.dense`, ...).

timm fuses q, k and v into ONE Linear `qkv` (D -> 3D). Any of q, k, v selects it, and LoRA then
adapts the fused matrix: A is r x D and B is 3D x r, so r * 4D per block whatever subset of q, k,
v was asked for. Separate projections cost r * 2D each: "q,v" is r * 4D per block too (but the
fused update also moves k), "q,k,v" is r * 6D. A warning says so when the subset is partial.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

TARGETS = ("q", "k", "v", "o", "mlp")

# target -> the names of that Linear across architectures (matched at the end of a module name)
TARGET_PATTERNS: dict[str, tuple[str, ...]] = {
    "q": (r"q_proj", r"query", r"q_lin", r"attn\.qkv"),
    "k": (r"k_proj", r"key", r"k_lin", r"attn\.qkv"),
    "v": (r"v_proj", r"value", r"v_lin", r"attn\.qkv"),
    "o": (r"out_proj", r"attention\.o_proj", r"attention\.output\.dense", r"out_lin", r"attn\.proj"),
    "mlp": (r"mlp\.fc[12]", r"intermediate\.dense", r"(?<!attention\.)output\.dense", r"ffn\.lin[12]"),
}
MLP_OUT = (r"mlp\.fc2", r"(?<!attention\.)output\.dense", r"ffn\.lin2")





def parse_targets(targets: str) -> list[str]:
    keys = [t.strip().lower() for t in targets.split(",") if t.strip()]
    bad = [t for t in keys if t not in TARGETS]
    if bad or not keys:
        raise MmretError(f"--targets {targets!r}: use a comma-separated list of {', '.join(TARGETS)} (e.g. q,v)")
    return keys


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(rf"(^|\.){p}$", name) for p in patterns)


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """Full names of the Linear layers that `targets` ("q,v", "q,k,v,o", "mlp", ...) stand for in
    this architecture; a fused timm `qkv` appears once however many of q, k, v select it."""
    keys = parse_targets(targets)
    linears = linear_names(model)
    names = [n for n in linears if any(matches(n, TARGET_PATTERNS[k]) for k in keys)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise MmretError(f"--targets {targets} matches no layer of {type(model).__name__} (its Linear layers "
                         f"end in: {', '.join(leaves) or 'none'}); valid targets are {', '.join(TARGETS)} "
                         "for CLIP, BERT-like, DistilBERT, DINOv2 and timm ViT towers")
    fused = [n for n in names if n.endswith("qkv")]
    if fused and set(keys) & {"q", "k", "v"} != {"q", "k", "v"}:
        _logger.warning("%s fuses q, k and v into one Linear (qkv): --targets %s adapts all three together",
                        type(model).__name__, targets)
    return names




def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> nn.Module:
    """peft LoRA on the target Linear layers, in place; only lora_A / lora_B train."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    return inject_adapter_in_model(config, model)

