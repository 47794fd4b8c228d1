"""benchmarks/kernel_timeline.py's reading of the phase stamps (the lines the tile CTAs of a
JPA_TIMELINE build print), on made-up lines with known phases: the clock rate, each phase,
the SMs' idle time (between CTAs, overlapping CTAs of one SM, a launch's tail) and the
tile-loop fit come out as built in."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import kernel_timeline as T  # noqa: E402


def _line(smid, z, ntiles, ns0, ns1, clks):
    return " ".join(str(v) for v in ["jpa-tl", smid, 0, 0, z, ntiles, ns0, ns1, *clks])


def _two_ctas_per_sm():
    # SM clock 2 cycles / ns. Per CTA (us): Q 1, tile 0 wait 1 or 0.5, loop 3 + 0.75 * tiles,
    # epilogue 2 or 1.5; on each SM the second CTA starts 1 us (SM 0) / 3 us (SM 7) after the
    # first one ends.
    lines = []
    for smid, gap in ((0, 1000), (7, 3000)):
        # 4 tiles: 1 + 1 + 6 + 2 = 10 us; 2 tiles: 1 + 0.5 + 4.5 + 1.5 = 7.5 us
        lines.append(_line(smid, 0, 4, 0, 10000, [0, 2000, 4000, 16000, 20000]))
        s = 10000 + gap
        lines.append(_line(smid, 1, 2, s, s + 7500, [0, 2000, 3000, 12000, 15000]))
    return "noise\n" + "\n".join(lines) + "\njpa-tl-done\n"


def test_parse_keeps_only_the_stamp_lines():
    rows = T.parse(_two_ctas_per_sm())
    assert rows.shape == (4, 12)
    assert rows[1].tolist()[:5] == [0, 0, 0, 1, 2]


def test_phases_gaps_and_the_loop_fit_come_out_as_built():
    a = T.analyse(T.parse(_two_ctas_per_sm()))
    assert a["ctas"] == 4 and a["sms"] == 2
    assert a["ghz"] == pytest.approx(2.0)
    ph = a["phases"]
    assert ph["start -> Q staged"]["median"] == pytest.approx(1.0)
    assert ph["Q staged -> tile 0 landed"]["median"] == pytest.approx(0.75)
    assert ph["tile loop"]["sum"] == pytest.approx(2 * (6.0 + 4.5))
    assert ph["epilogue"]["median"] == pytest.approx(1.75)
    assert ph["whole CTA"]["sum"] == pytest.approx(2 * (10.0 + 7.5))
    assert a["gap"]["median"] == pytest.approx(2.0)  # 1 us and 3 us
    # span: SM 7 ends last at 10 + 3 + 7.5 = 20.5 us; two SMs
    assert a["span_us"] == pytest.approx(20.5)
    assert a["share"]["whole CTA"] == pytest.approx(35.0 / (2 * 20.5))
    assert a["gap"]["share"] == pytest.approx(4.0 / (2 * 20.5))
    # SM 0 ends at 18.5 us, 2 us before SM 7: the launch's tail
    assert a["edge_share"] == pytest.approx(2.0 / (2 * 20.5))
    assert a["loop_fit"]["per_tile_us"] == pytest.approx(0.75)
    assert a["loop_fit"]["fixed_us"] == pytest.approx(3.0)


def test_a_cta_without_key_tiles_is_left_out_of_the_tile_phases():
    text = _two_ctas_per_sm() + _line(3, 2, 0, 0, 2000, [0, 2000, 0, 3000, 4000]) + "\n"
    a = T.analyse(T.parse(text))
    assert a["ctas"] == 5
    assert a["phases"]["Q staged -> tile 0 landed"]["median"] == pytest.approx(0.75)
    assert a["phases"]["start -> Q staged"]["sum"] == pytest.approx(5.0)
    assert np.isfinite(a["loop_fit"]["per_tile_us"])
    assert "tile loop" in T.markdown("p", a)


def test_overlapping_ctas_of_one_sm_are_not_idle_time():
    # two CTAs at once on SM 0 (0-10 us and 2-12 us), then one at 13-15 us: one 1 us gap
    text = "\n".join([_line(0, 0, 4, 0, 10000, [0, 2000, 4000, 16000, 20000]),
                      _line(0, 1, 4, 2000, 12000, [0, 2000, 4000, 16000, 20000]),
                      _line(0, 2, 2, 13000, 15000, [0, 1000, 1500, 3000, 4000])])
    a = T.analyse(T.parse(text))
    assert a["gap"]["median"] == pytest.approx(1.0)
    assert a["gap"]["share"] == pytest.approx(1.0 / 15.0)
    assert a["edge_share"] == pytest.approx(0.0)
