"""The tools/ command lines on tiny real runs: merged checkpoint, perplexity, singular values,
Hugging Face export, the Table 3 / Figure 5 report, and bad input (exit 2, one line on stderr).

Three 4-step runs (full-rank, MoRA, ReMoRA) are trained once per session. Every tool process is
started at once (the bad-input ones while the runs train): most of their time is importing torch."""

import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megamora.config import load_config
from megamora.export import load_merged_model
from megamora.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
RUN_KINDS = {
    "full": [],
    "mora": ["adapter.kind=mora", "adapter.r=4"],  # type 1, r_hat 16 (attention) / 20 (MLP)
    # types 1 then 2; a checkpoint at the merge (step 2) too: each merge segment's update
    "remora": ["adapter.kind=mora", "adapter.r=4", "restarts.every=2", "restarts.warmup=1", "save_every=2"],
}


def tiny_overrides(shared_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", "steps=4", "global_batch_size=4", "micro_batch_size=2",
        "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
        f"data.local_dir={shared_data}/c4-sample/en",
        f"data.tokenizer={shared_data}/tokenizers/t5-base/spiece.model",
        "data.seq_len=32", "data.shuffle_buffer=16", "eval_every=0", "eval_tokens=256", "save_every=0",
        "optim.lr=1e-2", "optim.warmup_steps=2", "logging.log_every=1", "logging.progress_bar=false",
        *extra,
    ]


@contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads cost a lot on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    from megamora.run import pretrain

    root = tmp_path_factory.mktemp("runs")
    with one_thread():
        for name, extra in RUN_KINDS.items():
            pretrain(load_config(None, tiny_overrides(shared_data, root / name, *extra)))
    return {name: root / name for name in RUN_KINDS}


