"""SFT's row order: every chat once per epoch, a new order each epoch, each row drawn in O(1)."""

import pytest

from xiaolm.train.sft import shuffled_index


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
