// The batch list: newest first, a page of 50 at a time through the API's `after` cursor (so it
// holds any number of batches), live counts, throughput and ETA, and a form to create one.

import { api } from "./api.js";
import { batchActions } from "./actions.js";
import { h, notify, redraw, replace } from "./dom.js";
import { TERMINAL, duration, elapsed, progressBar, rate, statusBadge, when, whenShort } from "./format.js";
import { ThroughputTracker } from "./throughput.js";

const PAGE = 50;
// With a status filter, pages of the unfiltered list are read until a screenful matches, at most
// this many per refresh (the API lists newest first and has no status filter of its own).
const SCAN_PAGES = 5;
const SCAN_LIMIT = 100;
const STATUSES = ["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
  "cancelled"];
const ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];

export function mount(root, ctx) {
  const tracker = new ThroughputTracker();
  const cursors = [null]; // the `after` of each page visited; the last is the page shown
  let page = null;
  let status = "";

  const body = h("tbody");
  const summary = h("p", { class: "muted", "aria-live": "polite" });
  const newer = h("button", { type: "button", class: "ghost", onclick: () => go(-1) }, "← Newer");
  const older = h("button", { type: "button", class: "ghost", onclick: () => go(1) }, "Older →");
  const filter = h("select", { id: "status-filter", onchange: (e) => {
    status = e.target.value;
    cursors.length = 1; // a new filter starts again from the newest batch
    refresh();
  } },
    h("option", { value: "" }, "All"), STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))));

  async function go(step) {
    if (step > 0 && page?.has_more) cursors.push(page.last_id);
    else if (step < 0 && cursors.length > 1) cursors.pop();
    else return;
    await refresh();
  }

  function row(batch) {
    const r = tracker.rate(batch);
    const eta = tracker.eta(batch);
    const label = `Progress of ${batch.id}`;
    return h("tr", { "data-batch": batch.id, "data-key": batch.id },
      h("td", { "data-label": "Batch" }, h("a", { href: `#/batches/${encodeURIComponent(batch.id)}` }, batch.id),
        batch.metadata?.description ? h("div", { class: "muted small" }, batch.metadata.description) : null),
      ctx.admin ? h("td", { "data-label": "Owner", class: "owner" }, batch.owner ?? "—") : null,
      h("td", { "data-label": "Status" }, statusBadge(batch.status)),
      h("td", { "data-label": "Progress", class: "progress" }, progressBar(batch.request_counts, label),
        h("span", { class: "counts" }, countsText(batch.request_counts))),
      h("td", { "data-label": "Rate", class: "num" }, rate(r)),
      h("td", { "data-label": "ETA", class: "num" }, TERMINAL.has(batch.status) ? "—" : duration(eta)),
      h("td", { "data-label": "Model" }, batch.model ?? "—"),
      h("td", { "data-label": "Created", title: when(batch.created_at) }, whenShort(batch.created_at)),
      h("td", { "data-label": "Elapsed", class: "num" }, duration(elapsed(batch))),
      h("td", { "data-label": "Actions", class: "actions" }, batchActions(batch, refresh)));
  }

  function draw() {
    if (!page) return;
    redraw(body, page.data.length ? page.data.map(row)
      : h("tr", {}, h("td", { colspan: 10, class: "empty" }, status
        ? `No ${status.replace("_", " ")} batches among the ${page.scanned} looked at.`
        : "No batches yet: upload a file and create one above.")));
    summary.textContent = `Page ${cursors.length} · ${page.data.length} ${status ? status.replace("_", " ") + " " : ""}`
      + `batches${status ? ` (of ${page.scanned} looked at)` : ""}`;
    newer.disabled = cursors.length <= 1;
    older.disabled = !page.has_more;
  }

  /** One screen from `after` on: a page of the list, or with a filter, the matches found in up
   *  to SCAN_PAGES pages; `last_id` is where the next screen starts. */
  async function load(after) {
    if (!status) {
      const p = await api.batches(after, PAGE);
      return { data: p.data, has_more: p.has_more, last_id: p.last_id, scanned: p.data.length };
    }
    const data = [];
    let cursor = after;
    let scanned = 0;
    for (let pages = 0; pages < SCAN_PAGES; pages += 1) {
      const p = await api.batches(cursor, SCAN_LIMIT);
      for (const batch of p.data) {
        scanned += 1;
        cursor = batch.id;
        if (batch.status !== status) continue;
        data.push(batch);
        if (data.length === PAGE) return { data, has_more: true, last_id: cursor, scanned };
      }
      if (!p.has_more) return { data, has_more: false, last_id: cursor, scanned };
    }
    return { data, has_more: true, last_id: cursor, scanned };
  }

  async function refresh() {
    const wanted = status;
    const loaded = await load(cursors[cursors.length - 1]);
    if (wanted !== status) return; // the filter changed while this screen loaded
    page = loaded;
    tracker.observe(page.data);
    draw();
  }

  replace(root,
    h("div", { class: "heading" }, h("h1", {}, "Batches"),
      h("div", { class: "filter" }, h("label", { for: "status-filter" }, "Status"), filter)),
    createForm(refresh, ctx),
    h("div", { class: "table-wrap" },
      h("table", { class: "batches" },
        h("caption", { class: "sr-only" }, "Batches, newest first"),
        h("thead", {}, h("tr", {}, ["Batch", ctx.admin ? "Owner" : null, "Status", "Progress", "Rate", "ETA",
          "Model", "Created", "Elapsed", "Actions"].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
        body)),
    h("nav", { class: "pager", "aria-label": "Pages" }, newer, summary, older));
  return { refresh, dispose() {} };
}

function countsText({ total, completed, failed }) {
  return `${completed + failed} / ${total}` + (failed ? ` · ${failed} failed` : "");
}

function createForm(onCreated, ctx) {
  const fileSelect = h("select", { id: "create-file", required: true });
  const endpoint = h("select", { id: "create-endpoint" }, ENDPOINTS.map((e) => h("option", { value: e }, e)));
  const windowSelect = h("select", { id: "create-window" }, h("option", { value: "24h" }, "24h"));
  const description = h("input", { id: "create-description", type: "text", maxlength: 512,
    placeholder: "optional" });
  const error = h("p", { class: "error", role: "alert" });

  async function loadFiles() {
    const listed = (await api.files(null, "batch", 200)).data;
    // an admin lists every tenant's files but creates batches from its own only
    const files = ctx.admin ? listed.filter((f) => f.owner === ctx.owner) : listed;
    replace(fileSelect, files.length
      ? files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`))
      : h("option", { value: "" }, "No batch files: upload one on the Files page"));
  }

  const form = h("form", {
    class: "create", onsubmit: async (event) => {
      event.preventDefault();
      error.textContent = "";
      const body = { input_file_id: fileSelect.value, endpoint: endpoint.value, completion_window: windowSelect.value };
      if (description.value.trim()) body.metadata = { description: description.value.trim() };
      try {
        const batch = await api.createBatch(body);
        notify(`Created ${batch.id}.`);
        description.value = "";
        await onCreated();
      } catch (err) {
        error.textContent = err.message;
      }
    },
  },
  h("div", { class: "field" }, h("label", { for: "create-file" }, "Input file"), fileSelect),
  h("div", { class: "field" }, h("label", { for: "create-endpoint" }, "Endpoint"), endpoint),
  h("div", { class: "field" }, h("label", { for: "create-window" }, "Window"), windowSelect),
  h("div", { class: "field" }, h("label", { for: "create-description" }, "Description"), description),
  h("button", { type: "submit" }, "Create batch"),
  error);

  const details = h("details", { class: "card", ontoggle: () => details.open && loadFiles().catch((e) => {
    error.textContent = e.message;
  }) }, h("summary", {}, "New batch"), form);
  return details;
}
