#!/usr/bin/env python
"""C4 validation perplexity of a run's merged model (or of a Hugging Face Llama), printed as JSON.

    python tools/eval_ppl.py RUN_DIR [--checkpoint DIR] [--tokens N] [--micro-batch-size B] [data.key=value ...]
    python tools/eval_ppl.py HF_DIR [--tokens N] [data.key=value ...]

By default the same validation tokens as the run's own final eval (final_eval_tokens, else
eval_tokens), so the result matches the run's last eval record. Data overrides point the run's
config at files on this machine, e.g. data.local_dir=/data/c4/en data.tokenizer=/data/spiece.model.

HF_DIR is a LlamaForCausalLM folder (config.json + safetensors, as tools/convert_to_hf.py writes;
pickled .bin weights are refused). Having no run config, it is evaluated with the default data
settings and data.* overrides, its own tokenizer files unless data.tokenizer= is given, and the
default seq_len capped by its max_position_embeddings unless data.seq_len= is given: with a run's
data settings, the validation tokens that run evaluates."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run directory, or a Hugging Face LlamaForCausalLM folder")
    parser.add_argument("overrides", nargs="*", help="data.key=value overrides of the run's config (or the defaults)")
    parser.add_argument("--checkpoint", help="checkpoint folder or name under RUN_DIR/checkpoints (default: newest)")
    parser.add_argument("--tokens", type=int, help="validation tokens (default: as the run's final eval)")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (bfloat16: autocast, as a bf16 run's trainer evaluates)")
    args = parser.parse_intermixed_args(argv)
    try:
        from megamora.evaluate import eval_device, evaluate_run

        result = evaluate_run(args.run_dir, args.checkpoint, tokens=args.tokens, micro_batch_size=args.micro_batch_size,
                              data_overrides=args.overrides, device=eval_device(args.device), dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
