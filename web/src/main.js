// The chat page: conversations kept on the server (the Conversations API and its listing
// extension), answers streamed from the Responses API. No framework: the DOM in index.html, and
// functions that keep it in step with `state`.
import { ApiError, call, describe, getKey, listAll, setKey, stream } from "./api.js";
import { renderMarkdown } from "./render.js";

const $ = (id) => document.getElementById(id);

// settings kept per conversation, in its metadata (OpenAI's: up to 16 strings of 512 characters)
// (empty: the server's default, which is the model's own where it has one)
const DEFAULTS = { system: "", temperature: "", top_p: "", max_tokens: "1024" };

const state = {
  models: [],
  conversations: [],
  current: null, // the conversation shown, or null for a new one (created when its first message is sent)
  settings: { ...DEFAULTS },
  model: "",
  messages: [], // {id, role, text, status, stats?}
  running: null, // the AbortController of the answer being generated (or of the edit before it)
  view: 0, // which opening of a conversation is shown: an older one's late answers are dropped
  stats: new Map(), // item id -> this session's timings of that answer
};

// --------------------------------------------------------------------------- notices

function notice(text, kind = "error") {
  const banner = $("banner");
  $("banner-text").textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = !text;
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) {
    askForKey(describe(error));
  } else {
    notice(describe(error));
  }
}

// --------------------------------------------------------------------------- the API key

function askForKey(reason) {
  $("key-reason").textContent = reason || "Enter an API key for this server.";
  $("key-input").value = getKey();
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

function keyButton() {
  $("key-button").textContent = getKey() ? "API key ✓" : "API key";
}

// --------------------------------------------------------------------------- models

async function loadModels() {
  const list = await call("GET", "/v1/models");
  state.models = list.data.filter((m) => m.kind !== "embed"); // embedding models cannot chat
  const select = $("model");
  select.replaceChildren();
  for (const m of state.models) {
    const option = document.createElement("option");
    option.value = m.id;
    const what = m.variants ? "alias" : m.state;
    option.textContent = what && what !== "ready" ? `${m.id} (${what})` : m.id;
    select.append(option);
  }
  if (!state.models.some((m) => m.id === state.model)) state.model = state.models[0]?.id || "";
  select.value = state.model;
  modelState();
}

function modelState() {
  const m = state.models.find((x) => x.id === state.model);
  const note = $("model-state");
  if (!m) note.textContent = state.model ? `${state.model} is not served now` : "no chat model is served";
  else if (m.state === "loading") note.textContent = "loading: the first answer waits for it";
  else if (m.state === "lazy" || m.state === "unloaded") note.textContent = "not loaded: the first answer loads it";
  else note.textContent = "";
}

// --------------------------------------------------------------------------- conversations

async function loadConversations() {
  state.conversations = await listAll("/v1/conversations", { order: "desc" });
  drawConversations();
}

function title(c) {
  return c.metadata?.title || "New chat";
}

function drawConversations() {
  const list = $("conversations");
  const query = $("search").value.trim().toLowerCase();
  list.replaceChildren();
  for (const c of state.conversations) {
    if (query && !title(c).toLowerCase().includes(query)) continue;
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.className = state.current?.id === c.id ? "current" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = title(c);
    open.title = title(c);
    open.addEventListener("click", () => openConversation(c.id).catch(fail));
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "icon rename";
    rename.title = "Rename";
    rename.textContent = "✎";
    rename.addEventListener("click", () => startRename(li, c));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "icon delete";
    remove.title = "Delete";
    remove.textContent = "×";
    remove.addEventListener("click", () => deleteConversation(c).catch(fail));
    li.append(open, rename, remove);
    list.append(li);
  }
  if (!list.children.length) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = query ? "No conversation matches." : "No conversations yet.";
    list.append(empty);
  }
}

