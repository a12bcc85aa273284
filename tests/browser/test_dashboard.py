"""The web dashboard in a real browser (headless chromium through Playwright) against one
live `tunesmith serve` with the tiny model: sign-in, files, a job trained while the page
watches, closing the page mid-job, the playground's feedback, and organisations kept apart.

The tests of this module share one server and run in order: the job created by the UI in
one test is the one the later tests look at. Screenshots of each page go to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

if shutil.which("chromium") is None or importlib.util.find_spec("playwright") is None:
    pytest.skip("browser tests need chromium and playwright: `apt-get install chromium` and "
                "`pip install -e '.[dev]'` (.ci/run installs chromium)", allow_module_level=True)

from tests.browser.conftest import shot, sign_in
from tests.helpers import jsonl_bytes, review_rows, wait_status
from tunesmith.service import export_feedback, sqlite_url

FIRST_LOAD_BUDGET = 300 * 1024
BAD_FILE = jsonl_bytes(review_rows(3)) + b'{"messages": [{"role": "assitant", "content": "x"}]}\n'
ROWS = review_rows(72)
state: dict[str, str] = {}  # what a test made for the later ones (the job's id)


def test_first_load_sign_in_wrong_key_and_sign_out(open_page, dash, tmp_path: Path) -> None:
    page = open_page()
    sizes: list[int] = []
    page.on("response", lambda r: sizes.append(len(r.body())) if r.ok else None)
    page.goto(dash.url + "/")
    page.wait_for_load_state("networkidle")
    first_load = sum(sizes)
    assert 0 < first_load <= FIRST_LOAD_BUDGET, f"first load was {first_load} bytes"
    shot(page, tmp_path, "sign-in")

    page.get_by_label("API key").fill("sk-ts-not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    error = page.locator("#sign-in-error")
    error.get_by_text("Incorrect API key provided").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    shot(page, tmp_path, "wrong-key")

    sign_in(page, dash)
    key = dash.key("acme")
    assert key not in page.url
    assert page.evaluate("Object.values(sessionStorage)") == [key]
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_upload_shows_line_errors_then_files_upload_download_delete(open_page, dash,
                                                                    tmp_path: Path) -> None:
    page = open_page()
    sign_in(page, dash)
    page.get_by_role("link", name="Files").click()
    page.get_by_role("heading", name="Files", exact=True).wait_for()
    picker = page.get_by_label("Training data (JSONL)")
    picker.set_input_files({"name": "reviews.jsonl", "mimeType": "application/jsonl",
                            "buffer": BAD_FILE})
    page.get_by_role("button", name="Upload").click()
    problem = page.locator("#upload-error li").first
    problem.wait_for()
    assert "reviews.jsonl line 4: messages[0].role: unrecognized_role" in problem.inner_text()
    assert "1 problem(s)" in page.locator("#upload-error p").first.inner_text()
    shot(page, tmp_path, "upload-refused")

    # the training file by the picker, the validation file by drag and drop
    picker.set_input_files({"name": "train.jsonl", "mimeType": "application/jsonl",
                            "buffer": jsonl_bytes(ROWS[:64])})
    page.get_by_role("button", name="Upload").click()
    page.locator("#upload-result").get_by_text("Uploaded train.jsonl").wait_for()
    drop = page.evaluate_handle("""(text) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], "valid.jsonl", {type: "application/jsonl"}));
        return dt; }""", jsonl_bytes(ROWS[64:]).decode())
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
    page.locator("#upload-result").get_by_text("Uploaded valid.jsonl").wait_for()
    picker.set_input_files({"name": "extra.jsonl", "mimeType": "application/jsonl",
                            "buffer": jsonl_bytes(ROWS[:2])})
    page.get_by_role("button", name="Upload").click()
    page.get_by_role("button", name="Delete extra.jsonl").wait_for()
    shot(page, tmp_path, "files")

    with page.expect_download() as download:
        page.get_by_role("button", name="Download valid.jsonl").click()
    assert Path(download.value.path()).read_bytes() == jsonl_bytes(ROWS[64:])
    page.get_by_role("button", name="Delete extra.jsonl").click()
    page.get_by_role("button", name="Delete extra.jsonl").wait_for(state="detached")
    names = sorted(f.filename for f in dash.client("acme").files.list().data)
    assert names == ["train.jsonl", "valid.jsonl"]


def test_a_failed_job_shows_its_error(open_page, dash, tmp_path: Path) -> None:
    client = dash.client("acme")
    small = client.files.create(file=("small.jsonl", jsonl_bytes(ROWS[:2])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=small.id)
    wait_status(client, job.id, ("failed",), timeout=300)
    page = open_page()
    sign_in(page, dash)
    page.goto(f"{dash.url}/#/jobs/{job.id}")
    error = page.locator("#job-error")
    error.wait_for()
    assert "Failed: Training file has 2 example(s)" in error.inner_text()
    assert page.get_by_role("button", name="Cancel job").is_disabled()
    shot(page, tmp_path, "job-failed")
    client.files.delete(small.id)


def test_create_a_job_watch_its_chart_then_close_the_page_mid_job(open_page, dash,
                                                                  tmp_path: Path) -> None:
    client = dash.client("acme")
    files = {f.filename: f.id for f in client.files.list().data}
    page = open_page()
    sign_in(page, dash)
    page.get_by_role("navigation").get_by_role("link", name="New job").click()
    page.get_by_role("heading", name="New fine-tuning job").wait_for()
    page.get_by_label("Base model").select_option("tiny")
    page.get_by_label("Training file").select_option(files["train.jsonl"])
    page.get_by_label("Validation file").select_option(files["valid.jsonl"])
    # six epochs of 32 steps: long enough that the page (polling every 2 s) sees the chart grow
    # before the tiny model's job ends, on a fast machine too
    for name, value in (("n_epochs", "6"), ("batch_size", "2"),
                        ("learning_rate_multiplier", "10"), ("Suffix", "dash"), ("Seed", "7")):
        page.get_by_label(name, exact=True).fill(value)
    shot(page, tmp_path, "new-job")
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = state["job"] = page.url.split("#/jobs/")[1]
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert (job.model, job.suffix, job.seed, job.validation_file) == (
        "tiny", "dash", 7, files["valid.jsonl"])
    assert job.method.supervised.hyperparameters.n_epochs == 6

    # the chart gains points while the job runs (the page polls the events API)
    chart, seen, shown_at = page.locator("#loss-chart svg"), [], []
    deadline = time.monotonic() + 600
    while len(seen) < 2 and time.monotonic() < deadline:
        points = int(chart.get_attribute("data-train-points") or 0)
        if points and points not in seen:
            seen.append(points)
            shown_at.append(time.time())
        assert page.locator("#job-summary").get_attribute("data-status") != "succeeded", \
            f"the job ended before the chart was seen growing: {seen}"
        time.sleep(0.2)
    assert len(seen) == 2 and seen[0] < seen[1] <= 192, seen
    # each new point is on the chart within 5 s of its metrics event: the oldest event a
    # redraw added (step previous + 1) against the moment the redraw was seen (events carry
    # whole seconds, so 1 s is added for their rounding down)
    created = sorted((e.data["step"], e.created_at)  # every page (the client pages on)
                     for e in client.fine_tuning.jobs.list_events(job_id, limit=100)
                     if e.type == "metrics" and "train_loss" in (e.data or {}))
    for previous, points, at in zip([0, *seen], seen, shown_at, strict=False):
        assert at - created[previous][1] <= 5 + 1, (previous, points, at, created[previous])
    shot(page, tmp_path, "job-running")
    # pause and resume from the page: training stops at its checkpoint, then continues there
    page.get_by_role("button", name="Pause job").click()
    page.locator('#job-summary[data-status="paused"]').wait_for()
    assert page.get_by_role("button", name="Pause job").is_disabled()
    page.locator("#event-log").get_by_text("Job paused").wait_for()
    shot(page, tmp_path, "job-paused")
    page.get_by_role("button", name="Resume job").click()
    page.locator("#event-log").get_by_text("Resumed training from the checkpoint").wait_for(
        timeout=120_000)
    page.locator('#job-summary[data-status="running"]').wait_for()
    assert page.get_by_role("button", name="Resume job").is_disabled()
    # close the page mid-job (still running: training or its evaluation); nothing on the
    # server depends on the page, and the last test finds the job succeeded
    assert client.fine_tuning.jobs.retrieve(job_id).status == "running"
    page.close()

    # the controls, on a second job: it waits (validating_files) while the worker trains the
    # first, so it can be cancelled but not paused
    other = client.fine_tuning.jobs.create(model="tiny", training_file=files["train.jsonl"])
    page = open_page()
    sign_in(page, dash)
    page.goto(f"{dash.url}/#/jobs/{other.id}")
    page.locator('#job-summary[data-status="validating_files"]').wait_for()
    assert page.get_by_role("button", name="Pause job").is_disabled()
    assert page.get_by_role("button", name="Resume job").is_disabled()
    page.get_by_role("button", name="Cancel job").click()
    page.locator('#job-summary[data-status="cancelled"]').wait_for()
    assert page.get_by_role("button", name="Cancel job").is_disabled()
    assert client.fine_tuning.jobs.retrieve(other.id).status == "cancelled"

def test_the_form_sends_dpo_and_privacy_in_openais_shape(open_page, dash,
                                                         tmp_path: Path) -> None:
    """The request bodies only: each POST is captured and stopped before the server."""
    sent: list[dict] = []

    def capture(route) -> None:
        sent.append(json.loads(route.request.post_data))
        route.abort()

    page = open_page()
    sign_in(page, dash)
    page.route("**/v1/fine_tuning/jobs", capture)
    page.get_by_role("navigation").get_by_role("link", name="New job").click()
    page.get_by_role("heading", name="New fine-tuning job").wait_for()
    assert not page.get_by_label("beta", exact=True).is_visible()
    page.get_by_label("Method").select_option("dpo")
    assert not page.get_by_label("Train with DP-SGD").is_visible()  # DP-SGD: supervised only
    page.get_by_label("beta", exact=True).fill("0.2")
    shot(page, tmp_path, "new-job-dpo")
    page.get_by_role("button", name="Create job").click()
    page.locator("#job-form-error").wait_for()

    page.get_by_label("Method").select_option("supervised")
    page.get_by_label("Train with DP-SGD").check()
    page.get_by_role("button", name="Create job").click()  # no epsilon: refused on the page
    page.locator("#job-form-message").get_by_text("needs a target epsilon").wait_for()
    page.get_by_label("Target epsilon").fill("8")
    page.get_by_label("Clipping bound").fill("0.5")
    shot(page, tmp_path, "new-job-private")
    page.get_by_role("button", name="Create job").click()
    deadline = time.monotonic() + 30
    while len(sent) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    dpo, private = sent
    assert dpo["method"]["type"] == "dpo" and dpo["method"]["dpo"]["hyperparameters"][
        "beta"] == 0.2
    assert private["method"] == {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": "auto", "batch_size": "auto",
                            "learning_rate_multiplier": "auto"},
        "privacy": {"target_epsilon": 8, "delta": "auto", "max_grad_norm": 0.5}}}


def playground(open_page, dash, *, max_tokens: int):
    """A signed-in page on the playground, the two base models on its sides."""
    page = open_page()
    sign_in(page, dash)
    page.get_by_role("link", name="Playground").click()
    page.get_by_label("Model A", exact=True).select_option("tiny")
    page.get_by_label("Model B", exact=True).select_option("tiny-b")
    page.get_by_label("Max tokens").fill(str(max_tokens))
    return page


def test_playground_two_models_streamed_rated_and_corrected(open_page, dash,
                                                             tmp_path: Path) -> None:
    page = playground(open_page, dash, max_tokens=8)
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Your message").fill("Is this review good or bad? I love it")
    page.get_by_role("button", name="Send to both").click()
    answers = {side: page.locator(f'#transcript-{side} li.assistant[data-state="done"]')
               for side in "AB"}
    for answer in answers.values():
        answer.wait_for(timeout=300_000)
    ids = {side: a.get_attribute("data-completion") for side, a in answers.items()}
    assert all(i.startswith("chatcmpl-") for i in ids.values()) and ids["A"] != ids["B"]
    page.get_by_role("button", name="Good answer (A)").click()
    answers["A"].get_by_text("Rated good. Thank you.").wait_for()
    page.get_by_role("button", name="Bad answer (B)").click()
    answers["B"].get_by_text("Rated bad. Thank you.").wait_for()
    answers["B"].get_by_text("Correct this answer").click()
    page.get_by_label("Better answer (B)").fill("good")
    page.get_by_role("button", name="Send correction (B)").click()
    answers["B"].get_by_text("Correction saved. Thank you.").wait_for()
    shot(page, tmp_path, "playground")

    # the ratings and the correction are the next round's data (`tunesmith data from-feedback`)
    export = export_feedback(sqlite_url(dash.data_dir), org="acme", out_dir=tmp_path / "fb")
    chat = [json.loads(line) for line in export.chat_file.read_text().splitlines()]
    assert [r["messages"][-1] for r in chat] == [{"role": "assistant", "content": "good"}]
    assert chat[0]["messages"][-2]["content"] == "Is this review good or bad? I love it"
    from sqlalchemy import select

    from tunesmith.service import Store
    from tunesmith.service.tables import Feedback

    store = Store(sqlite_url(dash.data_dir))
    with store.begin() as s:
        stored = {(f.completion_id, f.rating, f.correction) for f in s.scalars(select(Feedback))}
    store.close()
    assert stored == {(ids["A"], "good", None), (ids["B"], "bad", None), (ids["B"], None, "good")}


def test_playground_holds_answers_to_a_schema_and_shows_token_probabilities(open_page, dash,
                                                                            tmp_path: Path
                                                                            ) -> None:
    page = playground(open_page, dash, max_tokens=24)
    # a schema that is not JSON is refused in the page, and nothing is sent
    page.get_by_label("Hold answers to a JSON schema").fill('{"type": "object",')
    page.get_by_label("Your message").fill("Is this review good or bad? I love it")
    page.get_by_role("button", name="Send to both").click()
    page.locator("#schema-error").get_by_text("The JSON schema is not JSON").wait_for()
    assert page.locator("#transcript-A li").count() == 0
    schema = {"type": "object", "properties": {"verdict": {"enum": ["good", "bad"]}},
              "required": ["verdict"], "additionalProperties": False}
    page.get_by_label("Hold answers to a JSON schema").fill(json.dumps(schema))
    page.get_by_label("Show token probabilities").check()
    page.get_by_role("button", name="Send to both").click()
    for side in "AB":
        answer = page.locator(f'#transcript-{side} li.assistant[data-state="done"]')
        answer.wait_for(timeout=300_000)
        text = answer.locator("p.answer").inner_text()
        assert json.loads(text)["verdict"] in ("good", "bad")  # the random model, held to it
        answer.get_by_text(f"Token probabilities ({side})").click()
        cells = answer.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert cells and all(c.endswith("%") and 0 <= float(c[:-1]) <= 100 for c in cells)
    assert page.locator("#schema-error").count() == 0
    shot(page, tmp_path, "playground-schema")


def tab_to(page, name: str, limit: int = 300) -> None:
    """Press Tab until the focused control's label, text or accessible name is ``name``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate("""() => {
            const el = document.activeElement;
            const label = el.labels && el.labels[0] ? el.labels[0].innerText : "";
            return [el.getAttribute("aria-label") || "", label, el.innerText || ""]
                .map((t) => t.trim());
        }""")
        if name in focused:
            return
    raise AssertionError(f"Tab never reached {name!r}")


def test_the_keyboard_alone_reaches_views_sends_and_rates(open_page, dash,
                                                         tmp_path: Path) -> None:
    page = open_page()
    sign_in(page, dash)  # the key field has focus; type and Enter
    for link, heading in (("Files", "Files"), ("Models", "Models"), ("Playground", "Playground")):
        tab_to(page, link)
        page.keyboard.press("Enter")
        page.get_by_role("heading", name=heading, exact=True).wait_for()
    model_a = page.get_by_label("Model A", exact=True)
    model_a.locator("option[value='tiny-b']").wait_for(state="attached")  # the list is loaded
    tab_to(page, "Model A")
    page.keyboard.type("tiny-b")  # a focused list jumps to the option typed
    assert model_a.input_value() == "tiny-b"
    tab_to(page, "Max tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("4")
    tab_to(page, "Your message")
    page.keyboard.type("Is this review good or bad? Fine")
    tab_to(page, "Send to both")
    page.keyboard.press("Enter")
    done = page.locator('#transcript-A li.assistant[data-state="done"]')
    done.wait_for(timeout=300_000)
    tab_to(page, "Good answer (A)")
    page.keyboard.press("Enter")
    done.get_by_text("Rated good. Thank you.").wait_for()
    shot(page, tmp_path, "keyboard")


def test_another_org_sees_none_of_the_first_orgs_jobs_or_files(open_page, dash,
                                                               tmp_path: Path) -> None:
    page = open_page()
    sign_in(page, dash, "globex")
    page.get_by_text("No jobs yet.").wait_for()
    assert page.locator("[data-job]").count() == 0
    page.get_by_role("link", name="Files").click()
    page.get_by_text("No files yet.").wait_for()
    page.goto(f"{dash.url}/#/jobs/{state['job']}")
    page.get_by_text(f"No such fine_tuning_job: '{state['job']}'").wait_for()
    shot(page, tmp_path, "other-org")


def test_the_job_succeeded_without_its_page_and_shows_everything(open_page, dash,
                                                                  tmp_path: Path) -> None:
    client = dash.client("acme")
    job = wait_status(client, state["job"], ("succeeded",), timeout=600)
    page = open_page()
    sign_in(page, dash)
    row = page.locator(f'tr[data-job="{job.id}"]')
    assert "succeeded" in row.inner_text() and job.fine_tuned_model in row.inner_text()
    shot(page, tmp_path, "jobs")
    row.get_by_role("link").click()
    page.locator('#job-summary[data-status="succeeded"]').wait_for()
    chart = page.locator("#loss-chart svg")
    assert (chart.get_attribute("data-train-points"), chart.get_attribute("data-valid-points")
            ) == ("192", "6")
    page.locator("#checkpoints tbody tr").nth(2).wait_for()
    assert page.locator("#checkpoints tbody tr").count() == 3
    page.locator("#event-log").get_by_text("The job has successfully completed").wait_for()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download step metrics (CSV)").click()
    assert Path(download.value.path()).read_text().startswith("step,")
    with page.expect_download() as download:  # the run's own evaluation report
        page.get_by_role("button", name="Download the run's report (HTML)").click()
    assert download.value.suggested_filename == "report.html"
    assert "<html" in Path(download.value.path()).read_text(encoding="utf-8").lower()
    # and shown inside the page, with the report's own stylesheet, no script running in it
    page.get_by_role("button", name="Show the run's report").click()
    page.locator('iframe.report[data-state="shown"]').wait_for()
    assert page.frame_locator("iframe.report").locator("h1").first.inner_text().strip()
    shown = page.evaluate("""() => {
        const frame = document.querySelector("iframe.report");
        return [frame.getAttribute("sandbox"), frame.contentDocument.adoptedStyleSheets.length,
                getComputedStyle(frame.contentDocument.body).maxWidth];
    }""")
    assert shown == ["allow-same-origin", 1, "1120px"], shown  # body { max-width: 70rem }
    shot(page, tmp_path, "job-succeeded")
    # a checkpoint opens in the playground, beside a base model, and answers there
    checkpoint = page.locator("#checkpoints tbody tr").first.locator("code").inner_text()
    page.locator("#checkpoints tbody tr").first.get_by_role("link").click()
    page.get_by_role("heading", name="Playground").wait_for()
    assert page.get_by_label("Model A", exact=True).input_value() == checkpoint
    page.get_by_label("Max tokens").fill("4")
    page.get_by_label("Your message").fill("Is this review good or bad? Fine")
    page.get_by_role("button", name="Send to both").click()
    done = page.locator('#transcript-A li.assistant[data-state="done"]')
    done.wait_for()
    assert checkpoint in done.inner_text()
    page.go_back()
    page.locator('#job-summary[data-status="succeeded"]').wait_for()
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing sticks out
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, tmp_path, "job-narrow")
    page.set_viewport_size({"width": 1280, "height": 800})

    page.get_by_role("link", name="Models").click()
    delete = page.get_by_role("button", name=f"Delete {job.fine_tuned_model}")
    delete.click()
    delete.wait_for(state="detached")
    page.get_by_text("No fine-tuned models yet.").wait_for()
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-b"]
    shot(page, tmp_path, "models")
