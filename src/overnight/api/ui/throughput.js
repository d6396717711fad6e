// Throughput and ETA from successive polls: the API gives counts, not rates. Each batch keeps its
// last few samples (bounded); a finished batch's rate is its whole run's average.

import { TERMINAL, endedAt } from "./format.js";

const WINDOW = 8; // samples per batch: 8 polls at 2 s smooth over ~15 s

export class ThroughputTracker {
  constructor() { this.samples = new Map(); }

  /** Record the batches of this poll; forget batches no longer shown (memory stays bounded). */
  observe(batches, now = Date.now() / 1000) {
    const shown = new Set();
    for (const batch of batches) {
      shown.add(batch.id);
      const done = batch.request_counts.completed + batch.request_counts.failed;
      const list = this.samples.get(batch.id) || [];
      list.push({ t: now, done });
      while (list.length > WINDOW) list.shift();
      this.samples.set(batch.id, list);
    }
    for (const id of this.samples.keys()) if (!shown.has(id)) this.samples.delete(id);
  }

  /** Requests per second, or null when not yet known. */
  rate(batch) {
    const done = batch.request_counts.completed + batch.request_counts.failed;
    if (TERMINAL.has(batch.status)) {
      const start = batch.in_progress_at || batch.created_at;
      const end = batch.finalizing_at || endedAt(batch);
      return end && end > start ? done / (end - start) : null;
    }
    const list = this.samples.get(batch.id);
    if (!list || list.length < 2) return null;
    const first = list[0];
    const last = list[list.length - 1];
    return last.t > first.t ? (last.done - first.done) / (last.t - first.t) : null;
  }

  /** Seconds left at the current rate, or null. */
  eta(batch) {
    if (batch.status !== "in_progress") return null;
    const { total, completed, failed } = batch.request_counts;
    const r = this.rate(batch);
    return r && r > 0 ? (total - completed - failed) / r : null;
  }
}
