"""ConditionCache: each dataset row embedded once, whole batches embedded while any row is new."""

import torch

from vigface.diffusion.condition_cache import MAX_TABLE_BYTES, ConditionCache


class CountingEmbed:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images):  # a row's "embedding" is its own value, so rows are checkable
        self.calls.append(len(images))
        return images[:, :3] * 2.0


def test_rows_are_embedded_until_cached_then_read_back():
    cache, embed = ConditionCache(6, 3, torch.device("cpu")), CountingEmbed()
    images = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    first = torch.tensor([4, 1, 2])
    assert torch.equal(cache.lookup(first, images[first], embed), images[first, :3] * 2)
    # one new row (0) beside cached ones: the whole batch is embedded, as without a cache
    mixed = torch.tensor([1, 0, 4])
    assert torch.equal(cache.lookup(mixed, images[mixed], embed), images[mixed, :3] * 2)
    assert embed.calls == [3, 3]
    # all cached: no embedding; the images passed are not even looked at
    again = torch.tensor([0, 2, 4, 1])
    assert torch.equal(cache.lookup(again, torch.full((4, 4), float("nan")), embed), images[again, :3] * 2)
    assert embed.calls == [3, 3]
    assert cache.filled.tolist() == [True, True, True, False, True, False]


def test_new_rows_keep_the_value_their_first_batch_gave():
    # a batch whose embeddings differ from the stored ones (e.g. other numerics) only fills new rows
    cache = ConditionCache(4, 2, torch.device("cpu"))
    cache.lookup(torch.tensor([0, 1]), torch.ones(2, 2), lambda x: x)
    out = cache.lookup(torch.tensor([1, 2]), torch.full((2, 2), 5.0), lambda x: x)
    assert torch.equal(out, torch.full((2, 2), 5.0))  # this batch's own embeddings are returned
    assert cache.table[:3].tolist() == [[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]]


def test_size_limit():
    rows = MAX_TABLE_BYTES // (512 * 4)
    assert ConditionCache.fits(rows, 512) and not ConditionCache.fits(rows + 1, 512)
    assert ConditionCache.fits(494_414, 512) and not ConditionCache.fits(5_822_653, 512)  # CASIA, MS1M
