// The server: models for everyone; for an admin key also engines and their concurrency
// limiters, routes, the queue per model and the worker processes (GET /v1/admin/server).

import { api } from "./api.js";
import { h, redraw } from "./dom.js";
import { duration, when } from "./format.js";

const LIVE_SECONDS = 15; // a worker heartbeats every few seconds; quieter than this looks stopped

export function mount(root, ctx) {
  async function refresh() {
    const [models, server] = await Promise.all([api.models(), ctx.admin ? api.server() : null]);
    redraw(root,
      h("div", { class: "heading" }, h("h1", {}, ctx.admin ? "Server" : "Models")),
      table("Models", ["Model", "Owned by"], models.data.map((m) => [h("code", {}, m.id), m.owned_by])),
      server ? [
        table("Engines", ["Engine", "Kind", "Models", "Concurrency (window / share / max)", "In flight (peak)"],
          server.engines.map((e) => [e.name, e.kind, e.models.join(", ") || "—",
            e.concurrency ? `${e.concurrency.limit} / ${e.concurrency.ceiling} / ${e.concurrency.maximum}` : "—",
            e.concurrency ? `${e.concurrency.in_flight} (${e.concurrency.peak_in_flight})` : "—"])),
        table("Routes", ["Model pattern", "Engine", "Endpoints"],
          server.routes.map((r) => [h("code", {}, r.pattern), r.engine, r.endpoints?.join(", ") ?? "all"])),
        table("Queue by model", ["Model", "Unfinished batches", "Requests waiting"],
          server.queue.map((q) => [q.model ?? "(validating)", q.batches, q.waiting_requests]), "Nothing queued."),
        table("Workers", ["Worker", "Started", "Last seen", "State"],
          server.workers.map((w) => [h("code", {}, w.id), when(w.started_at), `${duration(w.seen_seconds_ago)} ago`,
            h("span", { class: `badge ${w.seen_seconds_ago < LIVE_SECONDS ? "s-completed" : "s-expired"}` },
              w.seen_seconds_ago < LIVE_SECONDS ? "live" : "silent")]), "No worker has registered."),
      ] : null);
  }
  return { refresh, dispose() {} };
}

function table(title, headers, rows, empty = "None.") {
  const id = `t-${title.toLowerCase().replace(/\W+/g, "-")}`;
  return h("section", { class: "card", "aria-labelledby": id },
    h("h2", { id }, title),
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) => h("td", { "data-label": headers[i] }, c)))))))
      : h("p", { class: "muted" }, empty));
}
