// Requests to this server: JSON in and out, OpenAI's error shape, and the page's API key.
//
// A page names its key once (`useKey`); every request then carries it as `Authorization:
// Bearer`, and when the server refuses the key the person is asked for one and the request is
// sent again, so whatever the page was loading goes on once the right key is in. Sending it
// again is safe for any method: a refused key is refused before the request does anything.

/** A failed request, carrying the message of OpenAI's error shape when the server sent one. */
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

let apiKey = null; // the page's ApiKey (apikey.js), or null: requests go without a key

/** Send `key`'s secret with every request, and let it ask for another when refused. */
export function useKey(key) {
  apiKey = key;
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

/** `fetch` with the key; a refused key asks for another and tries again. */
async function send(path, init) {
  for (;;) {
    const secret = apiKey?.secret ?? null;
    const headers = new Headers(init.headers);
    if (secret) headers.set("Authorization", `Bearer ${secret}`);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("Cannot reach the server.", 0);
    }
    if (!apiKey?.refuses(response.status)) return response;
    const refusal = await errorFrom(response);
    if (!(await apiKey.replace(secret, refusal.message))) throw refusal;
  }
}

/** A JSON request: the parsed answer (null for 204), or an ApiError. */
export async function request(method, path, body, signal) {
  const init = { method, headers: { Accept: "application/json" }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await send(path, init);
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

/** Open an event stream: the Response once the server answered 2xx, or an ApiError. */
export async function openEventStream(path, init) {
  // no-store: a resumed read must come from the server, never from a cache.
  const response = await send(path, { ...init, cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  return response;
}
