// The dashboard's shell: sign-in, navigation between pages (hash routes), live polling.
// Every page is a plain client of the /v1 API; nothing on the server depends on this page,
// so closing it never affects a job.

import { api, clearKey, getKey, setKey, whenUnauthorized } from "./api.js";
import { filesPage } from "./files.js";
import { jobPage, jobsPage } from "./jobs.js";
import { modelsPage } from "./models.js";
import { newJobPage } from "./newjob.js";
import { playgroundPage } from "./playground.js";
import { announce } from "./ui.js";

const POLL_MS = 2000;
const routes = [
  [/^#\/jobs\/([^/]+)$/, jobPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/new-job$/, newJobPage],
  [/^#\/files$/, filesPage],
  [/^#\/playground$/, playgroundPage],
  [/^#\/playground\/([^/]+)$/, playgroundPage],
  [/^#\/models$/, modelsPage],
];

const $ = (id) => document.getElementById(id);
let page = null;  // the page on screen: { refresh?, stop? }
let generation = 0;  // bumped on each navigation; a stale poll stops itself

function leavePage() {
  generation++;
  page?.stop?.();
  page = null;
  $("view").replaceChildren();
}

function showSignIn(message) {
  leavePage();
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message ?? "";
  $("api-key").value = "";
  $("api-key").focus();
}

async function poll(gen) {
  await new Promise((r) => setTimeout(r, POLL_MS));
  if (gen !== generation || !page?.refresh) return;
  try {
    await page.refresh();
  } catch (err) {
    if (gen === generation) announce(`Refresh failed: ${err.message}`);
  }
  if (gen === generation && !document.hidden) poll(gen);
  else if (gen === generation) {  // a hidden tab polls again when it is shown
    document.addEventListener("visibilitychange", () => poll(gen), { once: true });
  }
}

async function route() {
  if (!getKey()) return showSignIn();
  leavePage();
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  // replaceState, not location.hash: no hashchange, so no second render
  if (!location.hash || location.hash === "#") history.replaceState(null, "", "#/jobs");
  const hash = location.hash || "#/jobs";
  const found = routes.map(([re, fn]) => [hash.match(re), fn]).find(([m]) => m);
  for (const a of $("nav").querySelectorAll("a")) {
    const here = hash === a.getAttribute("href") || hash.startsWith(`${a.getAttribute("href")}/`);
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const [match, render] = found ?? [[hash, ""], jobsPage];
  const gen = generation;
  const view = $("view");
  const focusedAtStart = document.activeElement;
  try {
    const shown = await render(view, ...match.slice(1).map(decodeURIComponent));
    if (gen !== generation) return shown?.stop?.();
    page = shown ?? {};
  } catch (err) {
    if (gen !== generation) return;
    view.replaceChildren();
    const box = document.createElement("p");
    box.className = "error";
    box.setAttribute("role", "alert");
    box.textContent = err.message;
    view.append(box);
    return;
  }
  // the new page's heading takes the focus (a screen reader announces the page), unless the
  // user moved the focus while the page was loading: never pull it from under their keys
  if (document.activeElement === focusedAtStart) view.querySelector("h1")?.focus();
  document.title = `${view.querySelector("h1")?.textContent ?? "tunesmith"} · tunesmith`;
  poll(gen);
}

$("sign-in-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  const button = e.submitter;
  button.disabled = true;
  $("sign-in-error").textContent = "";
  try {
    await api("/v1/models", { key });  // the key is kept only once the server accepts it
    setKey(key);
    $("api-key").value = "";
    route();
  } catch (err) {
    $("sign-in-error").textContent = err.status === 401 ? err.message
      : `Could not reach the server: ${err.message}`;
  } finally {
    button.disabled = false;
  }
});

$("sign-out").addEventListener("click", () => {
  clearKey();
  showSignIn("Signed out.");
});

whenUnauthorized((err) => {
  clearKey();
  showSignIn(err.message);
});

// the skip link moves focus without touching the hash (the hash is the page's route)
document.querySelector(".skip").addEventListener("click", (e) => {
  e.preventDefault();
  $("main").focus();
});

window.addEventListener("hashchange", route);
route();
