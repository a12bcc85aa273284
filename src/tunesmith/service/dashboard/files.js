// Files: upload (picker or drag and drop), the validator's line errors, list, download,
// delete.

import { api, confirmedDelete, download } from "./api.js";
import { announce, bytes, errorBox, h, heading, table, time } from "./ui.js";

export async function filesPage(view) {
  const input = h("input", { id: "file-input", type: "file", name: "file",
    accept: ".jsonl,.json,application/jsonl,application/json", multiple: true });
  const result = h("div", { id: "upload-result", "aria-live": "polite" });
  const drop = h("div", { id: "drop-zone", class: "drop" },
    h("p", {}, "Drop JSONL files here, or choose them:"),
    h("label", { for: "file-input" }, "Training data (JSONL)"), input,
    h("button", { type: "submit" }, "Upload"));
  const form = h("form", { id: "upload-form", "aria-label": "Upload files" }, drop, result);
  const list = h("div", { id: "files-table" });
  view.append(heading("Files"),
    h("p", {}, "One JSON object per line: ",
      h("code", {}, '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'),
      " for supervised jobs, or OpenAI preference pairs for DPO. Each upload is checked line by line."),
    form, h("h2", {}, "Uploaded files"), list);

  async function upload(files) {
    result.replaceChildren();
    for (const file of files) {
      const data = new FormData();
      data.append("purpose", "fine-tune");
      data.append("file", file, file.name);
      try {
        const saved = await api("/v1/files", { method: "POST", body: data });
        result.append(h("p", { class: "ok" }, `Uploaded ${saved.filename} as ${saved.id}.`));
        announce(`Uploaded ${saved.filename}`);
      } catch (err) {
        result.append(errorBox(err, "upload-error"));
      }
    }
    input.value = "";
    await refresh();
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.files.length) upload([...input.files]);
    else result.replaceChildren(errorBox({ message: "Choose a file first." }));
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer?.files?.length) upload([...e.dataTransfer.files]);
  });

  async function remove(file) {
    try {
      if (!await confirmedDelete(`Delete ${file.filename} (${file.id})?`,
        `/v1/files/${encodeURIComponent(file.id)}`)) return;
      announce(`Deleted ${file.filename}`);
    } catch (err) {
      result.replaceChildren(errorBox(err));
    }
    await refresh();
  }

  async function refresh() {
    const files = await api("/v1/files");
    list.replaceChildren(table("Uploaded files, newest first",
      ["File", "Name", "Purpose", "Size", "Uploaded", "Actions"],
      files.data.map((f) => h("tr", { "data-file": f.id },
        h("td", {}, h("code", {}, f.id)), h("td", {}, f.filename), h("td", {}, f.purpose),
        h("td", {}, bytes(f.bytes)), h("td", {}, time(f.created_at)),
        h("td", { class: "actions" },
          h("button", { type: "button", "aria-label": `Download ${f.filename}`,
            onclick: () => download(`/v1/files/${encodeURIComponent(f.id)}/content`, f.filename)
              .catch((err) => result.replaceChildren(errorBox(err))) }, "Download"),
          h("button", { type: "button", "aria-label": `Delete ${f.filename}`,
            onclick: () => remove(f) }, "Delete")))),
      "No files yet."));
  }
  await refresh();
  return { refresh };
}
