"""Robustify a model against the shifts the OOD monitor finds: LoRA fine-tuning guided by a
frozen SAE (SPEC section 6), measured before and after on the same held-out data."""

from saeguard.robustify.lora import LoraRobustifier, LoraSettings, add_adapters

__all__ = ["LoraRobustifier", "LoraSettings", "add_adapters"]
