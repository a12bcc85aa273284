// The new-job form: OpenAI's request body for POST /v1/fine_tuning/jobs.

import { api } from "./api.js";
import { errorBox, h, heading } from "./ui.js";

function labelled(id, label, control, hint) {
  control.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), control,
    hint ? h("small", { id: `${id}-hint` }, hint) : null);
}

function select(name, options, { empty } = {}) {
  return h("select", { name },
    empty ? h("option", { value: "" }, empty) : null,
    options.map(([value, text]) => h("option", { value }, text)));
}

// "auto" (or empty) stays "auto"; anything else must be a number
function autoOrNumber(value, integer) {
  const v = value.trim();
  if (!v || v === "auto") return "auto";
  const n = Number(v);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`"${v}" is not ${integer ? "a whole number" : "a number"} or auto`);
  }
  return n;
}

export async function newJobPage(view) {
  const [models, files] = await Promise.all([api("/v1/models"), api("/v1/files?purpose=fine-tune")]);
  const fileOptions = files.data.map((f) => [f.id, `${f.filename} (${f.id})`]);
  const message = h("div", { id: "job-form-message" });
  const auto = (name, integer) => {
    const input = h("input", { name, type: "text", inputmode: integer ? "numeric" : "decimal",
      placeholder: "auto", "aria-describedby": `hp-${name}-hint` });
    input.dataset.integer = integer ? "1" : "";
    return labelled(`hp-${name}`, name, input, "A number, or auto (leave empty)");
  };
  const form = h("form", { id: "job-form", novalidate: true },
    labelled("job-model", "Base model", select("model", models.data.map((m) => [m.id, m.id])),
      "A base model of this server or one of your fine-tuned models"),
    labelled("job-training-file", "Training file", select("training_file", fileOptions)),
    labelled("job-validation-file", "Validation file",
      select("validation_file", fileOptions, { empty: "None" })),
    labelled("job-method", "Method", select("method", [["supervised", "supervised"]])),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"),
      auto("n_epochs", true), auto("batch_size", true), auto("learning_rate_multiplier", false)),
    labelled("job-suffix", "Suffix", h("input", { name: "suffix", type: "text",
      maxlength: "64", pattern: "[A-Za-z0-9._\\-]*" }), "Up to 64 letters, digits, '.', '_', '-'"),
    labelled("job-seed", "Seed", h("input", { name: "seed", type: "number", min: "0",
      step: "1" }), "Empty: a random seed"),
    h("button", { type: "submit" }, "Create job"), message);
  view.append(heading("New fine-tuning job"));
  if (!fileOptions.length) {
    view.append(h("p", { class: "error", role: "alert" }, "Upload a training file first (",
      h("a", { href: "#/files" }, "Files"), ")."));
  }
  view.append(form);

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    message.replaceChildren();
    const f = form.elements;
    let body;
    try {
      const hp = {};
      for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier"]) {
        hp[name] = autoOrNumber(f[name].value, f[name].dataset.integer === "1");
      }
      body = { model: f.model.value, training_file: f.training_file.value,
        method: { type: "supervised", supervised: { hyperparameters: hp } } };
      if (f.validation_file.value) body.validation_file = f.validation_file.value;
      if (f.suffix.value.trim()) body.suffix = f.suffix.value.trim();
      if (f.seed.value.trim()) body.seed = autoOrNumber(f.seed.value, true);
    } catch (err) {
      message.replaceChildren(errorBox(err));
      return;
    }
    const button = e.submitter;
    button.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      message.replaceChildren(errorBox(err, "job-form-error"));
    } finally {
      button.disabled = false;
    }
  });
  return {};
}
