"""``nn.MultiheadAttention``: Dynamo keeps ``F.multi_head_attention_forward`` as one call."""

from __future__ import annotations

from typing import Optional

from torch.fx import Node

from .common import AttentionMatch

PATTERN = "mha"


def match(node: Node) -> Optional[AttentionMatch]:
    return None