function startRename(li, c) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = title(c);
  input.maxLength = 200;
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const name = input.value.trim();
    if (save && name && name !== title(c)) {
      try {
        Object.assign(c, await call("POST", `/v1/conversations/${c.id}`, { metadata: { ...c.metadata, title: name } }));
        if (state.current?.id === c.id) state.current = c;
      } catch (e) {
        fail(e);
      }
    }
    drawConversations();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(c) {
  if (!confirm(`Delete "${title(c)}"? It is deleted on the server, for every browser.`)) return;
  await call("DELETE", `/v1/conversations/${c.id}`);
  state.conversations = state.conversations.filter((x) => x.id !== c.id);
  if (state.current?.id === c.id) newConversation();
  drawConversations();
}

function newConversation() {
  stop();
  state.view += 1;
  state.current = null;
  state.messages = [];
  state.settings = { ...DEFAULTS };
  drawSettings();
  drawMessages();
  drawConversations();
  history.replaceState(null, "", location.pathname);
  document.body.classList.remove("sidebar-open");
  $("input").focus();
}

async function openConversation(id) {
  stop();
  const view = ++state.view;
  const c = await call("GET", `/v1/conversations/${id}`);
  if (view !== state.view) return; // another was opened meanwhile
  state.current = c;
  state.settings = { ...DEFAULTS };
  for (const k of Object.keys(DEFAULTS)) if (c.metadata?.[k] !== undefined) state.settings[k] = c.metadata[k];
  if (c.metadata?.model && state.models.some((m) => m.id === c.metadata.model)) state.model = c.metadata.model;
  $("model").value = state.model;
  modelState();
  drawSettings();
  await loadMessages(c);
  drawConversations();
  history.replaceState(null, "", `#${id}`);
  document.body.classList.remove("sidebar-open");
}

// Shows conversation `c`'s messages as the server has them (if it is still the one shown).
async function loadMessages(c, stats = null) {
  const items = await listAll(`/v1/conversations/${c.id}/items`, { order: "asc" });
  if (state.current?.id !== c.id) return;
  const last = items.findLast((i) => i.type === "message" && i.role === "assistant");
  if (stats && last) state.stats.set(last.id, stats); // this session's timings of the answer just given
  state.messages = items
    .filter((i) => i.type === "message" && (i.role === "user" || i.role === "assistant"))
    .map((i) => ({
      id: i.id,
      role: i.role,
      status: i.status,
      text: i.content.map((p) => p.text ?? p.refusal ?? "").join(""),
      stats: state.stats.get(i.id),
    }));
  drawMessages();
}

// The conversation's metadata with the page's settings (other clients' keys are kept).
function metadata() {
  return { ...(state.current?.metadata || {}), model: state.model, ...state.settings };
}

async function saveSettings() {
  if (!state.current) return; // kept with the conversation when its first message creates it
  const c = await call("POST", `/v1/conversations/${state.current.id}`, { metadata: metadata() });
  state.current = c;
  state.conversations = state.conversations.map((x) => (x.id === c.id ? c : x));
}

// --------------------------------------------------------------------------- settings

function drawSettings() {
  $("system").value = state.settings.system;
  $("temperature").value = state.settings.temperature;
  $("top_p").value = state.settings.top_p;
  $("max_tokens").value = state.settings.max_tokens;
}

function readSettings() {
  state.settings = {
    system: $("system").value,
    temperature: $("temperature").value,
    top_p: $("top_p").value,
    max_tokens: $("max_tokens").value,
  };
}

// --------------------------------------------------------------------------- messages

function drawMessages() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.messages.length) {
    const hello = document.createElement("div");
    hello.className = "hello";
    hello.textContent = state.model ? `Ask ${state.model} anything.` : "No chat model is served.";
    box.append(hello);
  }
  const lastAssistant = state.messages.findLastIndex((m) => m.role === "assistant");
  state.messages.forEach((m, index) => box.append(messageElement(m, index, index === lastAssistant)));
  box.scrollTop = box.scrollHeight;
}

function messageElement(m, index, last) {
  const el = document.createElement("article");
  el.className = `message ${m.role}`;
  el.dataset.role = m.role;
  if (m.id) el.dataset.id = m.id;
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant") renderMarkdown(body, m.text);
  else body.textContent = m.text; // the user's own words, as typed
  el.append(body);
  const foot = document.createElement("div");
  foot.className = "foot";
  if (m.status === "incomplete") foot.append(tag("incomplete", "incomplete"));
  if (m.stats) foot.append(tag(statsText(m.stats), "stats"));
  if (!state.running && m.role === "user") foot.append(action("Edit", () => editMessage(el, index)));
  if (!state.running && m.role === "assistant" && last) foot.append(action("Regenerate", () => regenerate()));
  el.append(foot);
  return el;
}

