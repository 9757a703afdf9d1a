"""FX passes that find attention in captured graphs and rewrite it to ``torch.ops.aether.*``."""
