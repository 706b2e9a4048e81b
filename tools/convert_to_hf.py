#!/usr/bin/env python
"""Export a run's merged model as a Hugging Face LlamaForCausalLM folder.

    python tools/convert_to_hf.py RUN_DIR --out DIR [--checkpoint DIR] [--tokenizer PATH]

Writes config.json, model.safetensors (fp32) and, when the run's tokenizer is a local file, the
tokenizer files; load with transformers.LlamaForCausalLM.from_pretrained(DIR)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run directory")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--checkpoint", help="checkpoint folder or name under RUN_DIR/checkpoints (default: newest)")
    parser.add_argument("--tokenizer", help="tokenizer file or folder to ship (default: the run's data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        from megamora.export import find_checkpoint, load_merged_model, run_config
        from megamora.hf import local_tokenizer_files, save_hf

        tokenizer = args.tokenizer or run_config(args.run_dir).data.tokenizer
        tokenizer_files = local_tokenizer_files(tokenizer)  # a missing local file fails before any work
        ckpt = find_checkpoint(args.run_dir, args.checkpoint)
        cfg, model = load_merged_model(args.run_dir, ckpt)
        written = save_hf(model, cfg.model, args.out, tokenizer if tokenizer_files else None,
                          max_position_embeddings=cfg.data.seq_len)
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    print(f"converted {ckpt}")
    for path in written:
        print(f"wrote {path}")
    if not tokenizer_files:
        print(f"tokenizer {tokenizer!r} is a Hub name: no tokenizer files written "
              f"(AutoTokenizer.from_pretrained({tokenizer!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
