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
  // dpo's beta, shown for dpo only
  const dpoOnly = h("div", { hidden: true }, auto("beta", false));
  // tunesmith's extension of method.supervised: differential privacy (DP-SGD)
  const dp = (name, label, hint) => labelled(`dp-${name}`, label,
    h("input", { name: `dp_${name}`, type: "text", inputmode: "decimal", placeholder: "auto" }),
    hint);
  const privacyFields = h("div", { hidden: true },
    dp("target_epsilon", "Target epsilon", "The privacy budget the whole run may spend, e.g. 8"),
    dp("delta", "Delta", "auto (well below 1 / training examples), or a number"),
    dp("max_grad_norm", "Clipping bound", "Per-example gradient norm bound (auto: 1.0)"));
  const privacyBox = h("input", { type: "checkbox", name: "private" });
  const privacy = h("fieldset", { id: "job-privacy" },
    h("legend", {}, "Differential privacy (supervised only)"),
    labelled("job-private", "Train with DP-SGD", privacyBox), privacyFields);
  const form = h("form", { id: "job-form", novalidate: true },
    labelled("job-model", "Base model", select("model", models.data.map((m) => [m.id, m.id])),
      "A base model of this server or one of your fine-tuned models"),
    labelled("job-training-file", "Training file", select("training_file", fileOptions)),
    labelled("job-validation-file", "Validation file",
      select("validation_file", fileOptions, { empty: "None" })),
    labelled("job-method", "Method", select("method", [["supervised", "supervised"],
      ["dpo", "dpo (preference pairs)"]]), "dpo trains on preference pairs: a training file "
      + "of input, preferred_output and non_preferred_output"),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"),
      auto("n_epochs", true), auto("batch_size", true), auto("learning_rate_multiplier", false),
      dpoOnly),
    privacy,
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
  const showOptions = () => {
    const dpo = form.elements.method.value === "dpo";
    dpoOnly.hidden = !dpo;
    privacy.hidden = dpo;
    privacyFields.hidden = dpo || !privacyBox.checked;
  };
  form.elements.method.addEventListener("change", showOptions);
  privacyBox.addEventListener("change", showOptions);

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
      const type = f.method.value;
      const method = { type, [type]: { hyperparameters: hp } };
      if (type === "dpo") hp.beta = autoOrNumber(f.beta.value, false);
      else if (privacyBox.checked) {
        const epsilon = autoOrNumber(f.dp_target_epsilon.value, false);
        if (epsilon === "auto") throw new Error("Differential privacy needs a target epsilon");
        const p = { target_epsilon: epsilon, delta: autoOrNumber(f.dp_delta.value, false) };
        const clip = autoOrNumber(f.dp_max_grad_norm.value, false);
        if (clip !== "auto") p.max_grad_norm = clip;
        method.supervised.privacy = p;
      }
      body = { model: f.model.value, training_file: f.training_file.value, method };
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
