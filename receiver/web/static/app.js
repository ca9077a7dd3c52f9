// The dashboard: a tenant's tasks, live. Plain ES module, no build step.
//
// Rows are keyed by task id and replaced only by a snapshot with a higher `version`, so an
// event seen twice (a resume, the 202 answer and its own event) never doubles a row, and an
// older one never rolls a row back. The stream resumes from the last event id it saw.

const KINDS = ["task.created", "task.submitted", "task.progress", "task.succeeded",
  "task.failed", "task.canceled", "task.archived"];
const FINAL = new Set(["SUCCESS", "FAILURE", "CANCEL"]);
const RECONNECT_MS = 2000;

const state = {
  key: null,           // the API key, in memory only
  token: null,         // subscribe token for ?token= on /events
  tokenExpires: 0,     // ms
  tasks: new Map(),    // id -> snapshot
  lastEventId: null,
  source: null,
  retry: null,
  providers: [],
  images: new Map(),   // task id -> {source, url, expires}: its archived image, signed
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, body) {
    super(body?.detail || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// --- signing in -----------------------------------------------------------------------

async function freshToken() {
  const answer = await api("/subscribe-tokens", { method: "POST", body: {} });
  state.token = answer.token;
  state.tokenExpires = Date.now() + answer.expires_in * 1000;
}

async function begin() {
  try {
    await freshToken();  // open mode (loopback, no keys) needs no key
  } catch (error) {
    if (error.status === 401 || error.status === 403) return showLogin();
    return showMessage(error.message);
  }
  await start();
}

function showLogin(message) {
  $("login").hidden = false;
  $("app").hidden = true;
  if (message) showMessage(message);
  $("api-key").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  $("api-key").value = "";
  try {
    await freshToken();
  } catch (error) {
    if (error.status === 401 && await operator()) return;  // an admin key, not a tenant's
    state.key = null;
    const text = error.status === 401 ? "That key was not accepted." : error.message;
    $("login").querySelector(".hint").textContent = text;
    return;
  }
  $("login").hidden = true;
  await start();
});

// --- operators (RECEIVER_ADMIN_KEYS): the accounts, refreshed ------------------------------

const ACCOUNTS_EVERY_MS = 2000;

async function operator() {
  try {
    showAccounts(await api("/admin/accounts"));
  } catch {
    return false;
  }
  $("login").hidden = true;
  $("operator").hidden = false;
  setConnection("live");
  setInterval(async () => {
    try {
      showAccounts(await api("/admin/accounts"));
      setConnection("live");
    } catch {
      setConnection("reconnecting");
    }
  }, ACCOUNTS_EVERY_MS);
  return true;
}

function showAccounts(answer) {
  const body = $("accounts").querySelector("tbody");
  body.replaceChildren(...answer.accounts.map((account) => {
    const row = document.createElement("tr");
    row.dataset.account = account.name;
    row.dataset.health = account.health;
    const waiting = Object.entries(account.waiting_by_tenant)
      .map(([tenant, count]) => `${tenant} ${count}`).join(", ") || "none";
    const health = account.health === "paused"
      ? `paused until ${account.paused_until.slice(11, 19)}: ${account.last_error}`
      : "ok";
    for (const text of [account.name, `${account.slots_in_use} / ${account.queue_limit}`,
      String(account.waiting), waiting, health, String(account.tasks_sent)]) {
      const cell = document.createElement("td");
      cell.textContent = text;  // text only: nothing an account's data holds is markup
      row.append(cell);
    }
    return row;
  }));
}

async function start() {
  $("app").hidden = false;
  try {
    const info = await api("/providers");
    state.providers = info.providers;
    fillProviders(info);
    const page = await api("/tasks?limit=100");
    for (const task of page.tasks.reverse()) upsert(task);
  } catch (error) {
    showMessage(error.message);
  }
  connect();
}

// --- the live stream --------------------------------------------------------------------

function connect() {
  clearTimeout(state.retry);
  if (state.source) state.source.close();
  const params = new URLSearchParams({ token: state.token });
  if (state.lastEventId) params.set("last_event_id", state.lastEventId);
  const source = new EventSource(`/events?${params}`);
  state.source = source;
  setConnection("connecting");
  source.onopen = () => setConnection("live");
  source.onerror = () => {
    setConnection("reconnecting");
    // The browser retries a dropped stream by itself (with Last-Event-ID); a refused one
    // (a restarting server, an expired token) it gives up on: start over.
    if (source.readyState === EventSource.CLOSED) reconnectSoon();
  };
  for (const kind of KINDS) {
    source.addEventListener(kind, (event) => {
      state.lastEventId = event.lastEventId;
      upsert(JSON.parse(event.data));
    });
  }
}

function reconnectSoon() {
  clearTimeout(state.retry);
  state.retry = setTimeout(async () => {
    try {
      if (Date.now() > state.tokenExpires - 60_000 || state.source?.readyState === 2) {
        await freshToken();
      }
      connect();
    } catch (error) {
      if (error.status === 401) return showLogin("Please sign in again.");
      reconnectSoon();
    }
  }, RECONNECT_MS);
}

function setConnection(what) {
  const el = $("connection");
  el.dataset.state = what;
  el.textContent = what;
}

// Tokens expire: renew ahead of time so a reconnect never meets a dead one.
setInterval(() => {
  if (state.token && Date.now() > state.tokenExpires - 120_000) {
    freshToken().catch(() => {});
  }
}, 30_000);

// --- rows -------------------------------------------------------------------------------

function upsert(task) {
  const known = state.tasks.get(task.id);
  if (known && known.version >= task.version) return;
  state.tasks.set(task.id, task);
  let row = document.querySelector(`li[data-id="${CSS.escape(task.id)}"]`);
  if (!row) {
    row = $("task-template").content.firstElementChild.cloneNode(true);
    row.dataset.id = task.id;
    insertInOrder(row, task.id);
  }
  render(row, task);
  applyFilter();
}

function insertInOrder(row, id) {
  // Job ids sort by creation: newest first means descending.
  const list = $("tasks");
  for (const other of list.children) {
    if (other.dataset.id < id) return list.insertBefore(row, other);
  }
  list.appendChild(row);
}

function render(row, task) {
  row.dataset.status = task.status;
  const status = row.querySelector(".status");
  status.textContent = task.status.replace("_", " ").toLowerCase();
  row.querySelector(".what").textContent = task.action || "task";
  const cost = task.cost ? ` · ${task.cost.amount} ${task.cost.unit}` : "";
  row.querySelector(".meta").textContent =
    `${task.provider}${task.mode ? " " + task.mode : ""}${cost}`;
  row.querySelector(".prompt").textContent = task.final_prompt || task.prompt || "";
  const progress = row.querySelector("progress");
  progress.value = task.progress;
  progress.setAttribute("aria-label", `progress of ${task.action || "task"} ${task.id}`);
  row.querySelector(".percent").textContent = `${task.progress}%`;
  const fail = row.querySelector(".fail");
  fail.hidden = !task.fail_reason;
  fail.textContent = task.fail_reason || "";
  showImage(row.querySelector(".image"), task);
  const actions = row.querySelector(".actions");
  actions.setAttribute("aria-label", `actions on ${task.id}`);
  actions.replaceChildren(...(task.status === "SUCCESS" ? task.buttons : []).map((button) => {
    const el = document.createElement("button");
    el.type = "button";
    el.textContent = button.label || buttonName(button.custom_id) || button.emoji;
    el.title = button.custom_id;
    if (button.custom_id.startsWith("MJ::Inpaint::")) {
      // Vary (Region) needs a mask drawn on the image: only the API takes one ("mask")
      el.disabled = true;
      el.title = "Vary (Region) needs a mask: POST /tasks with \"mask\"";
    } else {
      el.addEventListener("click", () => act(task, button, el));
    }
    return el;
  }));
}

// Only images this service keeps are shown (the page's CSP allows no other host): the
// archived one, through a signed URL (an <img> sends no Authorization header).
function showImage(image, task) {
  const source = task.archived_image_url;
  image.hidden = !source;
  if (!source || image.dataset.source === source) return;
  image.dataset.source = source;
  signedImage(task.id, source).then((url) => {
    if (image.dataset.source !== source) return;
    image.src = url;
    image.alt = `result of ${task.prompt || task.action}`;
  }).catch(() => { delete image.dataset.source; });  // tried again at the next event
}

async function signedImage(id, source) {
  const known = state.images.get(id);
  if (known && known.source === source && known.expires > Date.now() + 60_000) return known.url;
  const answer = await api(`/tasks/${encodeURIComponent(id)}/images`);
  // the path on this page's own origin: the URL names the service as PUBLIC_BASE_URL (or the
  // worker) does, which may be another name for it (localhost, 127.0.0.1, an inner host)
  const signed = new URL(answer.image_url);
  const url = signed.pathname + signed.search;
  state.images.set(id, { source, url, expires: Date.now() + answer.expires_in * 1000 });
  return url;
}

// Buttons Midjourney labels with an emoji only get a name (a screen reader, or a machine
// without an emoji font, has nothing else to go by).
function buttonName(customId) {
  const id = customId.toLowerCase();
  if (id.includes("reroll")) return "Reroll";
  const pan = id.match(/pan_(left|right|up|down)/);
  if (pan) return `Pan ${pan[1]}`;
  return id.includes("outpaint") || id.includes("customzoom") ? "Zoom" : "";
}

function applyFilter() {
  const wanted = $("status-filter").value;
  let shown = 0;
  for (const row of $("tasks").children) {
    const visible = !wanted || row.dataset.status === wanted;
    row.hidden = !visible;
    if (visible) shown += 1;
  }
  $("count").textContent = `${shown} of ${state.tasks.size}`;
}

$("status-filter").addEventListener("change", applyFilter);

// --- submitting -------------------------------------------------------------------------

function fillProviders(info) {
  const select = $("provider");
  select.replaceChildren(...info.providers.map((p) => new Option(p.name, p.name)));
  if (info.default) select.value = info.default;
  fillModes();
}

function fillModes() {
  const provider = state.providers.find((p) => p.name === $("provider").value);
  const modes = provider ? provider.modes : [];
  $("mode").replaceChildren(new Option("default", ""), ...modes.map((m) => new Option(m, m)));
  $("mode").disabled = modes.length === 0;
}

$("provider").addEventListener("change", fillModes);

$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const typed = $("prompt").value;
  const body = { prompt: typed.trim(), provider: $("provider").value || undefined };
  if ($("mode").value) body.mode = $("mode").value;
  $("submit-button").disabled = true;
  try {
    upsert(await api("/tasks", { method: "POST", body }));
    // cleared only if it still holds what was sent: the next prompt, typed while this one
    // was on its way, stays
    if ($("prompt").value === typed) $("prompt").value = "";
    hideMessage();
  } catch (error) {
    showMessage(error.message);
  } finally {
    $("submit-button").disabled = false;
  }
});

async function act(task, button, el) {
  const body = { provider: task.provider, parent_id: task.id, custom_id: button.custom_id };
  if (button.custom_id.startsWith("MJ::CustomZoom::")) {
    // Midjourney's dialog: the prompt again, with the zoom (--zoom 1 to 2)
    const prompt = window.prompt("Custom Zoom: the prompt, with --zoom 1 to 2",
      `${task.final_prompt || task.prompt || ""} --zoom 1.5`.trim());
    if (prompt === null) return;
    body.prompt = prompt;
  }
  el.disabled = true;
  try {
    upsert(await api("/tasks", { method: "POST", body }));
    hideMessage();
  } catch (error) {
    showMessage(error.message);
  } finally {
    el.disabled = false;
  }
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = false;
}

function hideMessage() {
  $("message").hidden = true;
}

begin();
