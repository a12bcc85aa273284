// Models: the server's base models and this organisation's fine-tunes (deletable).

import { api, confirmedDelete } from "./api.js";
import { announce, errorBox, h, heading, table, time } from "./ui.js";

export const isBase = (m) => m.owned_by === "tunesmith";

export async function modelsPage(view) {
  const message = h("div", { id: "models-message" });
  const bases = h("div", { id: "base-models" });
  const tunes = h("div", { id: "fine-tunes" });
  view.append(heading("Models"), message, h("h2", {}, "Base models"), bases,
    h("h2", {}, "Fine-tuned models"), tunes);

  async function remove(model) {
    try {
      if (!await confirmedDelete(`Delete ${model.id}? Its weights are removed; this cannot be `
        + "undone.", `/v1/models/${encodeURIComponent(model.id)}`)) return;
      announce(`Deleted ${model.id}`);
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
    await refresh();
  }

  async function refresh() {
    const models = (await api("/v1/models")).data;
    bases.replaceChildren(table("Base models", ["Model"], models.filter(isBase)
      .map((m) => h("tr", {}, h("td", {}, h("code", {}, m.id)))), "No base models."));
    tunes.replaceChildren(table("Fine-tuned models", ["Model", "Created", "Actions"],
      models.filter((m) => !isBase(m)).map((m) => h("tr", { "data-model": m.id },
        h("td", {}, h("code", {}, m.id)), h("td", {}, time(m.created)),
        h("td", {}, h("button", { type: "button", "aria-label": `Delete ${m.id}`,
          onclick: () => remove(m) }, "Delete")))),
      "No fine-tuned models yet."));
  }
  await refresh();
  return { refresh };
}
