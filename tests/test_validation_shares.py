"""Each rank tokenizes only its share of the validation set, and the set (so the perplexity) is the
same for any world size (issue 16, item 10)."""

import gzip
import json

import pytest
import torch

from megamora.config import DataConfig, ModelConfig
from megamora.data import check_validation_size, validation_batches, validation_share
from spawn_ranks import spawn_ranks


class RecordingTokenizer:
    """One id per whitespace-separated word; remembers the documents it was given."""

    eos_id = 1
    vocab_size = 1000

    def __init__(self):
        self.seen: list[str] = []

    def encode_batch(self, texts):
        self.seen += texts
        return [[2 + sum(map(ord, w)) % 997 for w in t.split()] for t in texts]


def sample_cfg(shared_data, **kw) -> DataConfig:
    return DataConfig(local_dir=str(shared_data / "c4-sample" / "en"), seq_len=64, encode_batch=8, **kw)


def record_numbers(shared_data) -> dict[str, int]:
    path = shared_data / "c4-sample" / "en" / "c4-validation.00000-of-00001.json.gz"
    with gzip.open(path, "rt") as f:
        return {json.loads(line)["text"]: j for j, line in enumerate(f)}


@pytest.mark.parametrize("world_size,pieces", [(2, 8), (3, 8), (4, 3)])
def test_shares_are_the_one_process_set_and_each_rank_tokenizes_only_its_pieces(shared_data, world_size, pieces):
    cfg = sample_cfg(shared_data, validation_pieces=pieces)
    one_tok = RecordingTokenizer()
    whole = validation_batches(cfg, one_tok, 3000)
    assert whole.shape == (46, 65)
    number = record_numbers(shared_data)
    rows, index, tokenized = [], [], 0
    for rank in range(world_size):
        tok = RecordingTokenizer()
        share = validation_share(cfg, tok, 3000, rank=rank, world_size=world_size)
        rows.append(share.sequences)
        index += share.index
        assert share.index == sorted(share.index) and all(i % pieces % world_size == rank for i in share.index)
        assert all(number[t] % pieces % world_size == rank for t in tok.seen)  # its own pieces' documents only
        tokenized += len(tok.seen)
    assert tokenized == len(one_tok.seen)  # together: what one process tokenizes, each document once
    order = torch.tensor(index).argsort()
    assert torch.equal(torch.cat(rows)[order], whole)


def test_one_piece_is_the_split_in_order_and_more_pieces_interleave(shared_data):
    tok = RecordingTokenizer()
    one = validation_batches(sample_cfg(shared_data, validation_pieces=1), tok, 3000)
    assert tok.seen == list(record_numbers(shared_data))[: len(tok.seen)]  # the first documents, in order
    four = validation_batches(sample_cfg(shared_data, validation_pieces=4), RecordingTokenizer(), 3000)
    assert one.shape == four.shape and torch.equal(one[0], four[0])  # the first document starts both
    piece_1 = validation_share(sample_cfg(shared_data, validation_pieces=4), RecordingTokenizer(), 3000, rank=1,
                               world_size=4)
    assert torch.equal(four[1::4], piece_1.sequences)  # sequences 1, 5, 9, ... are piece 1's


@pytest.mark.parametrize("world_size", [1, 2])
def test_fewer_tokens_are_the_first_sequences_of_the_larger_set(shared_data, world_size):
    """The periodic eval takes the first eval_tokens of a set loaded for final_eval_tokens."""
    cfg = sample_cfg(shared_data, validation_pieces=8)
    for rank in range(world_size):
        large = validation_share(cfg, RecordingTokenizer(), 6000, rank=rank, world_size=world_size)
        small = validation_share(cfg, RecordingTokenizer(), 1500, rank=rank, world_size=world_size)
        assert torch.equal(large.first(1500 // 64), small.sequences)


def test_a_short_split_keeps_what_each_piece_holds(shared_data):
    cfg = sample_cfg(shared_data, validation_pieces=8)
    asked = 10**7  # far more than the sample's 1000 documents
    whole = validation_batches(cfg, RecordingTokenizer(), asked, at_most=True)
    shares = [validation_share(cfg, RecordingTokenizer(), asked, rank=r, world_size=2, at_most=True) for r in (0, 1)]
    index = shares[0].index + shares[1].index
    assert len(index) == whole.shape[0] > 0
    assert torch.equal(torch.cat([s.sequences for s in shares])[torch.tensor(index).argsort()], whole)
    with pytest.raises(ValueError, match="piece 0 of data.validation_pieces=8"):
        validation_share(cfg, RecordingTokenizer(), asked, rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer tokens than one sequence of data.seq_len=64"):
        check_validation_size(0, cfg)


MODEL = ModelConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, vocab_size=1000)


def _eval_worker(rank: int, cfg: DataConfig, tmp: str) -> None:
    import torch.distributed as dist

    from megamora.evaluate import evaluate_loss
    from megamora.model import build_model, init_weights

    from datetime import timedelta

    from torch.distributed.fsdp import fully_shard

    # a short timeout: ranks out of step in their forward passes fail in seconds instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    model = build_model(MODEL, device="cpu")
    init_weights(model, 0, 0.02)
    for block in model.layers:  # sharded as a run shards it: every forward pass is collective
        fully_shard(block)
    fully_shard(model)
    share = validation_share(cfg, RecordingTokenizer(), 5 * 64, rank=rank, world_size=2)
    loss, tokens = evaluate_loss(model, share.sequences, 2, torch.device("cpu"))  # 3 and 2 rows: 2 and 1 rounds
    if rank == 0:
        torch.save((loss, tokens), f"{tmp}/result.pt")
    dist.destroy_process_group()


def test_two_ranks_evaluate_the_one_process_perplexity(shared_data, tmp_path):
    from megamora.evaluate import evaluate_loss
    from megamora.model import build_model, init_weights

    cfg = sample_cfg(shared_data, validation_pieces=5)
    spawn_ranks(_eval_worker, cfg, str(tmp_path), nprocs=2)
    two_loss, two_tokens = torch.load(tmp_path / "result.pt")
    model = build_model(MODEL, device="cpu")
    init_weights(model, 0, 0.02)
    one_loss, one_tokens = evaluate_loss(model, validation_batches(cfg, RecordingTokenizer(), 5 * 64), 2,
                                         torch.device("cpu"))
    assert two_tokens == one_tokens == 5 * 64
    assert two_loss == pytest.approx(one_loss, rel=1e-6)
