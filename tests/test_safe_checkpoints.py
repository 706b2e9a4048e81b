"""Damaged and crafted run directories: every tool fails in one line (exit 2) naming the file, and
loading a checkpoint (tools, warm_start=, resume) never runs code from it.

Three 4-step runs (LoRA with checkpoints at steps 2 and 4, MoRA, DeepSpeed LoRA) are trained once
for the module; the damaged copies keep only their newest checkpoint."""

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tools import finish, load_tool, one_thread, start_tool, tiny_overrides
from test_train import launch_together

from megamora.checkpoint import latest_checkpoint, list_checkpoints
from megamora.config import load_config
from megamora.metrics import read_metrics

RUN_KINDS = {
    "lora": ["adapter.kind=lora", "adapter.r=4", "save_every=2"],
    "mora": ["adapter.kind=mora", "adapter.r=4"],
    "deepspeed": ["parallel.engine=deepspeed", "adapter.kind=lora", "adapter.r=4"],
}
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
TOOLS = ["merge_checkpoint", "eval_ppl", "count_singular_values", "convert_to_hf", "report"]
# plain dcp.save / dcp.load below, in one process without a process group
no_group = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    from megamora.run import pretrain

    root = tmp_path_factory.mktemp("runs")
    for name, extra in RUN_KINDS.items():
        pretrain(load_config(None, tiny_overrides(shared_data, root / name, *extra)))
    return {name: root / name for name in RUN_KINDS}


