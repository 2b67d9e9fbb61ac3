"""SFT's row order: every chat once per epoch, a new order each epoch, each row drawn in O(1); packed rows."""

import numpy as np
import pytest
import torch

from xiaolm.model.llama import Llama, LlamaConfig
from xiaolm.tokenizer.chat import collate, collate_packed, pack_examples
from xiaolm.train.sft import PackedRows, shuffled_index


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 1000])
def test_each_epoch_visits_every_chat_exactly_once(n):
    for seed in (0, 1):
        for epoch in (0, 1):
            assert sorted(shuffled_index(i, n, seed, epoch) for i in range(n)) == list(range(n))


def test_order_depends_on_seed_and_epoch_and_nothing_else():
    order = [shuffled_index(i, 500, 3, 0) for i in range(500)]
    assert order == [shuffled_index(i, 500, 3, 0) for i in range(500)]
    assert order != [shuffled_index(i, 500, 3, 1) for i in range(500)]
    assert order != [shuffled_index(i, 500, 4, 0) for i in range(500)]
    assert order != list(range(500))


def test_a_row_is_drawn_without_building_the_epoch_permutation():
    # a permutation of 10^15 chats could not be built; drawing rows of it must still work
    n = 10**15
    rows = [shuffled_index(pos, n, 0, 7) for pos in (0, 1, n - 1)]
    assert len(set(rows)) == 3 and all(0 <= r < n for r in rows)


def test_position_outside_the_data_is_refused():
    with pytest.raises(ValueError):
        shuffled_index(5, 5, 0, 0)


def _chats(lengths, seed=0):
    rng = np.random.default_rng(seed)
    chats = []
    for n in lengths:
        ids = rng.integers(5, 90, n + 1).astype(np.int32)
        labels = ids.copy()
        labels[: n // 2] = -100  # the prompt half carries no loss
        chats.append((ids, labels))
    return chats


def test_packed_rows_hold_every_chat_once_per_epoch_within_the_width():
    lengths = list(np.random.default_rng(1).integers(3, 60, 200))
    rows = PackedRows(lengths, 128, seed=5)
    stream = [rows.row(k) for k in range(400)]
    per_epoch, seen, epoch_ends = [], [], set()
    for k, row in enumerate(stream):
        assert sum(lengths[i] for i in row) <= 128
        seen += row
        if len(seen) >= len(lengths):
            assert len(seen) == len(lengths)  # an epoch ends at a row boundary
            per_epoch.append(seen)
            seen = []
            epoch_ends.add(k)
    assert len(per_epoch) >= 2 and all(sorted(e) == list(range(200)) for e in per_epoch)
    assert per_epoch[0] != per_epoch[1]
    assert [PackedRows(lengths, 128, seed=5).row(k) for k in (399, 0, 250)] == [stream[399], stream[0], stream[250]]
    # next fit: within an epoch a row is closed only when the following chat would not fit
    for k in range(len(stream) - 1):
        if k not in epoch_ends:
            assert sum(lengths[i] for i in stream[k]) + lengths[stream[k + 1][0]] > 128


def test_a_chat_longer_than_the_row_is_refused():
    with pytest.raises(ValueError):
        PackedRows([10, 300], 256, seed=0)


def test_a_packed_row_gives_each_chat_the_loss_it_gets_alone():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    for p in model.parameters():  # weights large enough that attention is far from uniform
        torch.nn.init.normal_(p, std=0.3)
    chats = _chats([17, 40, 9, 30, 25])
    padded = collate(chats, pad_id=0)
    packed = collate_packed([chats[:3], chats[3:]], pad_id=0)
    assert int(packed["mask"].sum()) == int(padded["mask"].sum()) == sum(len(ids) - 1 for ids, _ in chats)
    with torch.no_grad():
        alone = model(padded["x"], padded["y"])[1]
        together = model(packed["x"], packed["y"], doc_ids=packed["doc"])[1]
        leaking = model(packed["x"], packed["y"])[1]  # without the chat boundaries later chats see earlier ones
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert abs(float(leaking) - float(alone)) > 1e-3


def test_a_batch_packed_into_rows_keeps_every_chat_and_the_padded_loss():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    chats = _chats([60, 17, 40, 9, 30, 25, 64, 3])
    rows = pack_examples(chats, 64)
    assert sorted(id(c) for row in rows for c in row) == sorted(id(c) for c in chats)  # each chat exactly once
    assert all(sum(len(ids) - 1 for ids, _ in row) <= 64 for row in rows)
    assert [[len(ids) - 1 for ids, _ in row] for row in rows] == [[64], [60, 3], [40, 17], [30, 25, 9]]
    padded, packed = collate(chats, pad_id=0), collate_packed(rows, pad_id=0)
    assert packed["x"].numel() == 4 * 64 < padded["x"].numel() == 8 * 64
    with torch.no_grad():
        torch.testing.assert_close(model(packed["x"], packed["y"], doc_ids=packed["doc"])[1],
                                   model(padded["x"], padded["y"])[1], rtol=1e-5, atol=1e-5)
