"""A job paused mid-training keeps the metrics of the last step it trained: that step is in the
checkpoint the loop writes as it stops, and the resumed job continues after it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.helpers import queued_job, start_job
from tunesmith.service.jobs import pause_job
from tunesmith.service.reporter import JobReporter
from tunesmith.service.tables import JobEvent
from tunesmith.training.callbacks import Control


def test_the_step_a_paused_job_stops_at_keeps_its_metrics(tmp_path: Path, tiny_model_dir: Path,
                                                          test_home: Path) -> None:
    _, store, job_id = queued_job(tmp_path / "svc", tiny_model_dir, test_home)
    start_job(store, job_id, "w1")
    reporter = JobReporter(store, job_id, "w1", checkpoint_dir=tmp_path / "ckpt",
                           output_model="ft:tiny:acme::x")
    loop = SimpleNamespace(state=SimpleNamespace(step=0, tokens_seen=0), total_steps=10,
                           control=Control())
    reporter.on_train_begin(loop)
    for step in (1, 2):
        loop.state.step = step
        reporter.on_step(loop, {"train_loss": 1.0 / step})
    pause_job(store, "acme", job_id)  # the user pauses while step 3 trains
    loop.state.step = 3
    reporter.last_progress = 0.0  # the progress check is due
    reporter.on_step(loop, {"train_loss": 0.3})
    assert reporter.superseded and loop.control.should_stop
    reporter.on_train_end(loop)  # the loop wrote its step-3 checkpoint and returned
    with store.begin() as s:
        steps = [json.loads(e.data)["step"] if isinstance(e.data, str) else e.data["step"]
                 for e in s.query(JobEvent).filter(JobEvent.job_id == job_id,
                                                   JobEvent.type == "metrics")]
    assert steps == [1, 2, 3]
