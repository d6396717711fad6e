// Buttons shared by the batch list and the batch page: downloads and cancel.

import { download, api } from "./api.js";
import { h, notify } from "./dom.js";
import { CANCELLABLE } from "./format.js";

export function downloadButton(fileId, label, name) {
  if (!fileId) return null;
  return h("button", {
    type: "button", class: "small", "aria-label": `${label}: download ${name}`,
    onclick: () => download(fileId, name).catch((err) => notify(err.message, "error")),
  }, label);
}

export function cancelButton(batch, after) {
  if (!CANCELLABLE.has(batch.status)) return null;
  return h("button", {
    type: "button", class: "small danger", "aria-label": `Cancel ${batch.id}`,
    onclick: async (event) => {
      event.currentTarget.disabled = true;
      try {
        const updated = await api.cancel(batch.id);
        notify(`${batch.id} is ${updated.status}.`);
        after?.();
      } catch (err) {
        notify(err.message, "error");
      }
    },
  }, "Cancel");
}

export function batchActions(batch, after) {
  return [
    downloadButton(batch.output_file_id, "Output", `${batch.id}_output.jsonl`),
    downloadButton(batch.error_file_id, "Errors", `${batch.id}_errors.jsonl`),
    cancelButton(batch, after),
  ];
}
