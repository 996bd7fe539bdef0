"""Progress lines of long loops: throttled, with counts, rate and ETA."""

from bundlerec.progress import Progress


def test_progress_lines_are_throttled_and_end_with_a_summary(capsys):
    p = Progress("eval model", total=100, unit="baskets", every_s=3600)
    for _ in range(10):
        p.update(10)
    p.done()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[bundlerec] eval model: 100/100 baskets (100 %)")
    assert lines[0].endswith("(done)")

    p = Progress("encode", total=40, unit="items", every_s=0)
    p.update(10)
    out = capsys.readouterr().out
    assert "10/40 items (25 %)" in out and "eta " in out
    Progress("quiet", total=5, enabled=False).done()
    assert capsys.readouterr().out == ""
