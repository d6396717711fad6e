// A tiny element builder: text always goes in as text nodes (no innerHTML), so file contents and
// batch metadata shown on the page can never become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

let noticeTimer = 0;

/** A short message in the polite live region (screen readers announce it). */
export function notify(text, kind = "info") {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, 6000);
}

/** Redraw `el` without losing keyboard focus: the focused control is found again in the new
 *  content by its row (data-key) and its label, so a 2-second refresh does not throw a keyboard
 *  user back to the top of the page. */
export function redraw(el, ...children) {
  const active = document.activeElement;
  let key = null;
  if (active && el.contains(active)) {
    key = [active.closest("[data-key]")?.dataset.key, active.tagName,
      active.getAttribute("aria-label") || active.textContent];
  }
  replace(el, ...children);
  if (!key) return;
  for (const candidate of el.querySelectorAll(key[1])) {
    if (candidate.closest("[data-key]")?.dataset.key === key[0]
        && (candidate.getAttribute("aria-label") || candidate.textContent) === key[2]) {
      candidate.focus({ preventScroll: true });
      return;
    }
  }
}
