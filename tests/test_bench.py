"""Tests for mmlit.bench (notebook nbs/12_bench.ipynb): the tiling benchmark's checks, never its timings."""
import pytest

from mmlit.bench import RESIZES, BenchResult, bench_images, bench_tiling, hf_internvl, hf_internvl_processor, mmlit_internvl, timeit

SIZES = [(448, 448), (500, 400), (1280, 720), (300, 900)]


def test_timeit_refuses_no_repeats():
    with pytest.raises(ValueError, match='repeats'):
        timeit(lambda: None, repeats=0)


def test_mmlit_internvl_matches_transformers_pil_processor():
    "Same tiles per image and the same pixels (float rounding only) as transformers' Pillow InternVL processor."
    images = bench_images(SIZES)
    theirs, n_theirs = hf_internvl(hf_internvl_processor(fast=False), images)
    for threads in (1, 2):
        ours, n_ours = mmlit_internvl(images, num_threads=threads)
        assert n_ours == n_theirs == [1, 13, 9, 4]
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5


def test_bench_tiling_reports_both_clocks():
    r = bench_tiling(repeats=1, sizes=SIZES[:2], fast=False, num_threads=2)
    assert set(r.images_per_s) == set(r.images_per_cpu_s) == {'mmlit', 'transformers (slow)', RESIZES}
    assert r.same_tiles == {'transformers (slow)': True}
    assert r.max_abs_diff['transformers (slow)'] <= 1e-5
    assert all(v > 0 for v in [*r.images_per_s.values(), *r.images_per_cpu_s.values()])
    assert len(r.load_avg) == 2
    text = str(r)
    assert 'per CPU s' in text and 'same tiles: True' in text and '2 threads' in text and 'bound per CPU s' in text


def test_bench_result_ratio():
    r = BenchResult('x', images_per_s={'mmlit': 6.0, 'p': 2.0}, images_per_cpu_s={'mmlit': 4.0, 'p': 2.0})
    assert r.ratio('p') == 3.0 and r.ratio('p', cpu=True) == 2.0
