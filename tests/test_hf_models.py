"""Models from elsewhere: a Hugging Face LlamaForCausalLM folder evaluated by tools/eval_ppl.py and
warm-started by a MoRA run, and folders that do not fit refused in one line (exit 2, nothing written).

One tiny full-rank run is trained and converted with tools/convert_to_hf.py; the one process that
goes through launch/pretrain.py starts first and runs while the rest of the file works in-process."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_tools import REPO, assert_one_line_error, load_tool, one_thread, tiny_overrides

from megamora.config import ModelConfig, load_config
from megamora.hf import read_hf_folder, save_hf
from megamora.model import build_model, init_weights


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def random_hf_folder(path: Path, tokenizer: Path | None = None, **shape) -> Path:
    """An untrained LlamaForCausalLM folder of the tiny runs' shape, with `shape` changed."""
    cfg = ModelConfig(**{"dim": 32, "ffn_dim": 64, "n_layers": 2, "n_heads": 2, **shape})
    model = build_model(cfg, device="cpu")
    init_weights(model, 0)
    save_hf(model, cfg, path, tokenizer, max_position_embeddings=32)
    return path


class RunsCode:
    """A pickle payload that would leave a file behind if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data) -> Iterator[dict]:
    from megamora.run import pretrain

    root = tmp_path_factory.mktemp("hf-models")
    tokenizer = shared_data / "tokenizers" / "t5-base" / "spiece.model"
    # Another dim and vocabulary than the runs: launched now, checked by test_warm_start_mismatch.
    other = random_hf_folder(root / "other-shape", dim=64, vocab_size=32200)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = tiny_overrides(shared_data, root / "mismatch", "adapter.kind=mora", "adapter.r=4", f"warm_start={other}")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "pretrain.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        full = root / "full"
        pretrain(load_config(None, tiny_overrides(shared_data, full, "steps=3")))
        assert load_tool("convert_to_hf").main([str(full), "--out", str(root / "hf")]) == 0
        yield {"root": root, "full": full, "hf": root / "hf", "tokenizer": tokenizer, "launch": proc,
               "other": other, "data": [f"data.local_dir={shared_data}/c4-sample/en"]}
    finally:
        if proc.poll() is None:  # its test was not selected, or failed before waiting
            proc.kill()
            proc.communicate()


def eval_ppl(capsys, *argv) -> tuple[int, dict | str]:
    rc = load_tool("eval_ppl").main([*map(str, argv), "--device", "cpu"])
    out = capsys.readouterr()
    return rc, json.loads(out.out) if rc == 0 else out.err


# --------------------------------------------------------------------------- eval_ppl


def test_eval_hf_folder_equals_the_runs_eval(setup, capsys):
    from megamora.evaluate import evaluate_run

    run = evaluate_run(setup["full"], device="cpu")
    rc, hf = eval_ppl(capsys, setup["hf"], *setup["data"], f"data.tokenizer={setup['tokenizer']}", "data.seq_len=32",
                      "--tokens", run["tokens_requested"], "--micro-batch-size", 2)
    assert rc == 0, hf
    assert hf.keys() == run.keys() and (hf["checkpoint"], hf["step"]) == (str(setup["hf"]), None)
    assert hf["tokens"] == run["tokens"] == 256
    assert hf["perplexity"] == pytest.approx(run["perplexity"], rel=1e-5)
    # Defaults: the folder's own tokenizer files, seq_len capped by max_position_embeddings (32).
    rc, default = eval_ppl(capsys, setup["hf"], *setup["data"], "--tokens", 256)
    assert rc == 0, default
    assert default["tokens"] == 256 and default["perplexity"] == pytest.approx(run["perplexity"], rel=1e-5)


def test_eval_ppl_refuses_folders_that_do_not_fit(setup, capsys):
    root, hf = setup["root"], setup["hf"]
    small_vocab = random_hf_folder(root / "small-vocab", setup["tokenizer"], vocab_size=100)
    rc, err = eval_ppl(capsys, small_vocab, *setup["data"])
    assert rc == 2
    assert_one_line_error(err, "32100 tokens", "vocab_size=100", str(small_vocab))

    reshaped = root / "reshaped"  # config.json says another model than the weights hold
    shutil.copytree(hf, reshaped)
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    rc, err = eval_ppl(capsys, reshaped, *setup["data"])
    assert rc == 2
    assert_one_line_error(err, str(reshaped), "mlp.gate_proj.weight has shape [64, 32]", "[96, 32]")

    no_tokenizer = random_hf_folder(root / "no-tokenizer")
    rc, err = eval_ppl(capsys, no_tokenizer, *setup["data"])
    assert rc == 2
    assert_one_line_error(err, "no tokenizer file", "data.tokenizer=")
    rc, err = eval_ppl(capsys, hf, "--checkpoint", "step_00000003")
    assert rc == 2
    assert_one_line_error(err, "Hugging Face model folder")


def test_pickled_weights_are_refused(setup, capsys):
    """A .bin is a pickle: it is never opened, whoever asks (eval_ppl, warm_start=)."""
    from megamora.checkpoint import check_warm_start

    folder, marker = setup["root"] / "pickled", setup["root"] / "ran"
    shutil.copytree(setup["hf"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": RunsCode(marker)}))
    rc, err = eval_ppl(capsys, folder, *setup["data"])
    assert rc == 2
    assert_one_line_error(err, "pytorch_model.bin", "only safetensors")
    with pytest.raises(ValueError, match="only safetensors"):
        check_warm_start(folder, ModelConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=2))
    assert not marker.exists()


def test_folders_our_llama_cannot_express(setup):
    root, hf = setup["root"], setup["hf"]
    config = json.loads((hf / "config.json").read_text())
    cases = {
        "rope-scaling": ({**config, "rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                         "rope type='llama3' is not supported"),
        "bias": ({**config, "attention_bias": True}, "attention_bias=True is not supported"),
        "gpt2": ({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a LlamaForCausalLM"),
        "no-vocab": ({k: v for k, v in config.items() if k != "vocab_size"}, "vocab_size=None"),
    }
    for name, (cfg, message) in cases.items():
        folder = root / f"cannot-{name}"
        folder.mkdir()  # config.json fails before any weight is looked for
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=message):
            read_hf_folder(folder)
    # Weights missing (an incomplete download) or extra (a bias config.json does not mention).
    state = load_file(hf / "model.safetensors")
    for name, weights, message in [
        ("partial", {k: v for k, v in state.items() if "layers.1." not in k}, "weights of config.json's model are missing"),
        ("extra", {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, "no place for"),
    ]:
        folder = root / f"weights-{name}"
        folder.mkdir()
        shutil.copyfile(hf / "config.json", folder / "config.json")
        save_file(weights, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            read_hf_folder(folder)


# --------------------------------------------------------------------------- warm_start


def test_warm_start_from_hf_folder(setup, shared_data):
    """A MoRA run warm-started from the exported folder is the run warm-started from the run itself:
    same W_init, same losses; and the report tools read it (W_init is the folder's weights)."""
    from megamora.export import initial_weights, load_merged_model
    from megamora.analysis import run_singular_value_counts
    from megamora.report import collect_run
    from megamora.run import pretrain

    mora = ("adapter.kind=mora", "adapter.r=4", "steps=2")
    root = setup["root"]
    from_hf = pretrain(load_config(None, tiny_overrides(shared_data, root / "mora-hf", *mora,
                                                        f"warm_start={setup['hf']}")))
    from_run = pretrain(load_config(None, tiny_overrides(shared_data, root / "mora-run", *mora,
                                                         f"warm_start={setup['full']}")))
    assert from_hf.losses == from_run.losses
    w_init = initial_weights(from_hf.run_dir)
    _, warm = load_merged_model(setup["full"])
    for k, v in warm.state_dict().items():
        assert torch.equal(w_init[k], v), k
    counts = run_singular_value_counts(from_hf.run_dir, threshold=1e-4)
    assert counts == run_singular_value_counts(from_run.run_dir, threshold=1e-4) and len(counts) == 7
    result = collect_run("mora-hf", from_hf.run_dir, threshold=1e-4)
    assert (result.config_method.label, result.step, result.sv_counts) == ("MoRA", 2, counts)


def test_warm_start_mismatch_exits_2_and_writes_nothing(setup):
    stdout, stderr = setup["launch"].communicate(timeout=300)
    assert setup["launch"].returncode == 2, stdout + stderr
    assert_one_line_error(stderr, f"warm_start={setup['other']}", "model.dim=64 in the folder vs 32 in this run",
                          "model.vocab_size=32200 in the folder vs 32100")
    assert not (setup["root"] / "mismatch").exists()
