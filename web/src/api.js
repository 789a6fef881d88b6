// The server's API as the page uses it: the key from the browser's storage in a header (never in
// a URL), OpenAI-shaped errors turned into plain words, and a streamed response's events.

const KEY = "llm-service.api-key";

export function getKey() {
  return localStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message, { code = null, retryAfter = null, dropped = false } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.dropped = dropped; // the connection went away: nothing the server said
  }
}

function headers(json) {
  const h = {};
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON (a proxy's page): the status line says it
  }
  const after = Number(response.headers.get("retry-after"));
  return new ApiError(response.status, message, { code, retryAfter: Number.isFinite(after) && after > 0 ? after : null });
}

export async function call(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The server cannot be reached.", { dropped: true });
  }
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// Every page of a list (OpenAI's `has_more` / `after` pagination).
export async function listAll(path, params = {}) {
  const out = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "100", ...params });
    if (after) query.set("after", after);
    const page = await call("GET", `${path}?${query}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.last_id;
  }
}

// POST /v1/responses with stream: true; calls onEvent for each event and resolves with the last.
export async function stream(body, onEvent, signal) {
  let response;
  try {
    response = await fetch("/v1/responses", {
      method: "POST",
      // behind several replicas, nginx sends a conversation's turns to the one that holds its
      // history in cache (deploy/nginx.conf routes on this header)
      headers: body.conversation ? { ...headers(true), "X-Session-Id": body.conversation } : headers(true),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The server cannot be reached.", { dropped: true });
  }
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "The connection to the server dropped before the answer ended.", { dropped: true });
    }
    if (chunk.done) break;
    buffer += chunk.value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data || data === "[DONE]") continue;
      last = JSON.parse(data);
      onEvent(last);
    }
  }
  const final = ["response.completed", "response.incomplete", "response.failed", "error"];
  if (!last || !final.includes(last.type)) {
    throw new ApiError(0, "The connection to the server dropped before the answer ended.", { dropped: true });
  }
  return last;
}

// What a person should read for an error.
export function describe(error) {
  if (error.dropped) return error.message;
  if (error.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${Math.ceil(error.retryAfter)} s.` : "";
    return `Too many requests: ${error.message}${wait}`;
  }
  if (error.status === 401) return `This server needs a valid API key: ${error.message}`;
  if (error.status === 503) return `The server cannot answer right now: ${error.message}`;
  return error.message || String(error);
}
