// Times, durations and rates as people read them.

import { h } from "./dom.js";

export const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);
export const CANCELLABLE = new Set(["validating", "in_progress", "finalizing"]);

export function when(epochSeconds) {
  if (!epochSeconds) return "—";
  return new Date(epochSeconds * 1000).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

/** Time of day for today's moments, the date for older ones (full time in the title). */
export function whenShort(epochSeconds) {
  if (!epochSeconds) return "—";
  const date = new Date(epochSeconds * 1000);
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = -1;
  do { value /= 1024; unit += 1; } while (value >= 1024 && unit < units.length - 1);
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function rate(perSecond) {
  if (!perSecond || !Number.isFinite(perSecond)) return "—";
  return perSecond >= 10 ? `${Math.round(perSecond)}/s` : `${perSecond.toFixed(1)}/s`;
}

export function endedAt(batch) {
  return batch.completed_at || batch.failed_at || batch.cancelled_at || batch.expired_at || null;
}

export function elapsed(batch) {
  return (endedAt(batch) || Date.now() / 1000) - batch.created_at;
}

export function statusBadge(status) {
  return h("span", { class: `badge s-${status}` }, status.replace("_", " "));
}

/** completed (green) and failed (red) as two segments of one bar, announced as one progressbar. */
export function progressBar(counts, label) {
  const { total, completed, failed } = counts;
  const pct = (n) => `${total ? (100 * n) / total : 0}%`;
  // Widths through the CSSOM: the page's Content-Security-Policy forbids style="" attributes.
  const ok = h("span", { class: "ok" });
  const bad = h("span", { class: "bad" });
  ok.style.width = pct(completed);
  bad.style.width = pct(failed);
  return h("div", {
    class: "bar", role: "progressbar", "aria-label": label, "aria-valuemin": 0,
    "aria-valuemax": total, "aria-valuenow": completed + failed,
    "aria-valuetext": `${completed} completed, ${failed} failed of ${total}`,
    "data-completed": completed, "data-failed": failed, "data-total": total,
  }, ok, bad);
}
