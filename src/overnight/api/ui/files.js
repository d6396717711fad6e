// Files: upload (drop on the zone, or choose with the file input), the list with purpose, size and
// expiry, download and delete. Pages of 100 through the `after` cursor.

import { api, download } from "./api.js";
import { h, notify, redraw, replace } from "./dom.js";
import { bytes, when } from "./format.js";

const PAGE = 100;

export function mount(root, ctx) {
  const cursors = [null];
  let page = null;
  const body = h("tbody");
  const purpose = h("select", { id: "upload-purpose" },
    ["batch", "user_data", "evals", "fine-tune", "assistants", "vision"].map((p) => h("option", { value: p }, p)));
  const input = h("input", { id: "upload-input", type: "file", accept: ".jsonl,.json,application/jsonl",
    multiple: true, class: "sr-only", onchange: () => uploadAll(input.files) });
  const status = h("p", { class: "muted", "aria-live": "polite" });
  const zone = h("label", {
    for: "upload-input", class: "dropzone", id: "dropzone",
    ondragover: (e) => { e.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); zone.classList.remove("over"); uploadAll(e.dataTransfer.files); },
  }, h("strong", {}, "Drop JSONL files here"), h("span", {}, "or press to choose files"));
  zone.tabIndex = 0; // the label is the visible control; Enter or Space opens the chooser
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  const newer = h("button", { type: "button", class: "ghost", onclick: () => go(-1) }, "← Newer");
  const older = h("button", { type: "button", class: "ghost", onclick: () => go(1) }, "Older →");
  const summary = h("p", { class: "muted" });

  async function uploadAll(list) {
    for (const file of list) {
      status.textContent = `Uploading ${file.name}…`;
      try {
        const created = await api.upload(file, purpose.value);
        status.textContent = `Uploaded ${file.name} as ${created.id}.`;
      } catch (err) {
        status.textContent = "";
        notify(`${file.name}: ${err.message}`, "error");
      }
    }
    input.value = "";
    await refresh();
  }

  async function go(step) {
    if (step > 0 && page?.has_more) cursors.push(page.last_id);
    else if (step < 0 && cursors.length > 1) cursors.pop();
    else return;
    await refresh();
  }

  async function remove(file) {
    if (!window.confirm(`Delete ${file.filename} (${file.id})?`)) return;
    try {
      await api.deleteFile(file.id);
      notify(`Deleted ${file.id}.`);
    } catch (err) {
      notify(err.message, "error");
    }
    await refresh();
  }

  function row(file) {
    return h("tr", { "data-key": file.id, "data-file": file.id },
      h("td", { "data-label": "File" }, h("div", {}, file.filename), h("code", { class: "muted small" }, file.id)),
      ctx.admin ? h("td", { "data-label": "Owner", class: "owner" }, file.owner ?? "—") : null,
      h("td", { "data-label": "Purpose" }, file.purpose),
      h("td", { "data-label": "Size", class: "num" }, bytes(file.bytes)),
      h("td", { "data-label": "Created" }, when(file.created_at)),
      h("td", { "data-label": "Expires" }, file.expires_at ? when(file.expires_at) : "never"),
      h("td", { "data-label": "Actions", class: "actions" },
        h("button", { type: "button", class: "small", "aria-label": `Download ${file.filename}`,
          onclick: () => download(file.id, file.filename).catch((e) => notify(e.message, "error")) }, "Download"),
        // an admin reads every tenant's files but deletes only its own
        ctx.admin && file.owner !== ctx.owner ? null
          : h("button", { type: "button", class: "small danger", "aria-label": `Delete ${file.filename}`,
            onclick: () => remove(file) }, "Delete")));
  }

  async function refresh() {
    page = await api.files(cursors[cursors.length - 1], null, PAGE);
    redraw(body, page.data.length ? page.data.map(row)
      : h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No files yet.")));
    summary.textContent = `Page ${cursors.length} · ${page.data.length} files`;
    newer.disabled = cursors.length <= 1;
    older.disabled = !page.has_more;
  }

  replace(root,
    h("div", { class: "heading" }, h("h1", {}, "Files")),
    h("section", { class: "card upload", "aria-labelledby": "upload-h" },
      h("h2", { id: "upload-h" }, "Upload"),
      h("div", { class: "field" }, h("label", { for: "upload-purpose" }, "Purpose"), purpose),
      zone, input, status),
    h("div", { class: "table-wrap" }, h("table", { class: "files" },
      h("caption", { class: "sr-only" }, "Files, newest first"),
      h("thead", {}, h("tr", {}, ["File", ctx.admin ? "Owner" : null, "Purpose", "Size", "Created", "Expires",
        "Actions"].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
      body)),
    h("nav", { class: "pager", "aria-label": "Pages" }, newer, summary, older));
  return { refresh, dispose() {} };
}
