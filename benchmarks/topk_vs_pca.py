"""Held-out FVU of a trained SAE beside PCA with k components fitted on the same activations.

    python benchmarks/topk_vs_pca.py --acts CACHE_DIR --sae SAE_DIR [--components 32]

PCA is fitted on (up to --fit-tokens of) the activation cache the SAE was trained on; both are
scored on activations of the validation split, harvested with the cache's own rules.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from saeguard.activations import ActivationCache, ActivationSourceConfig
from saeguard.sae.base import normalized_mse
from saeguard.sae.io import load_sae
from saeguard.train import evaluate_reconstruction, held_out_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True, help="activation cache the SAE was trained on")
    parser.add_argument("--sae", required=True, help="SAE directory")
    parser.add_argument("--components", type=int, default=32, help="PCA components (= SAE k)")
    parser.add_argument("--fit-tokens", type=int, default=500_000)
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    args = parser.parse_args()

    cache = ActivationCache.open(args.acts)
    sae, meta = load_sae(args.sae)
    hook = meta.get("hook") or cache.hooks[0]
    train, _ = cache.load(hook)
    train = train[: args.fit_tokens]
    fields = {f.name for f in dataclasses.fields(ActivationSourceConfig)}
    source = ActivationSourceConfig(
        **{k: v for k, v in cache.manifest["config"].items() if k in fields}
    )
    held_out = held_out_activations(source, hook, args.eval_tokens)
    assert held_out is not None
    mean = train.mean(0)
    _, _, basis = torch.pca_lowrank(train - mean, q=args.components + 8, center=False, niter=6)
    basis = basis[:, : args.components]
    recon = (held_out - mean) @ basis @ basis.t() + mean
    pca_fvu = float(normalized_mse(held_out, recon))
    stats = evaluate_reconstruction(sae, held_out)
    print(f"held-out activations: {len(held_out)} (validation split), PCA fitted on {len(train)}")
    print(f"SAE  {meta.get('name', args.sae)}: FVU {stats['fvu']:.4f}  L0 {stats['l0']:.1f}  "
          f"dead {100 * stats['dead_frac']:.2f}%")  # fmt: skip
    print(f"PCA  {args.components} components: FVU {pca_fvu:.4f}")
    print(f"SAE FVU / PCA FVU: {stats['fvu'] / pca_fvu:.3f}")


if __name__ == "__main__":
    main()