def start_tool(argv: list) -> subprocess.Popen:
    """`python tools/<argv[0]>.py argv[1:]`, started in the background."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(TOOLS / f"{argv[0]}.py"), *map(str, argv[1:])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (f"{proc.args} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tool-outputs")


@pytest.fixture(scope="session")
def cli(request, out_dir) -> dict[str, subprocess.CompletedProcess]:
    """Every tool invocation of this file, run once and concurrently: most of a tool's time is
    importing torch. The bad-input calls need no run, so they start while the runs train."""
    not_run = out_dir / "not-a-run"
    not_run.mkdir()
    procs = {f"bad-{argv[0]}": start_tool(argv) for argv in [
        ["merge_checkpoint", not_run, "--out", out_dir / "bad.safetensors"],
        ["eval_ppl", out_dir / "missing"],
        ["count_singular_values", not_run],
        ["convert_to_hf", not_run, "--out", out_dir / "bad-hf"],
        ["report", "--runs", f"a={not_run}", "--out", out_dir / "bad-report"],
    ]}
    try:
        runs = request.getfixturevalue("runs")
    except BaseException:
        for proc in procs.values():
            proc.kill()
            proc.communicate()
        raise
    procs.update({key: start_tool(argv) for key, argv in {
        "merge": ["merge_checkpoint", runs["mora"], "--out", out_dir / "mora.safetensors"],
        "eval": ["eval_ppl", runs["remora"], "--micro-batch-size", 3],
        "count": ["count_singular_values", runs["mora"], "--threshold", 1e-4, "--json"],
        "count-segment": ["count_singular_values", runs["remora"], "--since", "step_00000002", "--threshold", 1e-4,
                          "--json"],
        "count-segment-itself": ["count_singular_values", runs["remora"], "--since", "step_00000004"],
        "convert": ["convert_to_hf", runs["remora"], "--out", out_dir / "hf", "--checkpoint", "step_00000004"],
        "report": ["report", "--runs", *(f"{k}={v}" for k, v in runs.items()), "--out", out_dir / "report",
                   "--device", "cpu"],
    }.items()})
    return {key: finish(proc) for key, proc in procs.items()}


def final_eval(run_dir: Path) -> dict:
    return read_metrics(run_dir, "eval")[-1]


# --------------------------------------------------------------------------- merge_checkpoint


def test_merge_checkpoint_matches_merged_model(runs, cli, out_dir):
    ok(cli["merge"])
    path = out_dir / "mora.safetensors"
    merged = load_file(path)
    _, model = load_merged_model(runs["mora"])
    expected = model.state_dict()
    assert sorted(merged) == sorted(expected)
    assert not any(".base." in k or k.endswith((".M", "lora_A", "lora_B")) for k in merged)
    for key, value in expected.items():
        assert merged[key].dtype == torch.float32
        assert torch.equal(merged[key], value), key
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and meta["checkpoint"].endswith("step_00000004")
    assert json.loads(meta["model_config"])["dim"] == 32
    assert not list(out_dir.glob(".tmp-*"))  # written via a temp file, then renamed


# --------------------------------------------------------------------------- eval_ppl


def test_eval_ppl_equals_the_runs_final_eval(runs, cli):
    # ReMoRA: the checkpoint's layers are on operator type 2 after the step-2 restart, then merged.
    result = json.loads(ok(cli["eval"]).strip().splitlines()[-1])
    record = final_eval(runs["remora"])
    assert result["tokens"] == record["tokens"] == 256
    assert result["perplexity"] == pytest.approx(record["perplexity"], rel=1e-5)
    assert result["loss"] == pytest.approx(record["loss"], rel=1e-6)
    assert result["checkpoint"].endswith("step_00000004") and result["step"] == 4


def test_evaluate_run_library_path(runs):
    from megamora.evaluate import evaluate_run

    record = final_eval(runs["mora"])
    result = evaluate_run(runs["mora"], data_overrides=["data.shuffle_buffer=0"])  # validation ignores it
    assert result["perplexity"] == pytest.approx(record["perplexity"], rel=1e-5)
    fewer = evaluate_run(runs["mora"], tokens=64, micro_batch_size=1)
    assert fewer["tokens"] == 64 and fewer["perplexity"] != result["perplexity"]


# --------------------------------------------------------------------------- count_singular_values


def test_count_singular_values(runs, cli):
    from megamora.analysis import run_singular_value_counts

    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    r_hat = read_metrics(runs["mora"], "setup")[0]["mora_r_hat"]
    assert r_hat == {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 16,
                     "gate_proj": 20, "up_proj": 20, "down_proj": 20}
    # A tiny threshold counts the numerical rank: MoRA type 1 never exceeds r_hat ...
    mora = json.loads(ok(cli["count"]))
    assert set(mora) == set(kinds)
    assert all(1 <= mora[k] <= r_hat[k] for k in kinds), mora
    # ... full-rank training reaches full rank (min(32, 32 or 64) = 32) ...
    full = run_singular_value_counts(runs["full"], threshold=1e-4)
    assert all(full[k] == 32 for k in kinds), full
    # ... and ReMoRA's switch from type 1 to type 2 goes past r_hat (the point of Figure 5).
    remora = run_singular_value_counts(runs["remora"], threshold=1e-4)
    assert all(remora[k] > r_hat[k] for k in kinds), remora
    # Figure 5's threshold: non-zero counts for a full-rank run, fewer than at 1e-4.
    paper = run_singular_value_counts(runs["full"])
    assert all(0 < paper[k] <= full[k] for k in kinds), paper


def test_singular_values_of_one_merge_segment(runs, cli):
    """--since: the update between two checkpoints. Each ReMoRA merge segment is one MoRA of one type
    (rank <= r_hat), while their sum goes past r_hat; the segments add up to the whole run's dW."""
    from megamora.analysis import run_deltas, run_singular_value_counts

    r_hat = read_metrics(runs["remora"], "setup")[0]["mora_r_hat"]
    whole, first = run_deltas(runs["remora"]), run_deltas(runs["remora"], "step_00000002")
    second = run_deltas(runs["remora"], since="step_00000002")
    assert whole.keys() == first.keys() == second.keys()
    for name in whole:
        torch.testing.assert_close(first[name] + second[name], whole[name], rtol=0, atol=1e-6)
    segment = json.loads(ok(cli["count-segment"]))
    assert segment == run_singular_value_counts(runs["remora"], threshold=1e-4, since="step_00000002")
    assert all(1 <= segment[k] <= r_hat[k] for k in r_hat), segment
    assert all(run_singular_value_counts(runs["remora"], threshold=1e-4)[k] > r_hat[k] for k in r_hat)
    bad = cli["count-segment-itself"]
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--since step_00000004" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------- convert_to_hf


