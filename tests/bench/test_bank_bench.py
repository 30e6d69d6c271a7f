"""The bank cache benchmark in tiny form: its resident / copy cases do what they say."""

from benchmarks import bank_bench


def test_bank_bench_copies_only_in_the_copy_case(tmp_path):
    a = bank_bench.parse(
        ["--adapters", "4", "--capacity", "2", "--batch", "4", "--seq", "8", "--repeats", "2"]
    )
    body = bank_bench.run(a)
    # fill (2) + second group (2) + one group per copy step (2 × 2); resident steps all hit.
    assert body["cache"]["misses"] == 8 and body["cache"]["hits"] == 4
    assert body["cache"]["evictions"] == 6 and body["cache"]["stale_reloads"] == 0
    assert len(body["copy_s"]) == len(body["resident_s"]) == 2 and body["h2d_GBps_median"] > 0
    assert body["bytes_per_adapter"] > 0
