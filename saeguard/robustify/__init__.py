"""Robustify a model against the shifts the OOD monitor finds: LoRA fine-tuning guided by a
frozen SAE (SPEC section 6). This session: the training core; the CLI, report and real run are
the rest of the issue."""

from saeguard.robustify.lora import LoraRobustifier, LoraSettings, add_adapters

__all__ = ["LoraRobustifier", "LoraSettings", "add_adapters"]