class RunsCode:
    """Unpickling it runs `touch <marker>`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def copy_newest(src: Path, dst: Path) -> Path:
    """A copy of run `src` with its newest checkpoint only; returns that checkpoint."""
    newest = latest_checkpoint(src).name
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n.startswith("step_") and n != newest])
    return latest_checkpoint(dst)


def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "code-ran"


@pytest.fixture(scope="module")
def bad(runs, tmp_path_factory, marker) -> dict[str, tuple[Path, str]]:
    """Damaged run directories -> (run dir, the file the error must name)."""
    root = tmp_path_factory.mktemp("bad")
    out = {}
    cut_in_half(copy_newest(runs["lora"], root / "truncated-distcp") / "__0_0.distcp")
    out["truncated-distcp"] = (root / "truncated-distcp", "__0_0.distcp")
    cut_in_half(copy_newest(runs["lora"], root / "truncated-metadata") / ".metadata")
    out["truncated-metadata"] = (root / "truncated-metadata", ".metadata")
    # config.yaml and metrics.jsonl of a LoRA run, the checkpoint of a MoRA run
    ckpt = copy_newest(runs["lora"], root / "mismatch")
    shutil.rmtree(ckpt)
    shutil.copytree(latest_checkpoint(runs["mora"]), ckpt)
    out["mismatch"] = (root / "mismatch", "config.yaml")
    for part, name in (("optim", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), ("model", DS_MODEL_STATES)):
        cut_in_half(copy_newest(runs["deepspeed"], root / f"ds-truncated-{part}") / "deepspeed" / name)
        out[f"ds-truncated-{part}"] = (root / f"ds-truncated-{part}", name)
    # a real metadata with the payload hidden inside it
    ckpt = copy_newest(runs["lora"], root / "malicious")
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    metadata.planner_data = RunsCode(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    out["malicious"] = (root / "malicious", ".metadata")
    # DeepSpeed's model states (a torch.save archive, read with pickle by DeepSpeed) with the payload inside
    model_states = copy_newest(runs["deepspeed"], root / "ds-malicious") / "deepspeed" / DS_MODEL_STATES
    states = torch.load(model_states, map_location="cpu", weights_only=False)  # our own, trusted here
    states["client_state"] = RunsCode(marker)
    torch.save(states, model_states)
    out["ds-malicious"] = (root / "ds-malicious", DS_MODEL_STATES)
    return out


def tool_argv(tool: str, run_dir: Path, out: Path) -> list:
    return {
        "merge_checkpoint": [run_dir, "--out", out / "merged.safetensors"],
        "eval_ppl": [run_dir, "--device", "cpu"],
        "count_singular_values": [run_dir],
        "convert_to_hf": [run_dir, "--out", out / "hf"],
        "report": ["--runs", f"a={run_dir}", "--out", out / "report", "--device", "cpu"],
    }[tool]


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- tools


@pytest.mark.parametrize("case", ["truncated-distcp", "truncated-metadata", "mismatch", "ds-truncated-optim",
                                  "ds-truncated-model", "malicious", "ds-malicious"])
def test_every_tool_fails_in_one_line_naming_the_file(bad, case, tmp_path, capsys, marker):
    run_dir, name = bad[case]
    for tool in TOOLS:
        argv = tool_argv(tool, run_dir, tmp_path)
        assert load_tool(tool).main(list(map(str, argv))) == 2, (tool, case)
        captured = capsys.readouterr()
        assert_one_line(captured.err, name)
        assert captured.out == ""
    assert not list(tmp_path.iterdir())  # nothing written
    assert not marker.exists()


def test_mismatch_names_the_keys(bad):
    from megamora.export import load_merged_model

    run_dir, _ = bad["mismatch"]
    with pytest.raises(ValueError) as e:
        load_merged_model(run_dir)
    assert str(e.value).startswith(f"{latest_checkpoint(run_dir)}: does not match {run_dir / 'config.yaml'}: ")
    assert "missing keys [layers.0.mlp.down_proj.lora_A" in str(e.value) and "unexpected keys [" in str(e.value)
    assert ".M" in str(e.value).split("unexpected keys")[1] and "\n" not in str(e.value)


def test_tools_as_commands_exit_2_with_one_line(bad, tmp_path, marker):
    """The real command lines (no stray warnings, logs or DeepSpeed chatter on stderr)."""
    procs = {(tool, case): start_tool([tool, *tool_argv(tool, bad[case][0], tmp_path / f"{tool}-{case}")])
             for tool in TOOLS for case in ("malicious", "ds-malicious")}
    for (tool, case), proc in procs.items():
        done = finish(proc)
        assert done.returncode == 2, (tool, case, done.stderr)
        assert_one_line(done.stderr, bad[case][1])
    assert not marker.exists()


# --------------------------------------------------------------------------- no code runs


def test_payload_is_real(tmp_path):
    """Plain pickle would run it, and so would torch.load without weights_only (how DeepSpeed reads
    its checkpoints): the checks below are not vacuous."""
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()
    torch.save({"client_state": RunsCode(tmp_path / "ran-torch")}, tmp_path / "states.pt")
    torch.load(tmp_path / "states.pt", weights_only=False)
    assert (tmp_path / "ran-torch").exists()


def test_metadata_unpickler_refuses_every_other_global(runs, tmp_path):
    from megamora.engines.fsdp2 import MetadataUnpickler, read_dcp_metadata

    ckpt = latest_checkpoint(runs["lora"])
    real = read_dcp_metadata(ckpt)  # every global of a real checkpoint is allowed
    assert real.state_dict_metadata.keys() == pickle.loads((ckpt / ".metadata").read_bytes()).state_dict_metadata.keys()

    class Touch:  # a bound method of an allowed class (PosixPath) pickles through builtins.getattr
        def __reduce__(self):
            return (tmp_path / "touched").touch, ()

    class Eval:
        def __reduce__(self):
            return eval, (f"open({str(tmp_path / 'evaled')!r}, 'w')",)

    for payload in (RunsCode(tmp_path / "ran"), Touch(), Eval(), [torch.float32, Eval()]):
        data = pickle.dumps(payload)
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            MetadataUnpickler(io.BytesIO(data)).load()
    assert not list(tmp_path.iterdir())


@no_group
def test_non_tensor_values_load_weights_only(tmp_path, marker):
    """DCP's own planner loads non-tensor values (optimizer hyper-parameters) with
    torch.load(weights_only=False); ours refuses a pickled payload there and names the shard."""
    import torch.distributed.checkpoint as dcp

    from megamora.engines.fsdp2 import _dcp_load

    ckpt = tmp_path / "ckpt"
    dcp.save({"lr": RunsCode(marker), "w": torch.ones(3)}, checkpoint_id=str(ckpt), no_dist=True)
    state = {"lr": 0.1, "w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"cannot read __0_0\.distcp \(.*weights_only"):
        _dcp_load(state, ckpt)
    assert not marker.exists()
    dcp.save({"lr": 0.5, "w": torch.ones(3)}, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    _dcp_load(state, tmp_path / "good")
    assert state["lr"] == 0.5 and torch.equal(state["w"], torch.ones(3))


@pytest.mark.parametrize("case", ["malicious", "ds-malicious"])
def test_warm_start_and_resume_refuse_a_crafted_checkpoint(bad, shared_data, tmp_path, marker, case):
    run_dir, name = bad[case]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    kind = RUN_KINDS["lora" if case == "malicious" else "deepspeed"]
    warm, resume = launch_together(
        (tiny_overrides(shared_data, tmp_path / "warm", "adapter.kind=lora", "adapter.r=4", f"warm_start={run_dir}"),
         1),
        (tiny_overrides(shared_data, run_dir, *kind, "steps=6"), 1), check=False)
    assert warm.returncode == 2 and not (tmp_path / "warm").exists()
    assert_one_line(warm.stderr, name, "refused")
    assert resume.returncode == 2
    assert_one_line(resume.stderr, name, "refused")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not marker.exists()


# --------------------------------------------------------------------------- the normal path


@no_group
def test_merge_equals_plain_dcp_load(runs, tmp_path):
    """The safe reader loads exactly what DCP's default reader loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from megamora.adapters import apply_adapters, merge_adapters
    from megamora.export import run_config
    from megamora.model import build_model, init_weights

    out = tmp_path / "merged.safetensors"
    assert load_tool("merge_checkpoint").main([str(runs["mora"]), "--out", str(out)]) == 0
    cfg = run_config(runs["mora"])
    model = build_model(cfg.model, device="meta")
    apply_adapters(model, cfg.adapter)
    model.to_empty(device="cpu")
    init_weights(model, cfg.seed, cfg.model.init_std)
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(latest_checkpoint(runs["mora"])), no_dist=True)
    set_model_state_dict(model, sd)
    expected = merge_adapters(model).state_dict()
    merged = load_file(out)
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def test_eval_on_good_runs_matches_their_final_eval(runs):
    from megamora.evaluate import evaluate_run

    for name in ("lora", "deepspeed"):
        record = read_metrics(runs[name], "eval")[-1]
        assert evaluate_run(runs[name])["perplexity"] == pytest.approx(record["perplexity"], rel=1e-5), name


