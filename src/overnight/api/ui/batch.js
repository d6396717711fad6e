// One batch: its timeline, counts, usage and metadata, and once its files exist, its errors
// grouped by code and its first result lines joined to their input lines by custom_id.

import { api, headLines } from "./api.js";
import { batchActions } from "./actions.js";
import { h, redraw, replace } from "./dom.js";
import { TERMINAL, duration, elapsed, progressBar, rate, statusBadge, when } from "./format.js";
import { ThroughputTracker } from "./throughput.js";

const SHOWN_LINES = 200; // result lines shown (input, output and error files each read this far)
const ERROR_LINES = 1000; // error lines read to group by code
const EXAMPLES_PER_CODE = 3;
const TIMELINE = ["created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
  "cancelled_at", "expired_at", "expires_at"];

export function mount(root, ctx) {
  const tracker = new ThroughputTracker();
  const live = h("div");
  const files = h("div");
  let filesFor = null; // the output/error file ids the file sections were read for

  async function refresh() {
    const batch = await api.batch(ctx.arg);
    tracker.observe([batch]);
    redraw(live, overview(batch, ctx, tracker, refresh));
    const key = `${batch.status}|${batch.output_file_id}|${batch.error_file_id}`;
    if (TERMINAL.has(batch.status) && filesFor !== key) {
      filesFor = key;
      replace(files, h("p", { class: "muted" }, "Reading the result files…"));
      try {
        replace(files, await fileSections(batch));
      } catch (err) {
        filesFor = null; // read again at the next refresh (a 429, a restart), not never
        replace(files, h("p", { class: "error", role: "alert" }, `Could not read the result files: ${err.message}`));
      }
    }
  }

  replace(root, h("p", {}, h("a", { href: "#/batches" }, "← All batches")), live, files);
  return { refresh, dispose() {} };
}

function overview(batch, ctx, tracker, refresh) {
  const c = batch.request_counts;
  return [
    h("div", { class: "heading", "data-key": batch.id },
      h("h1", {}, batch.id, " ", statusBadge(batch.status)),
      h("div", { class: "actions" }, batchActions(batch, refresh))),
    h("div", { class: "card" },
      progressBar(c, `Progress of ${batch.id}`),
      h("dl", { class: "stats" },
        stat("Total", c.total), stat("Completed", c.completed), stat("Failed", c.failed),
        stat("Rate", rate(tracker.rate(batch))),
        stat("ETA", TERMINAL.has(batch.status) ? "—" : duration(tracker.eta(batch))),
        stat("Elapsed", duration(elapsed(batch))),
        stat("Model", batch.model ?? "—"), stat("Endpoint", batch.endpoint),
        ctx.admin ? stat("Owner", batch.owner ?? "—") : null)),
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "timeline-h" },
        h("h2", { id: "timeline-h" }, "Timeline"),
        h("ol", { class: "timeline" }, TIMELINE.filter((k) => batch[k]).map((k) =>
          h("li", {}, h("span", { class: "muted" }, k.replace(/_at$/, "").replace("_", " ")),
            h("time", { datetime: new Date(batch[k] * 1000).toISOString() }, when(batch[k])))))),
      h("section", { class: "card", "aria-labelledby": "usage-h" },
        h("h2", { id: "usage-h" }, "Usage"),
        batch.usage ? h("dl", { class: "stats" },
          stat("Input tokens", batch.usage.input_tokens),
          stat("Cached", batch.usage.input_tokens_details?.cached_tokens ?? 0),
          stat("Output tokens", batch.usage.output_tokens),
          stat("Reasoning", batch.usage.output_tokens_details?.reasoning_tokens ?? 0),
          stat("Total tokens", batch.usage.total_tokens)) : h("p", { class: "muted" }, "None yet.")),
      h("section", { class: "card", "aria-labelledby": "meta-h" },
        h("h2", { id: "meta-h" }, "Metadata and files"),
        h("dl", { class: "kv" },
          h("dt", {}, "Input file"), h("dd", {}, batch.input_file_id),
          h("dt", {}, "Output file"), h("dd", {}, batch.output_file_id ?? "—"),
          h("dt", {}, "Error file"), h("dd", {}, batch.error_file_id ?? "—"),
          Object.entries(batch.metadata || {}).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])))),
    batch.errors ? h("section", { class: "card", "aria-labelledby": "validation-h" },
      h("h2", { id: "validation-h" }, "Validation errors"),
      h("ul", {}, batch.errors.data.map((e) =>
        h("li", {}, h("code", {}, e.code), e.line ? ` line ${e.line}: ` : ": ", e.message)))) : null,
  ];
}