function tag(text, className) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function action(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `action ${label.toLowerCase()}`;
  b.textContent = label;
  b.addEventListener("click", () => Promise.resolve(onClick()).catch(fail));
  return b;
}

function statsText(s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
  if (s.tps !== null) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.usage) {
    const cached = s.usage.input_tokens_details?.cached_tokens;
    parts.push(`${s.usage.input_tokens} in${cached ? ` (${cached} cached)` : ""} · ${s.usage.output_tokens} out`);
  }
  return parts.join(" · ");
}

function editMessage(el, index) {
  const m = state.messages[index];
  const area = document.createElement("textarea");
  area.className = "edit-input";
  area.value = m.text;
  const save = action("Send", async () => {
    const text = area.value.trim();
    if (text) await send(text, index);
  });
  const cancel = action("Cancel", () => drawMessages());
  const foot = document.createElement("div");
  foot.className = "foot";
  foot.append(save, cancel);
  el.replaceChildren(area, foot);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      save.click();
    } else if (e.key === "Escape") {
      drawMessages();
    }
  });
  area.focus();
}

// Deletes conversation `c`'s items from message `index` on (newest first), on the server too.
async function truncateFrom(c, index) {
  const gone = state.messages[index];
  const items = await listAll(`/v1/conversations/${c.id}/items`, { order: "asc" });
  const first = items.findIndex((i) => i.id === gone?.id);
  for (const item of first < 0 ? [] : items.slice(first).reverse()) {
    await call("DELETE", `/v1/conversations/${c.id}/items/${item.id}`);
  }
  state.messages = state.messages.slice(0, index);
}

async function regenerate() {
  const index = state.messages.findLastIndex((m) => m.role === "user");
  if (index >= 0) await send(state.messages[index].text, index);
}

// --------------------------------------------------------------------------- sending

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("running", on);
}

function stop() {
  if (state.running) state.running.abort();
}

async function ensureConversation(text) {
  if (state.current) return state.current;
  // 60 characters (code points: a cut emoji would be invalid JSON)
  const name = Array.from(text.replace(/\s+/g, " ")).slice(0, 60).join("");
  const c = await call("POST", "/v1/conversations", { metadata: { ...metadata(), title: name } });
  state.current = c;
  state.conversations.unshift(c);
  history.replaceState(null, "", `#${c.id}`);
  drawConversations();
  return c;
}

