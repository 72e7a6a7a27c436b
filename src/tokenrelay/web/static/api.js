// The HTTP API the page talks to: models, conversations and the chat streams.
// Every path is relative, so the page keeps working when the app is mounted under a prefix.

import { readEventStream } from "./sse.js";

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
export const getConversation = (id) => request("GET", conversation(id));
export const renameConversation = (id, title) => request("PATCH", conversation(id), { title });
export const deleteConversation = (id) => request("DELETE", conversation(id));
export const stopGeneration = (id) => request("POST", `${conversation(id)}/stop`, {});

/**
 * Stream an answer: `kind` is "messages" (send `content`) or "regenerate".
 * Yields `{type: "ids", user, assistant}`, `{type: "delta", text}`, `{type: "error", message}`
 * and finally `{type: "done"}` if the server finished the stream properly; a stream that ends
 * without `[DONE]` (a dropped connection) just ends.
 */
export async function* streamAnswer(conversationId, kind, body, signal) {
  let response;
  try {
    response = await fetch(`${conversation(conversationId)}/${kind}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("Cannot reach the server.", 0);
  }
  if (!response.ok) throw await errorFrom(response);
  for await (const event of readEventStream(response)) {
    if (event.data === "[DONE]") {
      yield { type: "done" };
      return;
    }
    let payload;
    try {
      payload = JSON.parse(event.data);
    } catch {
      continue; // not ours to interpret
    }
    if (payload === null || typeof payload !== "object") continue;
    if (payload.error) {
      yield { type: "error", message: String(payload.error.message || "The model failed to answer.") };
    } else if (payload.user_message || payload.assistant_message) {
      yield { type: "ids", user: payload.user_message, assistant: payload.assistant_message };
    } else if (Array.isArray(payload.choices)) {
      const text = payload.choices[0]?.delta?.content;
      if (typeof text === "string" && text.length > 0) yield { type: "delta", text };
    }
  }
}
