"""TopK SAE training throughput against a plain dense PyTorch TopK step, in the same run.

Prints training tokens/s of saeguard's TopK step (sparse decode and sparse encoder gradient,
Adam, decoder renormalisation) beside a dense reference step written here with the same shapes,
optimiser and thread count, plus the floor implied by the measured matmul speed (the encoder's
one unavoidable dense matmul), and the speed-up of bfloat16 autocast.

    python benchmarks/train_throughput.py [--batch 4096] [--d-in 576] [--expansion 16] [--k 32]
"""

from __future__ import annotations

import argparse

import torch
from timing import timed

from saeguard.sae import SAEConfig, create_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, d, k = args.batch, args.d_in, args.k
    d_sae = d * args.expansion
    torch.manual_seed(0)
    x = torch.randn(n, d)

    sae = create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=k, aux_coef=0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def ours(autocast: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae.training_step(x, None, 1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()

    w_enc = torch.nn.Parameter(torch.randn(d, d_sae) * d**-0.5)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d) * d**-0.5)
    b_dec = torch.nn.Parameter(torch.zeros(d))
    dense_opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-4)

    def dense() -> None:
        pre = (x - b_dec) @ w_enc + b_enc
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = f @ w_dec + b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))

    a, b = torch.randn(n, d), torch.randn(d, d_sae)
    matmul_s = timed(lambda: a @ b, args.repeats)
    gflops = 2 * n * d * d_sae / matmul_s / 1e9
    t_ours = timed(ours, args.repeats)
    t_dense = timed(dense, args.repeats)
    t_bf16 = timed(lambda: ours(autocast=True), args.repeats)
    rate = {name: n / t for name, t in (("ours", t_ours), ("dense", t_dense), ("bf16", t_bf16))}
    floor = n / matmul_s
    print(
        f"TopK k={k}, d_in={d}, d_sae={d_sae}, batch={n}, threads={torch.get_num_threads()}, "
        f"matmul {gflops:.0f} GFLOP/s"
    )
    print(f"saeguard TopK step (fp32):       {rate['ours']:10,.0f} tok/s")
    print(f"dense reference TopK step (fp32): {rate['dense']:10,.0f} tok/s")
    print(f"speed-up over dense:              {rate['ours'] / rate['dense']:.2f}x")
    print(f"floor (encoder matmul alone):     {floor:10,.0f} tok/s  (ours at "
          f"{100 * rate['ours'] / floor:.0f}% of it)")  # fmt: skip
    print(f"saeguard TopK step (bf16 autocast): {rate['bf16']:10,.0f} tok/s "
          f"({rate['bf16'] / rate['ours']:.2f}x fp32)")  # fmt: skip


if __name__ == "__main__":
    main()
