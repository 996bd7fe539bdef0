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


def test_sweep_progress_counts_done_stopped_and_running_trials(capsys):
    from types import SimpleNamespace as T

    from bundlerec.progress import sweep_progress_callback

    cb = sweep_progress_callback(num_samples=4, epochs=3)
    done = T(trial_id="a", status="TERMINATED", last_result={"epoch": 3})
    pruned = T(trial_id="b", status="TERMINATED", last_result={"epoch": 1})  # ASHA stopped it
    running = T(trial_id="c", status="RUNNING", last_result={"epoch": 1})
    cb.on_trial_complete(0, [done, running], done)
    cb.on_trial_complete(1, [done, pruned, running], pruned)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[bundlerec] sweep: 1/4 trials ended (1 done, 0 stopped early, 0 errored), 1 running")
    assert "2/4 trials ended (1 done, 1 stopped early, 0 errored), 1 running" in lines[1] and "eta" in lines[1]
