// The API as the dashboard calls it: the same public routes the OpenAI SDK uses, with the key from
// sessionStorage as a Bearer token. Errors arrive in OpenAI's envelope; ApiError carries them.

const KEY = "overnight.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? null;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
};

async function call(method, path, { body, key = session.key, form } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  let payload;
  if (form) payload = form;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response;
}

const json = async (...args) => (await call(...args)).json();

export const api = {
  models: (key) => json("GET", "/v1/models", { key }),
  server: (key) => json("GET", "/v1/admin/server", { key }),
  batches: (after, limit = 50) =>
    json("GET", `/v1/batches?limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`),
  batch: (id) => json("GET", `/v1/batches/${encodeURIComponent(id)}`),
  createBatch: (body) => json("POST", "/v1/batches", { body }),
  cancel: (id) => json("POST", `/v1/batches/${encodeURIComponent(id)}/cancel`),
  files: (after, purpose, limit = 100) => {
    const query = new URLSearchParams({ limit: String(limit), order: "desc" });
    if (after) query.set("after", after);
    if (purpose) query.set("purpose", purpose);
    return json("GET", `/v1/files?${query}`);
  },
  upload: (file, purpose) => {
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    return json("POST", "/v1/files", { form });
  },
  deleteFile: (id) => json("DELETE", `/v1/files/${encodeURIComponent(id)}`),
  content: (id) => call("GET", `/v1/files/${encodeURIComponent(id)}/content`),
};

/** Save a file through the browser's own download, streamed to disk: the route needs the
 *  Authorization header, which a plain link cannot send, so the server first signs a link that
 *  works without it for a minute. (A fetch() would hold the whole file in the tab first.) */
export async function download(fileId, name) {
  const link = await json("POST", `/v1/files/${encodeURIComponent(fileId)}/download_link`);
  const anchor = Object.assign(document.createElement("a"), { href: link.url, download: name });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
}

/** The first `maxLines` JSON lines of a file, streamed: reading stops there (or after `maxBytes`),
 *  so a file of millions of lines costs what is shown, not its size. */
export async function headLines(fileId, maxLines = 200, maxBytes = 4 << 20) {
  const response = await api.content(fileId);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const lines = [];
  let buffer = "";
  let seen = 0;
  let truncated = false;
  while (lines.length < maxLines) {
    const { value, done } = await reader.read();
    if (done) break;
    seen += value.byteLength;
    buffer += decoder.decode(value, { stream: true });
    const parts = buffer.split("\n");
    buffer = parts.pop();
    for (const part of parts) if (part.trim() && lines.length < maxLines) lines.push(part);
    if (seen > maxBytes) { truncated = true; break; }
  }
  if (buffer.trim() && lines.length < maxLines && !truncated) lines.push(buffer);
  const more = truncated || lines.length >= maxLines;
  reader.cancel().catch(() => {});
  return { lines: lines.map(parseLine), more };
}

function parseLine(text) {
  try { return JSON.parse(text); } catch { return { unparsed: text }; }
}
