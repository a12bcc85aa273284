from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.training.batches import (
    PAD_MULTIPLE,
    PoissonBatches,
    ShuffledBatches,
    collate,
    local_share,
    micro_batches,
)
from tunesmith.training.objectives import encoded_passes


def test_length_grouped_batches_pad_little():
    data = [Encoded([1] * n, [1] * n) for n in range(1, 401)]
    grouped = list(ShuffledBatches(data, batch_size=8, seed=0, group_by_length=True).epoch(0))
    shuffled = list(ShuffledBatches(data, batch_size=8, seed=0).epoch(0))

    def padding(batches):
        return sum(max(map(len, b)) * len(b) - sum(map(len, b)) for b in batches)

    assert sorted(len(e) for b in grouped for e in b) == list(range(1, 401))  # all, once
    assert padding(grouped) < padding(shuffled) / 5


def test_an_epoch_resumes_at_any_step_with_the_same_batches():
    data = list(range(81))
    source = ShuffledBatches(data, batch_size=8, seed=3)
    whole = list(source.epoch(2))
    assert len(whole) == source.steps_per_epoch() == 11 and len(whole[-1]) == 1
    assert list(source.epoch(2, start_step=7)) == whole[7:]
    assert list(source.epoch(3)) != whole


def test_poisson_batches_sample_each_example_independently():
    data = list(range(1000))
    source = PoissonBatches(data, expected_batch_size=50, seed=0)
    batches = list(source.epoch(0))
    assert len(batches) == source.steps_per_epoch() == 20
    sizes = [len(b) for b in batches]
    assert len(set(sizes)) > 1  # sizes vary, as Poisson sampling does
    assert 35 < sum(sizes) / len(sizes) < 65
    assert list(source.epoch(0, start_step=5)) == batches[5:]  # resumable
    assert all(len(set(b)) == len(b) for b in batches)


def test_a_small_last_batch_leaves_a_process_an_empty_share():
    batch = [1]
    assert local_share(batch, rank=0, world_size=2) == [1]
    assert local_share(batch, rank=1, world_size=2) == []
    assert micro_batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_collate_pads_to_a_multiple_and_masks_the_padding():
    rows = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8] * 17, [8] * 17)]
    plain = collate(rows, pad_id=0)
    padded = collate(rows, pad_id=0, multiple=16)
    assert plain["input_ids"].shape == (2, 17) and padded["input_ids"].shape == (2, 32)
    for key in ("input_ids", "attention_mask", "labels"):
        assert padded[key][:, :17].equal(plain[key])  # the same rows, then only padding
    assert (padded["input_ids"][:, 17:] == 0).all()
    assert (padded["attention_mask"][:, 17:] == 0).all()
    assert (padded["labels"][:, 17:] == IGNORE_INDEX).all()
    assert collate([Encoded([1] * 16, [1] * 16)], pad_id=0, multiple=16)["input_ids"].shape \
        == (1, 16)  # a width already a multiple stays


def test_unpacked_training_rows_take_few_widths():
    # every width is a new set of matrix shapes for oneDNN and the allocator to keep
    widths = {encoded_passes([Encoded([1] * n, [1] * n)], pad_id=0, packing=False,
                             pack_capacity=256)[0]["input_ids"].shape[1] for n in range(1, 257)}
    assert widths == set(range(PAD_MULTIPLE, 257, PAD_MULTIPLE))
