// The HTTP API the page talks to: models, conversations and the answers' event streams.
// Every path is relative, so the page keeps working when the app is mounted under a prefix.

import { openEventStream, request } from "./http.js";

export { ApiError } from "./http.js";

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
