"""The run plots are drawn from log.jsonl alone."""

from __future__ import annotations

import json

import pytest

from sparseek.train.plots import plot_run


@pytest.mark.parametrize("indexer", [False, True])
def test_plot_run_writes_pngs(tmp_path, indexer):
    recs = []
    for step in range(1, 9):
        r = {"step": step, "loss": 5.0 / step, "mtp_loss": 5.2 / step, "max_vio": 1.0 / step, "mean_vio": 0.5 / step,
             "indexer_loss": 0.3 / step if indexer else None}
        if step % 4 == 0:
            r.update(val_loss=4.0 / step, val_ppl=2.0, unigram_ppl=800.0)
        if step % 2 == 0:
            r["expert_load"] = [[0.25, 0.25, 0.4, 0.1], [0.1, 0.2, 0.3, 0.4]]
        recs.append(r)
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    written = plot_run(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["expert_load.png", "loss.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    width = matplotlib.image.imread(written[0]).shape[1]
    assert width == (16 if indexer else 11) * 110  # a third panel for the indexer loss


def test_plot_run_of_an_empty_log(tmp_path):
    (tmp_path / "log.jsonl").write_text("")
    assert plot_run(str(tmp_path)) == []