def test_resume_through_the_safe_reader_is_bitwise(runs, shared_data, tmp_path):
    """Optimizer hyper-parameters (non-tensor values) load weights_only: the resumed run continues
    the same trajectory as the uninterrupted one."""
    from test_train import run_in_process

    ckpt = list_checkpoints(runs["lora"])[0]
    assert ckpt.name == "step_00000002"
    shutil.copytree(runs["lora"], tmp_path / "run", ignore=lambda d, names: [n for n in names if n == "step_00000004"])
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    resumed = run_in_process(tiny_overrides(shared_data, tmp_path / "run", *RUN_KINDS["lora"]))
    assert resumed.resumed_from.name == "step_00000002"
    full = {r["step"]: r["loss"] for r in read_metrics(runs["lora"], "train")}
    assert resumed.losses == [full[3], full[4]]


# --------------------------------------------------------------------------- report: which method


def test_report_method_comes_from_config_yaml(runs, tmp_path, capsys):
    report = load_tool("report")
    argv = ["--runs", f"mora={runs['lora']}", f"lora-r4={runs['mora']}", "--no-figure", "--out", str(tmp_path / "r")]
    assert report.main(argv) == 0
    out = capsys.readouterr().out
    assert "| LoRA (mora) | 1 |" in out and "| MoRA (lora-r4) | 1 |" in out
    assert "note: 'mora' is labelled MoRA but its config.yaml says LoRA" in out
    assert "note: 'lora-r4' is labelled LoRA but its config.yaml says MoRA" in out
    assert "labelled MoRA but its config.yaml says LoRA" in (tmp_path / "r" / "report.md").read_text()

    # config.yaml of another run: refused, whether or not checkpoints are read
    swapped = tmp_path / "swapped"
    shutil.copytree(runs["mora"], swapped)
    shutil.copy(runs["lora"] / "config.yaml", swapped / "config.yaml")
    assert report.main(["--runs", f"x={swapped}", "--no-figure", "--out", str(tmp_path / "s")]) == 2
    assert_one_line(capsys.readouterr().err, f"{swapped / 'config.yaml'} says adapter.kind=lora",
                    "logged by a mora run")
    assert not (tmp_path / "s").exists()


def test_damaged_metrics_and_trainer_state_are_named(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpt = copy_newest(runs["mora"], run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 5, "perpl')  # a line cut short by a crash
    assert load_tool("report").main(["--runs", f"a={run_dir}", "--no-figure", "--out", str(tmp_path / "r")]) == 2
    assert_one_line(capsys.readouterr().err, "metrics.jsonl: cannot read")
    (ckpt / "trainer_state.json").write_text("{")
    assert load_tool("count_singular_values").main([str(run_dir)]) == 2
    assert_one_line(capsys.readouterr().err, "cannot read trainer_state.json")
