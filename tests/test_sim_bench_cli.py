"""`python -m simulator.bench`: its result file is written whole or not at all, bad flags exit 2."""

from __future__ import annotations

import json

import pytest

import simulator.bench as sb


@pytest.fixture
def small_grid(monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setattr(sb, "SWEEP_GRID", {"top_k": [2, 4], "depth": [2], "total_tokens": [4], "draft_layers": [1]})


def test_writes_the_result(tmp_path, small_grid, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "a" / "sim_bench.json"
    assert sb.main(["--out", str(out), "--cycles", "200", "--repeats", "1"]) == 0
    d = json.loads(out.read_text())
    assert d["sweep"]["configurations"] == 2 and set(d["cycles_per_s"]) == {"dovetail", "dovetail-pipelined", "eagle2"}
    assert "cycles/s" in capsys.readouterr().out


def test_unwritable_out_keeps_nothing_half_written(tmp_path, small_grid, capsys) -> None:  # noqa: ANN001
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert sb.main(["--out", str(blocker / "sim_bench.json"), "--cycles", "200", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write") and blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("flag", ["--cycles", "--repeats"])
def test_non_positive_counts_exit_2(flag) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        sb.main([flag, "0"])
    assert e.value.code == 2