def test_convert_to_hf_matches_transformers(runs, cli, out_dir, shared_data):
    transformers = pytest.importorskip("transformers")
    from megamora.hf import load_hf

    stdout = ok(cli["convert"])
    hf_dir = out_dir / "hf"
    assert "Hub name" not in stdout
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size")
    assert [config[k] for k in shape] == [32, 64, 2, 2, 2, 32100]
    assert (config["eos_token_id"], config["pad_token_id"], config["tie_word_embeddings"]) == (1, 0, False)
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-6 and config["torch_dtype"] == "float32"
    tok_dir = shared_data / "tokenizers" / "t5-base"
    for name in ("spiece.model", "tokenizer.json"):
        assert (hf_dir / name).read_bytes() == (tok_dir / name).read_bytes()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert all(k == "lm_head.weight" or k.startswith("model.") for k in keys)

    _, ours = load_merged_model(runs["remora"])
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, 32100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=0, atol=1e-5)
        _, back = load_hf(hf_dir)
        assert torch.equal(back(tokens), expected)  # round trip is exact


def test_save_hf_tied_embeddings_and_hub_tokenizer(tmp_path):
    from megamora.config import ModelConfig
    from megamora.hf import load_hf, local_tokenizer_files, save_hf
    from megamora.model import build_model, init_weights

    cfg = ModelConfig(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, tie_embeddings=True)
    model = build_model(cfg, device="cpu")
    init_weights(model, seed=1)
    assert local_tokenizer_files("t5-base") == []  # a Hub name: nothing to copy
    with pytest.raises(FileNotFoundError, match="missing.model"):
        local_tokenizer_files(tmp_path / "missing.model")
    written = save_hf(model, cfg, tmp_path / "hf")
    assert sorted(p.name for p in written) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    cfg2, back = load_hf(tmp_path / "hf")
    assert cfg2.tie_embeddings and cfg2.n_kv_heads == 1 and back.lm_head.weight is back.embed_tokens.weight
    tokens = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    from megamora.adapters import apply_adapters
    from megamora.config import AdapterConfig

    apply_adapters(model, AdapterConfig(kind="lora", r=2))
    with pytest.raises(ValueError, match="merge_adapters"):
        save_hf(model, cfg, tmp_path / "unmerged")


# --------------------------------------------------------------------------- report


