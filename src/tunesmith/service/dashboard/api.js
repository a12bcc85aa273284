// The only way the dashboard talks to the server: fetch calls to the /v1 API with the key.
// The key lives in sessionStorage (this tab only), never in a URL, a cookie or the console.

const KEY = "tunesmith.api_key";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (key) => sessionStorage.setItem(KEY, key);
export const clearKey = () => sessionStorage.removeItem(KEY);

let onUnauthorized = () => {};
export function whenUnauthorized(handler) { onUnauthorized = handler; }

function headers(key, extra = {}) {
  return { Authorization: `Bearer ${key ?? getKey() ?? ""}`, ...extra };
}

async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON */ }
  const message = body?.error?.message ?? `${resp.status} ${resp.statusText}`;
  return new ApiError(resp.status, message, body);
}

// method, path, JSON body or FormData; `key` checks a key before it is stored (sign-in)
export async function api(path, { method = "GET", body, key, raw = false } = {}) {
  const init = { method, headers: headers(key) };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    const err = await failure(resp);
    if (resp.status === 401 && key === undefined) onUnauthorized(err);
    throw err;
  }
  return raw ? resp : resp.json();
}

// Save a file the API serves (it needs the key, so a plain link cannot fetch it).
export async function download(path, filename) {
  const resp = await api(path, { raw: true });
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// Every event of a job not in `known` (a Map id -> event), paging newest first until a
// known one; the API lists events newest first, like OpenAI's.
export async function newEvents(jobId, known) {
  const found = [];
  let after = null;
  for (let i = 0; i < 200; i++) {
    const q = new URLSearchParams({ limit: "100" });
    if (after) q.set("after", after);
    const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?${q}`);
    let reachedKnown = false;
    for (const ev of page.data) {
      if (known.has(ev.id)) { reachedKnown = true; break; }
      found.push(ev);
    }
    if (reachedKnown || !page.has_more) break;
    after = page.last_id;
  }
  for (const ev of found) known.set(ev.id, ev);
  return found;
}

// POST /v1/chat/completions with stream: true; calls onText(piece) per chunk and returns
// { id, text, finish_reason, logprobs } (the id is the completion's, for feedback; logprobs: the
// tokens' entries when the body asks for them).
export async function streamChat(body, onText, signal) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", signal,
    headers: headers(undefined, { "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!resp.ok) {
    const err = await failure(resp);
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const result = { id: null, text: "", finish_reason: null, logprobs: [] };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return result;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk);
        result.id = chunk.id ?? result.id;
        for (const choice of chunk.choices ?? []) {
          const piece = choice.delta?.content;
          if (piece) { result.text += piece; onText(piece); }
          if (choice.logprobs?.content) result.logprobs.push(...choice.logprobs.content);
          if (choice.finish_reason) result.finish_reason = choice.finish_reason;
        }
      }
    }
  }
  return result;
}

// Ask first, then DELETE ``path``; true when it was deleted. The caller says so or shows the
// error (the API's message) and refreshes its list either way.
export async function confirmedDelete(question, path) {
  if (!confirm(question)) return false;
  await api(path, { method: "DELETE" });
  return true;
}
