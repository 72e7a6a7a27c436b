// The HTTP API the page talks to: models, conversations and the answers' event streams.
// Every path is relative, so the page keeps working when the app is mounted under a prefix.

/** A failed request, carrying the message of OpenAI's error shape when the server sent one. */
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    else if (body && typeof body.detail === "string") message = body.detail;
  } catch {
    // Not JSON (a proxy's HTML page, say): the status line is the best we have.
  }
  return new ApiError(message, response.status);
}

async function request(method, path, body, signal) {
  const init = { method, headers: { Accept: "application/json" }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("Cannot reach the server.", 0);
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

const conversation = (id) => `api/conversations/${encodeURIComponent(id)}`;

/** Model cards; a local model that cannot answer has `status: "unavailable"` and a `status_reason`. */
export const listModels = async () => (await request("GET", "v1/models")).data;

/** One page, newest first; pass the page's `next_cursor` as `after` for the next one. */
export const listConversations = (after = null, limit = 50) =>
  request("GET", `api/conversations?limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);

export const createConversation = (fields) => request("POST", "api/conversations", fields);
export const getConversation = (id, signal) => request("GET", conversation(id), undefined, signal);
export const renameConversation = (id, title) => request("PATCH", conversation(id), { title });
export const deleteConversation = (id) => request("DELETE", conversation(id));
export const stopGeneration = (id) => request("POST", `${conversation(id)}/stop`, {});

/** Open an event stream: the Response once the server answered 2xx, or an ApiError. */
async function openEventStream(path, init) {
  let response;
  try {
    // no-store: a resumed read must come from the server, never from a cache.
    response = await fetch(path, { ...init, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("Cannot reach the server.", 0);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/**
 * Start an answer: `kind` is "messages" (send `content`) or "regenerate". The response's
 * events are read by `followAnswer` (answers.js); its `X-Tokenrelay-Stream` header names the
 * answer's event log, to resume with `openStream` after a drop.
 */
export const openAnswer = (conversationId, kind, body, signal) =>
  openEventStream(`${conversation(conversationId)}/${kind}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });

/**
 * Read an answer's event log: from its start, or every event after `lastEventId`
 * (`<stream id>:<n>`), then the live rest. A 404 means the log is gone (expired, or kept
 * only by a server that restarted).
 */
export const openStream = (streamId, lastEventId, signal) =>
  openEventStream(
    `api/streams/${encodeURIComponent(streamId)}` +
      (lastEventId ? `?last_event_id=${encodeURIComponent(lastEventId)}` : ""),
    { method: "GET", headers: { Accept: "text/event-stream" }, signal },
  );