// Sends `text` as the next user message; `from`: first drop the conversation's messages from that
// index on (an edit, a regenerate). One at a time: the page is busy from the first step.
async function send(text, from = null) {
  if (state.running || !text) return;
  if (!state.model) {
    notice("No chat model is served.");
    return;
  }
  notice("");
  readSettings();
  const controller = new AbortController();
  state.running = controller;
  busy(true);
  const user = { role: "user", text };
  const answer = { role: "assistant", text: "", status: "in_progress" };
  const box = $("messages");
  const began = performance.now();
  let first = null;
  let pending = false;
  let c = state.current;
  let responseId = null;
  let failure = null;
  let answerBody = null;
  const draw = () => {
    pending = false;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    renderMarkdown(answerBody, answer.text);
    if (atBottom) box.scrollTop = box.scrollHeight;
  };
  try {
    if (from !== null && c) await truncateFrom(c, from);
    state.messages.push(user, answer);
    drawMessages();
    const answerEl = box.lastElementChild;
    answerBody = answerEl.querySelector(".body");
    answerEl.classList.add("streaming");
    c = await ensureConversation(text);
    const s = state.settings;
    const body = {
      model: state.model,
      conversation: c.id,
      input: [{ role: "user", content: text }],
      ...(s.system.trim() ? { instructions: s.system } : {}),
      ...(s.temperature !== "" ? { temperature: Number(s.temperature) } : {}),
      ...(s.top_p !== "" ? { top_p: Number(s.top_p) } : {}),
      ...(s.max_tokens !== "" ? { max_output_tokens: Number(s.max_tokens) } : {}),
    };
    const last = await stream(
      body,
      (event) => {
        if (event.type === "response.created") responseId = event.response.id;
        if (event.type === "response.output_text.delta") {
          if (first === null) first = performance.now();
          answer.text += event.delta;
          if (!pending) {
            pending = true;
            requestAnimationFrame(draw);
          }
        }
      },
      controller.signal,
    );
    if (last.type === "error") throw new ApiError(500, last.message || "The answer failed.");
    const response = last.response;
    if (last.type === "response.failed") throw new ApiError(500, response.error?.message || "The answer failed.");
    const ended = performance.now();
    const out = response.usage?.output_tokens ?? null;
    answer.stats = {
      ttft: first === null ? null : first - began,
      tps: out && first !== null && ended > first && out > 1 ? (out - 1) / ((ended - first) / 1000) : null,
      usage: response.usage,
    };
    if (response.status === "incomplete") {
      notice(`The answer was cut: ${response.incomplete_details?.reason || "incomplete"} (raise max tokens in Settings).`, "info");
    }
  } catch (e) {
    if (e.name === "AbortError") {
      // stopped: the server ends the generation when the stream closes; what was said is kept
      if (!c || !(await keepStopped(c, responseId, text, answer.text).catch(fail))) giveBack(text);
    } else {
      failure = e;
      state.messages = state.messages.filter((m) => m !== answer && m !== user);
      giveBack(text);
      fail(e);
    }
  } finally {
    state.running = null;
    busy(false);
    // the server's view of the conversation (its items' ids), unless it cannot be reached
    if (c && !failure?.dropped) {
      await loadMessages(c, answer.stats).catch((e) => {
        fail(e);
        drawMessages();
      });
    } else {
      drawMessages();
    }
    $("input").focus();
    document.body.dataset.sent = String(Number(document.body.dataset.sent || 0) + 1); // for scripts: one more ended
  }
}

// The message that could not be sent goes back into the box, to send again.
function giveBack(text) {
  if (!$("input").value) $("input").value = text;
}

// After a stop: the server keeps only answers that ended, so the user's message and the answer so
// far are added to the conversation, unless the answer ended anyway (the server kept it) or
// nothing was said. Says whether the message is in the conversation.
async function keepStopped(c, responseId, text, partial) {
  let status = "cancelled";
  for (let tries = 0; responseId && tries < 20; tries++) {
    status = (await call("GET", `/v1/responses/${responseId}`)).status;
    if (status !== "queued" && status !== "in_progress") break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  if (status === "completed" || status === "incomplete") return true;
  if (!partial) return false;
  await call("POST", `/v1/conversations/${c.id}/items`, {
    items: [
      { type: "message", role: "user", content: text },
      { type: "message", role: "assistant", content: partial, status: "incomplete" },
    ],
  });
  return true;
}

// --------------------------------------------------------------------------- wiring

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.running) return;
    $("input").value = "";
    grow();
    send(text);
  });
  const grow = () => {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  };
  $("input").addEventListener("input", grow);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.running) {
      e.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("search").addEventListener("input", drawConversations);
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("messages").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    modelState();
    saveSettings().catch(fail);
  });
  $("settings-button").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
  });
  for (const id of ["system", "temperature", "top_p", "max_tokens"]) {
    $(id).addEventListener("change", () => {
      readSettings();
      saveSettings().catch(fail);
    });
  }
  $("key-button").addEventListener("click", () => askForKey("The key is kept in this browser's storage and sent only to this server."));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("key-input").value.trim());
    $("key-dialog").close();
    keyButton();
    start();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    $("key-input").value = "";
    keyButton();
  });
  $("notice-close").addEventListener("click", () => notice(""));
}

async function start() {
  notice("");
  try {
    await loadModels();
    await loadConversations();
    const id = location.hash.slice(1);
    if (id && state.conversations.some((c) => c.id === id)) await openConversation(id);
    else drawMessages();
  } catch (e) {
    fail(e);
  }
}

// a key may be needed before anything is shown: the models' list says so with a 401
keyButton();
wire();
drawSettings();
start();
