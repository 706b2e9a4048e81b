"""Input checks through the real entry point: a bad config fails before the run directory is
touched (one `error:` line, exit code 2); a resume must match the run it continues, and what a
compatible resume changes is recorded; short validation is evaluated and said so."""

import gzip
from pathlib import Path

import pytest
import yaml

from megamora.metrics import read_metrics
from test_train import REPO, launch, tiny_overrides


def assert_refused(proc, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def data_folder(root: Path, shared_data: Path, train: list[str] | None = None, validation: list[bytes] | None = None,
                train_lines: list[bytes] | None = None) -> Path:
    """A data folder: links to the sample's train files (or one file of `train_lines`), and its
    validation file (or one of `validation` lines)."""
    en = shared_data / "c4-sample" / "en"
    root.mkdir()
    if train_lines is not None:
        with gzip.open(root / "c4-train.00000-of-00001.json.gz", "wb") as f:
            f.write(b"".join(train_lines))
    for name in train if train is not None else ([] if train_lines is not None else
                                                 [p.name for p in en.glob("c4-train.*")]):
        (root / name).symlink_to(en / name)
    val = root / "c4-validation.00000-of-00001.json.gz"
    if validation is None:
        val.symlink_to(en / val.name)
    else:
        with gzip.open(val, "wb") as f:
            f.write(b"".join(validation))
    return root


def real_validation_lines(shared_data: Path, n: int) -> list[bytes]:
    with gzip.open(shared_data / "c4-sample" / "en" / "c4-validation.00000-of-00001.json.gz", "rb") as f:
        return [f.readline() for _ in range(n)]


BAD_LINES = [b"not json\n", b'{"url": "no text"}\n', b'{"text": "   "}\n', b"\xff\xfe\n"]

BAD_CONFIGS = {
    "mora-type": (["adapter.kind=mora", "adapter.r=4", "adapter.mora_type=5"], ["adapter.mora_type='5'"]),
    "seed": (["seed=-1"], ["seed=-1"]),
    "cycle-type": (["adapter.kind=mora", "adapter.r=4", "restarts.every=2", "restarts.mora_types=[1,5]"],
                   ["restarts.mora_types[1]='5'"]),
    # r_hat 11 for type 1 on the 32 x 32 layers, 10 for rotation: a restart could not switch in place
    "cycle-r-hat": (["adapter.kind=mora", "adapter.r=2", "restarts.every=2", "restarts.mora_types=[1,6]"],
                    ["restarts.mora_types", "r_hat 10", "q_proj (32 -> 32)"]),
    "lora-too-large": (["adapter.kind=lora", "adapter.r=100"], ["adapter.r=100", "q_proj (32 -> 32", "1024 weights"]),
    "mora-too-large": (["adapter.kind=mora", "adapter.r=100000"], ["adapter.r=100000", "2530 x 2530", "q_proj"]),
}


@pytest.mark.parametrize("bad,needles", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_fails_before_the_run_directory(shared_data, tmp_path, bad, needles):
    run_dir = tmp_path / "run"
    assert_refused(launch(tiny_overrides(shared_data, run_dir, *bad), check=False), *needles)
    assert not run_dir.exists()


def test_the_issues_huge_mora_on_the_9m_smoke_model(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(["--config", str(REPO / "configs" / "smoke" / "mora.yaml"), f"run_dir={run_dir}",
                   f"data.local_dir={shared_data}/c4-sample/en",
                   f"data.tokenizer={shared_data}/tokenizers/t5-base/spiece.model", "adapter.r=100000"], check=False)
    assert_refused(proc, "adapter.r=100000", "5060 x 5060", "(128 -> 128: 16384 weights)")
    assert not run_dir.exists()


@pytest.mark.parametrize("case", ["no-usable-training-document", "no-validation-data"])
def test_unusable_data_fails_before_the_run_directory(shared_data, tmp_path, case):
    if case == "no-usable-training-document":
        data = data_folder(tmp_path / "data", shared_data, train_lines=BAD_LINES)
        needles = ["data.train_glob", "no usable document", "bad_json"]
    else:
        data = data_folder(tmp_path / "data", shared_data, validation=BAD_LINES)
        needles = ["validation split holds fewer tokens than one sequence", "data.seq_len=32"]
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides(shared_data, run_dir, f"data.local_dir={data}"), check=False)
    assert_refused(proc, *needles)
    assert not run_dir.exists()


def test_too_few_documents_for_the_streams(shared_data, tmp_path):
    # one usable document: stream 0 of the 2 (global batch 4 / micro batch 2) gets it, stream 1 none
    good = real_validation_lines(shared_data, 1)
    data = data_folder(tmp_path / "data", shared_data, train_lines=good + [b"not json\n"])
    run_dir = tmp_path / "run"
    assert_refused(launch(tiny_overrides(shared_data, run_dir, f"data.local_dir={data}"), check=False),
                   "stream 1 of 2", "no usable document")
    assert not run_dir.exists()


def test_resume_must_match_the_run_and_records_what_it_changes(shared_data, tmp_path):
    from megamora.export import load_merged_model, run_config
    from megamora.report import final_eval_record

    run_dir = tmp_path / "run"
    lora = ["adapter.kind=lora", "adapter.r=4"]
    launch(tiny_overrides(shared_data, run_dir, "steps=3", *lora))
    before = snapshot(run_dir)
    other_data = data_folder(tmp_path / "other", shared_data, train=["c4-train.00000-of-00004.json.gz"])
    refused = {
        "adapter": (["adapter.kind=mora", "adapter.r=4"], ["adapter.kind: lora (run) vs mora (this command)"]),
        "model": (["model.dim=64", *lora], ["model.dim: 32 (run) vs 64 (this command)"]),
        "data": ([f"data.local_dir={other_data}", *lora], [f"data.local_dir: {shared_data}/c4-sample/en (run) vs "
                                                             f"{other_data} (this command)"]),
    }
    for bad, needles in refused.values():
        proc = launch(tiny_overrides(shared_data, run_dir, "steps=6", *bad), check=False)
        assert_refused(proc, "cannot resume", *needles)
        assert snapshot(run_dir) == before  # byte for byte: config.yaml, metrics, checkpoints

    # the tools still read the run
    assert run_config(run_dir).adapter.kind == "lora"
    assert final_eval_record(run_dir)["step"] == 3
    load_merged_model(run_dir)

    # more steps, on the same training files in another folder (same names: the data moved): resumes
    moved = data_folder(tmp_path / "moved", shared_data)
    launch(tiny_overrides(shared_data, run_dir, "steps=6", f"data.local_dir={moved}", *lora))
    assert (run_dir / "config.1.yaml").read_bytes() == before[run_dir / "config.yaml"]
    new = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert new["steps"] == 6 and new["data"]["local_dir"] == str(moved)
    setup = read_metrics(run_dir, "setup")[-1]
    assert setup["previous_config"] == "config.1.yaml"
    assert setup["config_changes"] == {"steps": [3, 6], "data.local_dir": [f"{shared_data}/c4-sample/en", str(moved)]}
    assert setup["resumed_from"].endswith("step_00000003")
    assert sorted({r["step"] for r in read_metrics(run_dir, "train")}) == list(range(1, 7))

    # a finished run trains nothing, changes nothing, and says its perplexity again
    after = snapshot(run_dir)
    proc = launch(tiny_overrides(shared_data, run_dir, "steps=6", f"data.local_dir={moved}", *lora))
    final = read_metrics(run_dir, "eval")[-1]
    assert final["step"] == 6
    assert f"final validation perplexity: {final['perplexity']:.2f} over {final['tokens']} tokens" in proc.stdout
    assert "already at step 6" in proc.stderr
    assert not (run_dir / "config.2.yaml").exists()
    assert (run_dir / "config.yaml").read_bytes() == after[run_dir / "config.yaml"]
    assert all(after[p] == p.read_bytes() for p in after if "checkpoints" in p.parts)


def test_eval_tokens_beyond_the_validation_split(shared_data, tmp_path):
    data = data_folder(tmp_path / "data", shared_data, validation=real_validation_lines(shared_data, 3))
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides(shared_data, run_dir, f"data.local_dir={data}", "steps=2", "eval_every=0",
                                 "save_every=0", "eval_tokens=100000"))
    record = read_metrics(run_dir, "eval")[-1]
    assert record["tokens_requested"] == 100000 and record["validation_short"] is True
    assert 0 < record["tokens"] < 100000 and record["tokens"] % 32 == 0
    assert "WARNING the validation split holds only" in proc.stderr
    assert f"over {record['tokens']} tokens (the validation split holds fewer than the 100000 asked)" in proc.stdout

    from megamora.evaluate import evaluate_run  # the tools reproduce the short eval, flagged the same way

    again = evaluate_run(run_dir)
    assert again["validation_short"] is True and again["tokens"] == record["tokens"]
    assert again["perplexity"] == pytest.approx(record["perplexity"], rel=1e-5)


def test_mora_type_names_match_the_adapters():
    from megamora.adapters import MORA_TYPES, canonical_mora_type
    from megamora.adapters.mora import _ALIASES
    from megamora.config import MORA_TYPE_ALIASES, MORA_TYPE_NAMES, mora_type_key

    assert set(MORA_TYPE_NAMES) == set(MORA_TYPES) | set(_ALIASES) and MORA_TYPE_ALIASES == _ALIASES
    for name in [*MORA_TYPE_NAMES, " Rotation", 4]:
        assert mora_type_key(name) == canonical_mora_type(name)
    assert mora_type_key("5") is None


def test_train_source_is_what_the_data_state_records(shared_data):
    from megamora.config import DataConfig
    from megamora.data import build_train_loader, train_source

    cfg = DataConfig(local_dir=str(shared_data / "c4-sample" / "en"))
    loader = build_train_loader(cfg, None, stream_ids=[0], num_streams=2, micro_batch_size=1, seed=0)
    assert loader.state_dict()["0"]["source"] == train_source(cfg)


def test_training_data_probe_in_hub_mode(shared_data, tmp_path):
    from megamora.config import DataConfig
    from megamora.data import check_train_documents

    en = shared_data / "c4-sample" / "en"
    good = DataConfig(local_dir=None, dataset="json", dataset_config="", data_files={"train": str(en / "c4-train.*")})
    check_train_documents(good, num_streams=2)
    with gzip.open(tmp_path / "bad.json.gz", "wb") as f:
        f.write(b'{"text": ""}\n{"text": 3}\n')
    bad = DataConfig(local_dir=None, dataset="json", dataset_config="", data_files={"train": str(tmp_path / "bad*")})
    with pytest.raises(ValueError, match="no usable document.*'empty_text': 1, 'no_text': 1"):
        check_train_documents(bad, num_streams=2)
