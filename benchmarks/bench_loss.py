"""The output layer + cross-entropy alone: megamora.loss against the plain path, and the two GEMM
layouts its logits could be made in.

    .venv/bin/python benchmarks/bench_loss.py                  # 20m head: dim 256, vocab 32100, 2048 tokens
    .venv/bin/python benchmarks/bench_loss.py --dim 512        # 60m head

Prints, as medians of interleaved rounds (ABAB...), with ratios to the first row of each group:
  logits GEMM of one chunk: token-major hidden @ weight.T (tokens, vocab) against vocabulary-major
      weight @ hidden.T (vocab, tokens), the layout megamora.loss uses; and that GEMM into a buffer
      allocated fresh for the call (as every step would without megamora.loss's kept scratch), with
      the page faults per call;
  softmax over the vocabulary of one (vocab, chunk) block, each variant on a fresh copy of the same
      logits (the copy is timed in all of them): torch.log_softmax(dim=0) + exp_, against
      megamora.loss's passes with and without the max shift;
  forward + backward of the loss (both gradients): F.cross_entropy(F.linear(h, w).float()) against
      linear_cross_entropy(h, w, targets, --chunk).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megamora.loss import _exp_cross_entropy_, linear_cross_entropy


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, run in turn every round (order reversed on odd rounds)."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    first = next(iter(medians.values()))
    print(title)
    for name, t in medians.items():
        print(f"  {name:44} {t * 1e3:9.2f} ms  {t / first:6.3f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32100)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=1024, help="parallel.loss_chunk_size")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.dim, generator=gen) * 0.02).requires_grad_()
    hidden = torch.randn(args.tokens, args.dim, generator=gen).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; dim {args.dim}, vocab {args.vocab}, "
          f"{args.tokens} tokens, chunk {args.chunk}, fp32, median of {args.rounds} interleaved rounds")

    h, w = hidden.detach()[: args.chunk], weight.detach()
    token_major = torch.empty(h.shape[0], args.vocab)
    vocab_major = torch.empty(args.vocab, h.shape[0])
    report(f"logits GEMM of one chunk ({h.shape[0]} tokens, K = {args.dim})", interleaved({
        "hidden @ weight.T (tokens, vocab)": lambda: torch.mm(h, w.t(), out=token_major),
        "weight @ hidden.T (vocab, tokens): ours": lambda: torch.mm(w, h.t(), out=vocab_major),
        "weight @ hidden.T into a fresh buffer": lambda: torch.mm(w, h.t()),
    }, args.rounds))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.mm(w, h.t())
    print(f"  page faults of one call into a fresh buffer: {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}")

    logits, block = vocab_major.clone(), torch.empty_like(vocab_major)
    cols = torch.arange(block.shape[1])
    chunk_targets = targets[: block.shape[1]]

    def torch_log_softmax() -> None:
        block.copy_(logits)
        torch.log_softmax(block, dim=0, out=block)
        block.exp_()

    def ours(shift: bool) -> Callable[[], None]:
        return lambda: _exp_cross_entropy_(block.copy_(logits), chunk_targets, cols, shift=shift)

    report(f"softmax over the vocabulary of one ({args.vocab}, {block.shape[1]}) block, copy included", interleaved({
        "copy, log_softmax(dim=0), exp_": torch_log_softmax,
        "copy, ours: amax, sub_, exp_, sum": ours(True),
        "copy, ours unshifted: exp_, sum": ours(False),
    }, args.rounds))

    def step(loss_fn) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = weight.grad = None
            loss_fn().backward()
        return run

    report("loss forward + backward (both gradients)", interleaved({
        "F.cross_entropy(F.linear(h, w).float())": step(
            lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)),
        f"linear_cross_entropy, chunk {args.chunk}: ours": step(
            lambda: linear_cross_entropy(hidden, weight, targets, args.chunk)),
    }, args.rounds))


if __name__ == "__main__":
    main()
