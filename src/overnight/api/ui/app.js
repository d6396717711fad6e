// The shell: sign-in, the section navigation (#/batches, #/batches/<id>, #/files, #/server) and
// the 2-second refresh of whatever section is shown. Each section is a module exporting
// `mount(root, ctx)` -> { refresh(), dispose() }.

import { ApiError, api, session } from "./api.js";
import { h, notify, replace } from "./dom.js";

const POLL_MS = 2000;
const sections = {
  batches: () => import("./batches.js"),
  batch: () => import("./batch.js"),
  files: () => import("./files.js"),
  server: () => import("./server.js"),
};

const ctx = { admin: false, owner: null, navigate: (hash) => { location.hash = hash; } };
const signinSection = document.getElementById("signin"); // kept: route() takes it out of the page
let current = null;
let timer = 0;
let generation = 0;

async function signIn(key) {
  await api.models(key); // 401 for an unknown key
  try {
    ctx.owner = (await api.server(key)).owner;
    ctx.admin = true;
  } catch (err) {
    // 403: a tenant's key. Anything else (a 500, a restart) must not refuse a good key: the
    // key is a tenant's until the server page says otherwise.
    ctx.admin = false;
    if (!(err instanceof ApiError) || err.status !== 403) notify(`Admin rights not checked: ${err.message}`, "error");
  }
  session.key = key;
}

function showSignIn(message = "") {
  stop();
  for (const id of ["nav", "who", "sign-out"]) document.getElementById(id).hidden = true;
  const view = document.getElementById("view");
  replace(view, signinSection);
  signinSection.hidden = false;
  document.getElementById("signin-error").textContent = message;
  document.getElementById("api-key").focus();
}

function showShell() {
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  const who = document.getElementById("who");
  who.hidden = false;
  replace(who, ctx.admin ? h("span", { class: "badge admin" }, "admin") : "tenant");
  document.querySelector('[data-section="server"]').textContent = ctx.admin ? "Server" : "Models";
}

function stop() {
  clearTimeout(timer);
  generation += 1;
  if (current) current.dispose?.();
  current = null;
}

function parseHash() {
  let parts;
  try {
    parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = []; // a malformed fragment ("#/batches/%"): the batch list, not a frozen page
  }
  if (parts[0] === "batches" && parts[1]) return ["batch", parts[1]];
  return [sections[parts[0]] ? parts[0] : "batches", null];
}

async function route() {
  if (!session.key) return showSignIn();
  stop();
  const mine = generation;
  const [name, arg] = parseHash();
  for (const link of document.querySelectorAll("#nav a")) {
    const active = link.dataset.section === (name === "batch" ? "batches" : name);
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const module = await sections[name]();
  if (mine !== generation) return;
  const view = document.getElementById("view");
  const root = h("div", { class: "section" });
  replace(view, root);
  current = module.mount(root, { ...ctx, arg });
  view.focus({ preventScroll: true }); // keyboard and screen-reader users start at the new section
  tick(mine);
}

async function tick(mine) {
  if (mine !== generation || !current) return;
  if (document.hidden) return; // a tab nobody looks at polls nothing; visibilitychange resumes it
  try {
    await current.refresh();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      session.key = null;
      return showSignIn("The key was refused; sign in again.");
    }
    notify(err.message, "error");
  }
  if (mine === generation) timer = setTimeout(() => tick(mine), POLL_MS);
}

document.getElementById("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  try {
    await signIn(input.value.trim());
    input.value = "";
    showShell();
    // focus moves to the section once it is drawn (route), not to the sign-in form it replaces
    if (!location.hash) location.hash = "#/batches";
    else route();
  } catch (err) {
    document.getElementById("signin-error").textContent = err.message;
  }
});

document.getElementById("sign-out").addEventListener("click", () => {
  session.key = null;
  showSignIn();
});

window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && current) {
    clearTimeout(timer);
    tick(generation);
  }
});

(async () => {
  if (!session.key) return showSignIn();
  try {
    await signIn(session.key);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      session.key = null; // refused: sign in again
      return showSignIn();
    }
    // the server restarting, a 429: keep the key and try again shortly
    return showSignIn(`Could not reach the server (${err.message}); reload to try again.`);
  }
  showShell();
  route();
})();