def test_report_writes_table_and_figures(runs, cli, out_dir):
    """tools/report.py is the report over seeds with a row of n = 1 per named run."""
    import matplotlib.image

    stdout = ok(cli["report"])
    report = out_dir / "report"
    text = (report / "report.md").read_text()
    for name, method in (("full", "Full-rank"), ("mora", "MoRA"), ("remora", "ReMoRA")):
        ppl = final_eval(runs[name])["perplexity"]
        row = f"| {method} | 1 | 256 | {ppl:.2f} | {ppl:.2f}-{ppl:.2f} | {ppl:.2f} |"
        assert row in text and row in stdout
    assert text.startswith("# MoRA pretraining report\n") and "| method | seeds | eval tokens |" in text
    assert "| module | Full-rank | MoRA | ReMoRA |" in text and "![Figure 5](figure5.png)" in text
    assert "are not both present: no singular-value comparison" in text  # no low-rank row here
    results = json.loads((report / "results.json").read_text())
    assert [(r["method"], r["config_method"], r["step"]) for r in results["runs"]] == \
        [("full", "Full-rank", 4), ("mora", "MoRA", 4), ("remora", "ReMoRA", 4)]
    assert results["methods"] == ["full", "mora", "remora"] and results["recipe"] is None
    assert all(len(r["sv_counts"]) == 7 and r["perplexity_source"] == "metrics" for r in results["runs"])
    for name in ("figure4.png", "figure5.png"):
        image = matplotlib.image.imread(report / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"wrote {name.removesuffix('.png')}: {report / name}" in stdout


def test_table3_paper_column_and_methods():
    from megamora.methods import method_of
    from megamora.report import RunResult, paper_perplexity, preset_of, summarize_rows, table3_markdown

    def method(*overrides):
        return method_of(load_config(None, ["run_dir=x", *overrides]))

    labels = [method(*o).label for o in ([], ["adapter.kind=lora"], ["adapter.kind=mora"],
                                         ["adapter.kind=lora", "restarts.every=2"],
                                         ["adapter.kind=mora", "restarts.every=2"])]
    assert labels == ["Full-rank", "LoRA", "MoRA", "ReLoRA", "ReMoRA"]
    assert preset_of(load_config(None, ["run_dir=x", "model.preset=1b"]).model) == "1b"
    assert preset_of(load_config(None, ["run_dir=x", "model.dim=768", "model.ffn_dim=2560", "model.n_layers=24",
                                        "model.n_heads=16"]).model) == "250m"  # shapes of a preset, unnamed
    assert (paper_perplexity("ReMoRA", "250m"), paper_perplexity("LoRA", "1b")) == (26.74, 28.56)
    assert paper_perplexity("MoRA", "60m") is None and paper_perplexity("Full-rank", "250m") is None

    def run(name, *overrides):
        return RunResult(name, 0, "d", 10000, 30.0, 1000, {}, {}, method(*overrides))

    rows = summarize_rows([run("remora", "adapter.kind=mora", "restarts.every=2"), run("full"),
                           run("mora-r8", "adapter.kind=mora")], ["remora", "full", "mora-r8"], "250m")
    lines = table3_markdown(rows, [0]).splitlines()
    assert lines[0].endswith("| seed 0 | paper |")
    assert lines[2] == "| ReMoRA | 1 | 1000 | 30.00 | 30.00-30.00 | 30.00 | 26.74 |"
    assert lines[3] == "| Full-rank | 1 | 1000 | 30.00 | 30.00-30.00 | 30.00 |  |"
    assert lines[4] == "| MoRA (r8) | 1 | 1000 | 30.00 | 30.00-30.00 | 30.00 |  |"  # a variant: not the paper's row


# --------------------------------------------------------------------------- bad input


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_input_exits_2_with_one_line(cli, out_dir):
    bad = {key: proc for key, proc in cli.items() if key.startswith("bad-")}
    assert len(bad) == 5  # one per tool
    for key, proc in bad.items():
        assert proc.returncode == 2, (key, proc.stdout, proc.stderr)
        assert_one_line_error(proc.stderr, "is not a run directory")
        assert proc.stdout == ""
    assert not [p for p in out_dir.iterdir() if p.name.startswith("bad")]  # nothing written


def test_bad_input_in_process(runs, tmp_path, capsys):
    """The other bad inputs through each tool's main(): no checkpoint, bad checkpoint path, bad override."""
    no_ckpt = tmp_path / "no-checkpoint"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text((runs["mora"] / "config.yaml").read_text())
    cases = [
        ("merge_checkpoint", [str(no_ckpt), "--out", str(tmp_path / "x.safetensors")], "no checkpoint in"),
        ("merge_checkpoint", [str(runs["mora"]), "--out", str(tmp_path)], "is a directory"),
        ("count_singular_values", [str(no_ckpt)], "no checkpoint in"),
        ("count_singular_values", [str(runs["mora"]), "--checkpoint", str(tmp_path / "nope")], "checkpoint not found"),
        ("convert_to_hf", [str(no_ckpt), "--out", str(tmp_path / "hf")], "no checkpoint in"),
        ("convert_to_hf", [str(runs["mora"]), "--out", str(tmp_path / "hf"), "--tokenizer", "/nope/spiece.model"],
         "tokenizer file not found"),
        ("eval_ppl", [str(runs["mora"]), "model.dim=64"], "only data.* overrides"),
        ("eval_ppl", [str(runs["mora"]), f"data.local_dir={tmp_path / 'nope'}"], "data.local_dir"),
        ("eval_ppl", [str(runs["mora"]), "--checkpoint", "step_00000099"], "checkpoint not found"),
        ("report", ["--runs", f"a={no_ckpt}", "--out", str(tmp_path / "r")], "no metrics.jsonl"),
        ("report", ["--runs", f"a={runs['mora']}", f"a={runs['full']}", "--out", str(tmp_path / "r")], "distinct"),
    ]
    tools = {name: load_tool(name) for name in {c[0] for c in cases}}
    for name, argv, needle in cases:
        assert tools[name].main(argv) == 2, (name, argv)
        assert_one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "r").exists()