function stat(label, value) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, String(value)));
}

async function fileSections(batch) {
  const [input, output, errors] = await Promise.all([
    headLines(batch.input_file_id, SHOWN_LINES).catch(() => ({ lines: [], more: false })),
    batch.output_file_id ? headLines(batch.output_file_id, SHOWN_LINES) : { lines: [], more: false },
    batch.error_file_id ? headLines(batch.error_file_id, ERROR_LINES) : { lines: [], more: false },
  ]);
  return [errorGroups(errors), results(input, output, errors)];
}

function errorCode(line) {
  const body = line.response?.body;
  // A line's own error (batch_expired, batch_cancelled, engine_error), else the upstream's error
  // code, else its HTTP status: upstreams often send `code: null`.
  return line.error?.code || body?.error?.code
    || (line.response ? `http_${line.response.status_code}` : "unknown");
}

function errorMessage(line) {
  return line.error?.message || line.response?.body?.error?.message || JSON.stringify(line).slice(0, 300);
}

function errorGroups(errors) {
  if (!errors.lines.length) return null;
  const groups = new Map();
  for (const line of errors.lines) {
    const code = errorCode(line);
    const group = groups.get(code) || { count: 0, examples: [] };
    group.count += 1;
    if (group.examples.length < EXAMPLES_PER_CODE) group.examples.push(line);
    groups.set(code, group);
  }
  const sorted = [...groups.entries()].sort((a, b) => b[1].count - a[1].count);
  return h("section", { class: "card", "aria-labelledby": "errors-h" },
    h("h2", { id: "errors-h" }, "Errors by code"),
    errors.more ? h("p", { class: "muted" }, `From the first ${errors.lines.length} lines of the error file.`) : null,
    h("ul", { class: "groups" }, sorted.map(([code, g]) => h("li", { "data-code": code },
      h("strong", {}, h("code", {}, code)), ` × ${g.count}`,
      h("ul", {}, g.examples.map((line) => h("li", {}, h("code", {}, line.custom_id ?? "?"), " ",
        errorMessage(line))))))));
}

function summarize(body) {
  if (!body) return "";
  const messages = body.messages;
  if (Array.isArray(messages) && messages.length) {
    const content = messages[messages.length - 1].content;
    return typeof content === "string" ? content : JSON.stringify(content);
  }
  return JSON.stringify(body.input ?? body.prompt ?? body);
}

function answer(line) {
  if (line.error || line.response?.status_code >= 300 || line.response?.body?.error) return errorMessage(line);
  const body = line.response?.body;
  const choice = body?.choices?.[0];
  if (choice) return choice.message?.content ?? choice.text ?? "";
  if (Array.isArray(body?.data)) return `${body.data.length} embedding(s) of ${body.data[0]?.embedding?.length} dims`;
  if (body?.output_text) return body.output_text;
  return JSON.stringify(body).slice(0, 300);
}

function results(input, output, errors) {
  const answers = new Map();
  for (const line of [...output.lines, ...errors.lines]) answers.set(line.custom_id, line);
  const rows = input.lines.map((line) => {
    const result = answers.get(line.custom_id);
    const failed = result && (result.error || result.response?.status_code >= 300);
    return h("tr", {},
      h("td", { "data-label": "custom_id" }, h("code", {}, line.custom_id ?? "—")),
      h("td", { "data-label": "Result" }, result ? h("span", { class: `badge ${failed ? "s-failed" : "s-completed"}` },
        failed ? errorCode(result) : result.response?.status_code ?? "ok") : h("span", { class: "muted" }, "none")),
      h("td", { "data-label": "Request", class: "clip" }, summarize(line.body)),
      h("td", { "data-label": "Response", class: "clip" }, result ? answer(result) : ""));
  });
  return h("section", { class: "card", "aria-labelledby": "results-h" },
    h("h2", { id: "results-h" }, "Results"),
    h("p", { class: "muted" }, `The first ${input.lines.length} input lines${input.more ? " (of more)" : ""}, `
      + "joined to their output or error line by custom_id."),
    h("div", { class: "table-wrap" }, h("table", { class: "results" },
      h("thead", {}, h("tr", {}, ["custom_id", "Result", "Request", "Response"].map((t) =>
        h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows))));
}
