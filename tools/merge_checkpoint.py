#!/usr/bin/env python
"""Merge a run's checkpoint into one plain fp32 state dict (adapters folded into the base weights).

    python tools/merge_checkpoint.py RUN_DIR --out merged.safetensors [--checkpoint step_00001000]

Keys are the plain model's (`layers.0.self_attn.q_proj.weight`, ...); the file's metadata records
the run, the checkpoint, the step and the model config (JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run directory")
    parser.add_argument("--checkpoint", help="checkpoint folder or name under RUN_DIR/checkpoints (default: newest)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give a .safetensors file name")
        from megamora.checkpoint import read_trainer_state
        from megamora.export import find_checkpoint, load_merged_model
        from megamora.hf import merged_state_dict, save_safetensors

        ckpt = find_checkpoint(args.run_dir, args.checkpoint)
        cfg, model = load_merged_model(args.run_dir, ckpt)
        state = merged_state_dict(model)
        meta = {"run_dir": str(Path(args.run_dir).resolve()), "checkpoint": str(ckpt.resolve()),
                "step": str(read_trainer_state(ckpt)["step"]), "model_config": json.dumps(asdict(cfg.model))}
        path = save_safetensors(state, args.out, metadata=meta)
    except (ValueError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    n_params = sum(t.numel() for t in state.values())
    print(f"wrote {path}: {len(state)} tensors, {n_params:,} parameters (fp32) from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
