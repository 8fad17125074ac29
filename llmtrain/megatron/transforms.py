"""The step between building a model and wrapping it for DDP: what changes which weights a run
trains (LoRA adapters on a frozen base; freezing). DDP and the optimizer then see only the
parameters that still require gradients."""

from __future__ import annotations

from llmtrain.config.schema import Config
from llmtrain.errors import RunStopped


def apply_transforms(cfg: Config, chunks: list, say=None) -> list:
    """Transform this rank's freshly initialised chunks in place (and return them)."""
    if cfg.peft.name == "lora":
        from llmtrain.megatron import checkpoint, lora, lora_checkpoint

        root, step = lora_checkpoint.base_step(cfg)
        base = checkpoint.step_dir(root, step)
        try:
            checkpoint.load(root, step, chunks, None, None, weights_only=True)
        except checkpoint.NotThisModel as exc:
            raise RunStopped(f"peft=lora: the base model {base} does not load: {exc}") from None
        count = lora.add_adapters(chunks, cfg.peft, cfg.seed)
        if cfg.peft.load:  # an adapter trained elsewhere, to train further
            lora_checkpoint.load_peft(chunks, cfg.peft.load)
        if say:
            trained = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
            total = sum(p.numel() for c in chunks for p in c.parameters())
            source = f" from {cfg.peft.load}" if cfg.peft.load else ""
            say(f"LoRA: {count} adapters (r={cfg.peft.r}){source} on the frozen base {base}; "
                f"{trained:,} of {total:,} parameters on this rank train")
    return chunks
