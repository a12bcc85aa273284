// The jobs list and one job's page: status, loss chart, events, checkpoints, controls.

import { api, download, newEvents } from "./api.js";
import { legend, lossChart, lossSeries } from "./chart.js";
import { announce, badge, errorBox, h, heading, table, time } from "./ui.js";

const FINAL = ["succeeded", "failed", "cancelled"];
const jobPath = (id) => `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;

export async function jobsPage(view) {
  const body = h("div", { id: "jobs-table" });
  view.append(heading("Fine-tuning jobs"),
    h("p", {}, h("a", { href: "#/new-job", class: "button" }, "New job")), body);

  async function refresh() {
    const list = await api("/v1/fine_tuning/jobs?limit=100");
    const rows = list.data.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
      h("td", {}, badge(job.status)),
      h("td", {}, job.model),
      h("td", {}, job.fine_tuned_model ?? ""),
      h("td", {}, time(job.created_at)),
      h("td", {}, time(job.finished_at))));
    body.replaceChildren(table("Fine-tuning jobs, newest first",
      ["Job", "Status", "Base model", "Fine-tuned model", "Created", "Finished"], rows,
      "No jobs yet. Upload a training file, then create a job."));
  }
  await refresh();
  return { refresh };
}

function field(name, value) {
  return [h("dt", {}, name), h("dd", {}, value ?? h("span", { class: "muted" }, "—"))];
}

function hyperparameters(job) {
  const method = job.method?.type ?? "supervised";
  const hp = job.method?.[method]?.hyperparameters ?? job.hyperparameters ?? {};
  return `${method}: ` + Object.entries(hp)
    .filter(([, v]) => typeof v !== "object")
    .map(([k, v]) => `${k}=${v}`).join(", ");
}

export async function jobPage(view, jobId) {
  const events = new Map();
  let ordered = [];  // newest first, the API's order
  const title = heading(`Job ${jobId}`);
  const summary = h("dl", { class: "summary", id: "job-summary" });
  const controls = h("div", { class: "controls", role: "group", "aria-label": "Job controls" });
  const message = h("div", { id: "job-message" });
  const chartBox = h("figure", { id: "loss-chart" });
  const checkpoints = h("div", { id: "checkpoints" });
  const log = h("div", { id: "event-log" });
  const reportBox = h("section", { id: "report" });
  view.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")), title, summary, message,
    controls, h("h2", {}, "Loss"), chartBox, h("h2", {}, "Checkpoints"), checkpoints,
    h("h2", {}, "Events"), log, reportBox);

  let job = null;
  let checkpointsLoaded = false;

  async function act(verb) {
    message.replaceChildren();
    try {
      job = await api(`${jobPath(jobId)}/${verb}`, { method: "POST" });
      announce(`Job ${job.status}`);
      await refresh();
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  }

  // result file id -> its file object (filename), fetched once per file
  const resultFiles = new Map();
  function resultButton(id) {
    const file = resultFiles.get(id);
    if (!file) {
      resultFiles.set(id, { filename: id });
      api(`/v1/files/${encodeURIComponent(id)}`)
        .then((f) => { resultFiles.set(id, f); renderJob(); })
        .catch((err) => message.replaceChildren(errorBox(err)));
    }
    const name = resultFiles.get(id).filename;
    const label = name === "report.html" ? "Download the run's report (HTML)"
      : name === "step_metrics.csv" ? "Download step metrics (CSV)" : `Download ${name}`;
    const get = h("button", {
      type: "button", class: "link", "data-file": name,
      onclick: () => download(`/v1/files/${encodeURIComponent(id)}/content`, name)
        .catch((err) => message.replaceChildren(errorBox(err))),
    }, label);
    if (name !== "report.html") return get;
    const show = h("button", {
      type: "button", class: "link", onclick: () => showReport(id)
        .catch((err) => message.replaceChildren(errorBox(err))),
    }, "Show the run's report");
    return h("span", {}, show, " · ", get);
  }

  // The report inside the page: a sandboxed frame (no scripts run in it) holding the HTML the
  // files API returned. The frame shares this page's content security policy, which refuses
  // inline <style>, so its stylesheet is handed to the frame's document as a constructed one.
  async function showReport(id) {
    const resp = await api(`/v1/files/${encodeURIComponent(id)}/content`, { raw: true });
    const frame = h("iframe", { sandbox: "allow-same-origin", title: "The run's report",
      class: "report" });
    frame.srcdoc = await resp.text();
    frame.addEventListener("load", () => {
      const doc = frame.contentDocument;
      const sheet = new frame.contentWindow.CSSStyleSheet();
      sheet.replaceSync([...doc.querySelectorAll("style")].map((s) => s.textContent).join("\n"));
      doc.adoptedStyleSheets = [sheet];
      frame.style.height = `${doc.documentElement.scrollHeight + 24}px`;
      frame.dataset.state = "shown";
    });
    reportBox.replaceChildren(h("h2", {}, "Report"), frame);
    frame.scrollIntoView();
  }

  function renderJob() {
    const results = job.result_files?.length
      ? h("span", {}, job.result_files.map(resultButton))
      : null;
    summary.replaceChildren(
      ...field("Status", badge(job.status)),
      ...field("Base model", job.model),
      ...field("Fine-tuned model", job.fine_tuned_model),
      ...field("Method", hyperparameters(job)),
      ...field("Training file", job.training_file),
      ...field("Validation file", job.validation_file),
      ...field("Seed", String(job.seed)),
      ...field("Created", time(job.created_at)),
      ...field("Finished", job.finished_at ? time(job.finished_at) : null),
      ...field("Estimated finish", job.estimated_finish ? time(job.estimated_finish) : null),
      ...field("Trained tokens", job.trained_tokens == null ? null : String(job.trained_tokens)),
      ...field("Results", results));
    summary.dataset.status = job.status;
    const error = job.status === "failed" && job.error
      ? errorBox({ message: `Failed: ${job.error.message}` }, "job-error") : null;
    if (error) message.replaceChildren(error);
    const can = {
      Pause: ["queued", "running"], Resume: ["paused"],
      Cancel: ["validating_files", "queued", "running", "paused"],
    };
    controls.replaceChildren(...Object.entries(can).map(([verb, from]) => h("button", {
      type: "button", disabled: !from.includes(job.status),
      onclick: () => act(verb.toLowerCase()),
    }, `${verb} job`)));
  }

  function renderEvents() {
    const all = ordered;
    const series = lossSeries(all);
    chartBox.replaceChildren(lossChart(series), legend(series),
      h("figcaption", { class: "sr-only" }, "Training and validation loss by step"));
    log.replaceChildren(table("Job events, newest first", ["Time", "Level", "Message"],
      all.map((ev) => h("tr", { class: `level-${ev.level}` }, h("td", {}, time(ev.created_at)),
        h("td", {}, ev.level), h("td", {}, ev.message))), "No events yet."));
  }

  async function renderCheckpoints() {
    const list = await api(`${jobPath(jobId)}/checkpoints?limit=100`);
    checkpoints.replaceChildren(table("Checkpoints", ["Step", "Model", "Training loss",
      "Validation loss", "Created", "Try"], list.data.map((c) => h("tr", {},
      h("td", {}, String(c.step_number)), h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint)),
      h("td", {}, c.metrics?.train_loss?.toFixed(4) ?? "—"),
      h("td", {}, c.metrics?.valid_loss?.toFixed(4) ?? "—"),
      h("td", {}, time(c.created_at)),
      h("td", {}, h("a", { href: `#/playground/${encodeURIComponent(c.fine_tuned_model_checkpoint)}`,
        "aria-label": `Chat with the checkpoint at step ${c.step_number}` }, "Playground")))),
    "No checkpoints yet."));
    checkpointsLoaded = true;
  }

  async function refresh() {
    const wasFinal = job && FINAL.includes(job.status);
    job = await api(jobPath(jobId));
    renderJob();
    const fresh = await newEvents(jobId, events);
    ordered = [...fresh, ...ordered];
    if (fresh.length || !chartBox.firstChild) renderEvents();
    // checkpoints change only with new events; a finished job's list is fetched once more
    if (fresh.length || !checkpointsLoaded || (!wasFinal && FINAL.includes(job.status))) {
      await renderCheckpoints();
    }
  }

  await refresh();
  return { refresh };
}
