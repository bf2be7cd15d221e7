"""Circuit pictures (graphviz and the matplotlib fallback) and the sweep plot."""

import shutil

import pytest

from edgeprune_fast.draw import circuit_layout, draw_circuit, plot_sweep
from edgeprune_fast.graph import Edge

EDGES = [Edge("embeds", "a0.h1.v"), Edge("embeds", "a1.h0.k"), Edge("a0.h1", "a1.h0.q"), Edge("a0.h1", "m0"),
         Edge("m0", "m1"), Edge("a1.h0", "resid_post"), Edge("m1", "resid_post"), Edge("embeds", "a1.g0.v")]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot binary is not installed")


def test_layout_rows_and_kinds():
    rows, drawn = circuit_layout(EDGES)
    assert rows == [["embeds"], ["a0.h1"], ["m0"], ["a1.h0", "a1.g0"], ["m1"], ["resid_post"]]
    assert ("embeds", "a1.h0", "k") in drawn and ("a0.h1", "a1.h0", "q") in drawn and ("a0.h1", "m0", "other") in drawn
    with pytest.raises(ValueError, match="not a node name"):
        circuit_layout([("embeds", "x9")])


@needs_dot
def test_graphviz_svg_png_pdf(tmp_path):
    assert draw_circuit(EDGES, tmp_path / "c.svg", title="t") == "graphviz"
    svg = (tmp_path / "c.svg").read_text()
    for name in ("embeds", "a0.h1", "a1.h0", "m0", "m1", "resid_post"):
        assert f">{name}<" in svg
    assert "a0.h0" not in svg and "a1.h1" not in svg  # components without edges are left out
    for colour in ("#1f77b4", "#2ca02c", "#d62728"):  # q, k, v edges
        assert colour in svg
    assert 'stroke-dasharray="5,2"' in svg  # k dashed
    draw_circuit(EDGES, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    draw_circuit(EDGES, tmp_path / "c.pdf")
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"


def test_matplotlib_fallback_without_dot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on PATH
    assert draw_circuit(EDGES, tmp_path / "c.png") == "matplotlib"
    assert "dot` binary is not installed" in capsys.readouterr().err
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_circuit(EDGES, tmp_path / "c.svg", engine="matplotlib") == "matplotlib"
    assert "<svg" in (tmp_path / "c.svg").read_text()
    with pytest.raises(ValueError, match="dot"):
        draw_circuit(EDGES, tmp_path / "d.png", engine="graphviz")


def test_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"out: expected a file name ending in \.svg, \.png, \.pdf"):
        draw_circuit(EDGES, tmp_path / "c.jpg")
    with pytest.raises(ValueError, match="out"):
        plot_sweep([{"sparsity": 0.5, "kl": 1.0}], tmp_path / "s.txt")


def test_plot_sweep(tmp_path):
    rows = [{"sparsity": s, "kl": k, "metric_circuit": m, "metric_full": 1.0, "metric_empty": 0.1}
            for s, k, m in [(0.9, 0.01, 0.95), (0.99, 0.3, 0.7), (0.95, 0.05, 0.9)]]
    p = plot_sweep(rows, tmp_path / "sweep.png", title="sweep")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_sweep([{"sparsity": 0.5, "kl": 0.0}], tmp_path / "kl_only.svg")
    with pytest.raises(ValueError, match="'sparsity' and 'kl'"):
        plot_sweep([{"kl": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        plot_sweep([], tmp_path / "x.png")
