// Playground: one conversation sent to two models side by side, answers streamed, each
// answer rated (words, not emoji: a machine without an emoji font shows empty boxes) and
// optionally corrected (POST /v1/feedback, kept for the next round). Replies can be held to a
// JSON schema (response_format) and show each token's probability (logprobs).

import { api, streamChat } from "./api.js";
import { announce, errorBox, h, heading, table } from "./ui.js";

// 83.1%, or two significant digits below 0.1% (a fine-tune's unlikely labels are still read)
const percent = (logprob) => {
  const p = Math.exp(logprob) * 100;
  return `${p >= 0.1 ? p.toFixed(1) : p.toPrecision(2)}%`;
};

// Each token of an answer, its probability and the step's other likely tokens, in a table (a
// table, not coloured text: it reads the same to a screen reader and without colour).
function probabilities(entries, side) {
  const rows = entries.map((e) => h("tr", {},
    h("td", {}, h("code", {}, JSON.stringify(e.token))), h("td", {}, percent(e.logprob)),
    h("td", {}, e.top_logprobs.filter((t) => t.token !== e.token)
      .map((t) => `${JSON.stringify(t.token)} ${percent(t.logprob)}`).join(", "))));
  return h("details", { class: "probabilities" },
    h("summary", {}, `Token probabilities (${side})`),
    table(`Token probabilities of answer ${side}`, ["Token", "Probability", "Also likely"], rows,
      "No tokens."));
}

function feedbackControls(completionId, side) {
  const note = h("p", { class: "muted", "aria-live": "polite" });
  const send = async (body, done) => {
    try {
      await api("/v1/feedback", { method: "POST", body: { completion_id: completionId, ...body } });
      note.textContent = done;
      announce(done);
    } catch (err) {
      note.replaceChildren(errorBox(err));
    }
  };
  const correction = h("textarea", { rows: "2", id: `correction-${side}-${completionId}` });
  return h("div", { class: "feedback", role: "group", "aria-label": `Feedback on answer ${side}` },
    h("button", { type: "button", "aria-label": `Good answer (${side})`,
      onclick: () => send({ rating: "good" }, "Rated good. Thank you.") }, "Good"),
    h("button", { type: "button", "aria-label": `Bad answer (${side})`,
      onclick: () => send({ rating: "bad" }, "Rated bad. Thank you.") }, "Bad"),
    h("details", {}, h("summary", {}, "Correct this answer"),
      h("label", { for: correction.id }, `Better answer (${side})`), correction,
      h("button", { type: "button", onclick: () => {
        if (correction.value.trim()) {
          send({ correction: correction.value.trim() }, "Correction saved. Thank you.");
        }
      } }, `Send correction (${side})`)),
    note);
}

// ``first``: a model to put on side A (e.g. a job's checkpoint, which /v1/models does not list)
export async function playgroundPage(view, first) {
  const listed = (await api("/v1/models")).data.map((m) => m.id);
  const models = first && !listed.includes(first) ? [first, ...listed] : listed;
  const picks = first ? [first, listed[0] ?? first] : models;
  const sides = ["A", "B"].map((name, i) => {
    const pick = picks[Math.min(i, picks.length - 1)];  // A: the first model, B: the second
    const choose = h("select", { id: `model-${name}` },
      models.map((m) => h("option", { value: m, selected: m === pick }, m)));
    return { name, choose, history: [], log: h("ol", { class: "transcript", id: `transcript-${name}`,
      "aria-live": "polite", "aria-label": `Conversation with model ${name}` }) };
  });
  const temperature = h("input", { id: "temperature", type: "number", min: "0", max: "2",
    step: "0.1", value: "0.7" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: "1", step: "1",
    value: "64" });
  const system = h("textarea", { id: "system-prompt", rows: "2" });
  const schema = h("textarea", { id: "json-schema", rows: "2", spellcheck: "false",
    placeholder: '{"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}}}' });
  const showProbabilities = h("input", { id: "show-probabilities", type: "checkbox" });
  const formNote = h("div", { "aria-live": "polite" });
  const prompt = h("textarea", { id: "prompt", rows: "3", required: true });
  const send = h("button", { type: "submit" }, "Send to both");
  const reset = h("button", { type: "button", onclick: () => {
    for (const s of sides) { s.history = []; s.log.replaceChildren(); }
    prompt.focus();
  } }, "New conversation");
  const form = h("form", { id: "chat-form" },
    h("div", { class: "row" },
      ...sides.map((s) => h("div", { class: "field" },
        h("label", { for: s.choose.id }, `Model ${s.name}`), s.choose)),
      h("div", { class: "field" }, h("label", { for: "temperature" }, "Temperature"), temperature),
      h("div", { class: "field" }, h("label", { for: "max-tokens" }, "Max tokens"), maxTokens)),
    h("div", { class: "field" }, h("label", { for: "system-prompt" }, "System message (optional)"),
      system),
    h("div", { class: "field" }, h("label", { for: "json-schema" },
      "Hold answers to a JSON schema (optional)"), schema),
    h("div", { class: "field" }, h("label", {}, showProbabilities, " Show token probabilities")),
    h("div", { class: "field" }, h("label", { for: "prompt" }, "Your message"), prompt),
    formNote,
    h("div", { class: "controls" }, send, reset));
  view.append(heading("Playground"), form,
    h("div", { class: "columns" }, sides.map((s) => h("section", { "aria-label": `Answers from model ${s.name}` },
      h("h2", {}, `Model ${s.name}`), s.log))));

  const controller = new AbortController();

  async function ask(side, text, format) {
    side.history.push({ role: "user", content: text });
    const answer = h("p", { class: "answer" });
    const item = h("li", { class: "assistant", "data-state": "streaming" },
      h("span", { class: "who" }, side.choose.value), answer);
    side.log.append(h("li", { class: "user" }, h("span", { class: "who" }, "You"), text), item);
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []),
      ...side.history];
    try {
      const wanted = showProbabilities.checked ? { logprobs: true, top_logprobs: 3 } : {};
      const result = await streamChat({ model: side.choose.value, messages,
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
        ...(format ? { response_format: format } : {}), ...wanted },
      (piece) => { answer.textContent += piece; }, controller.signal);
      side.history.push({ role: "assistant", content: result.text });
      if (!result.text) answer.append(h("span", { class: "muted" }, "(empty answer)"));
      item.dataset.state = "done";
      item.dataset.completion = result.id;
      if (result.logprobs.length) item.append(probabilities(result.logprobs, side.name));
      item.append(feedbackControls(result.id, side.name));
    } catch (err) {
      side.history.pop();
      item.dataset.state = "error";
      if (err.name !== "AbortError") item.append(errorBox(err));
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    let format = null;
    formNote.replaceChildren();
    if (schema.value.trim()) {  // checked here: a schema that is not JSON is never sent
      try {
        format = { type: "json_schema",
          json_schema: { name: "playground", schema: JSON.parse(schema.value) } };
      } catch (err) {
        formNote.replaceChildren(errorBox(`The JSON schema is not JSON: ${err.message}`,
          "schema-error"));
        schema.focus();
        return;
      }
    }
    prompt.value = "";
    send.disabled = true;
    await Promise.all(sides.map((s) => ask(s, text, format)));
    send.disabled = false;
    prompt.focus();
  });
  // leaving the page stops the answers being streamed to it
  return { stop: () => controller.abort() };
}
