// An answer streamed by the server, read across dropped connections.
//
// The server writes every answer to a numbered event log: each event carries
// `id: <stream id>:<n>` and the response names the log in `X-Tokenrelay-Stream`. When the
// connection drops, `GET api/streams/{id}?last_event_id=<last id>` gives the events after the
// last one this page saw, then the live rest, so the text continues exactly where it stopped.
// The answer itself goes on on the server meanwhile (for a grace period with no reader).

import { ApiError, openStream } from "./api.js";
import { readEventStream } from "./sse.js";

/** How hard to try before giving up on a connection; every wait is bounded. */
export const RECONNECT = {
  attempts: 8, // connections tried in a row without receiving an event
  firstDelay: 250, // ms before the first one, doubled each time...
  maxDelay: 4000, // ...up to this: 8 attempts span about 20 s, past the server's 15 s grace
  offlineWait: 120_000, // ms to wait for the browser to come back online, not counted as attempts
  stallTimeout: 60_000, // ms without a byte (the server pings every 15 s) before a connection counts as dead
};

/** The connection was lost and could not be re-established; the answer may still be running. */
export class ConnectionLost extends Error {
  constructor() {
    super("The connection to the server was lost.");
    this.name = "ConnectionLost";
  }
}

/**
 * Read an answer from `open(signal)` (a Response: the POST that started it, or its log read
 * from the start) and on across reconnections. Yields:
 *   `{type: "ids", user, assistant}`   the stored messages (the POST's preamble only)
 *   `{type: "delta", text}`            the next piece of the answer, each piece exactly once
 *   `{type: "error", message}`         the answer failed; the stream ends after it
 *   `{type: "reconnecting"}`, `{type: "resumed"}`   the connection dropped, and came back
 *   `{type: "done", finished}`         the end: `[DONE]`, or a clean end after a finish reason;
 *                                      `finished` says whether a finish reason came (an answer
 *                                      stopped elsewhere ends with `[DONE]` and none)
 *   `{type: "gone"}`                   the log no longer exists (expired, or the server restarted)
 * Throws what `open` throws (an ApiError, or an AbortError when `signal` aborts), an ApiError
 * when the server refuses a resume, and ConnectionLost when no connection could be made again.
 */
export async function* followAnswer(open, signal) {
  // Where the page is in the log, and whether a finish reason came (it may precede a drop).
  const position = { streamId: null, lastId: null, seq: -1, finished: false };
  let connection = new Connection(signal);
  let response;
  try {
    response = await open(connection.signal);
  } catch (failure) {
    connection.close();
    throw failure;
  }
  position.streamId = response.headers.get("X-Tokenrelay-Stream");
  let failures = 0;
  for (;;) {
    const round = { progressed: false, failed: false, done: false };
    try {
      yield* readRound(response, connection, position, round);
      if (round.done || round.failed) return; // [DONE], or an error event ended the answer
      if (position.finished) {
        yield { type: "done", finished: true }; // an upstream that sends no [DONE]
        return;
      }
    } catch (failure) {
      if (signal?.aborted) throw failure;
      if (round.failed) return; // the answer had already failed: nothing more to read
      // Otherwise a network error, or our own stall timeout: the answer goes on on the server.
    } finally {
      connection.close();
    }
    if (round.progressed) failures = 0;
    if (position.streamId === null) throw new ConnectionLost(); // dropped before naming its log
    yield { type: "reconnecting" };
    for (;;) {
      failures += 1;
      if (failures > RECONNECT.attempts) throw new ConnectionLost();
      await pause(Math.min(RECONNECT.firstDelay * 2 ** (failures - 1), RECONNECT.maxDelay), signal);
      if (navigator.onLine === false) await untilOnline(signal);
      connection = new Connection(signal);
      try {
        response = await openStream(position.streamId, position.lastId, connection.signal);
        break;
      } catch (failure) {
        connection.close();
        if (failure.name === "AbortError") throw failure;
        if (failure.status === 404) {
          yield { type: "gone" };
          return;
        }
        // 0 (no answer), a 5xx or a proxy's 502 are worth another try; a 4xx is not.
        if (failure.status >= 400 && failure.status < 500) throw failure;
      }
    }
    yield { type: "resumed" };
  }
}

/** One connection's abort signal: aborted with the page's `signal`, or on its own when it stalls. */
class Connection {
  #controller = new AbortController();
  #outer;
  #forward = () => this.#controller.abort(this.#outer.reason);

  constructor(outer) {
    this.#outer = outer;
    if (outer?.aborted) this.#forward();
    else outer?.addEventListener("abort", this.#forward);
  }

  get signal() {
    return this.#controller.signal;
  }

  abort() {
    this.#controller.abort();
  }

  /** Stop listening to the page's signal: the connection is over. */
  close() {
    this.#outer?.removeEventListener("abort", this.#forward);
  }
}

/** The events of one connection after `position`, translated; `round` says how it ended. */
async function* readRound(response, connection, position, round) {
  // A connection that stays silent past the server's heartbeat is dead even when no error
  // says so (a laptop that slept, a NAT that forgot us): abort it, and resume.
  let lastBytes = performance.now();
  const watchdog = setInterval(() => {
    if (performance.now() - lastBytes > RECONNECT.stallTimeout) connection.abort();
  }, RECONNECT.stallTimeout / 4);
  try {
    for await (const event of readEventStream(response, () => (lastBytes = performance.now()))) {
      if (event.id) {
        const colon = event.id.lastIndexOf(":");
        const seq = Number(event.id.slice(colon + 1));
        if (seq <= position.seq) continue; // already shown before the drop
        position.seq = seq;
        position.lastId = event.id;
        position.streamId ??= event.id.slice(0, colon);
        round.progressed = true;
      }
      if (event.data === "[DONE]") {
        round.done = true;
        yield { type: "done", finished: position.finished };
        return;
      }
      const item = translate(event.data, position, round);
      if (item) yield item;
    }
  } finally {
    clearInterval(watchdog);
  }
}

/** One event's data as an item for the page, or null for what it does not show. */
function translate(data, position, round) {
  let payload;
  try {
    payload = JSON.parse(data);
  } catch {
    return null; // not ours to interpret
  }
  if (payload === null || typeof payload !== "object") return null;
  if (payload.error) {
    round.failed = true;
    return { type: "error", message: String(payload.error.message || "The model failed to answer.") };
  }
  if (payload.user_message || payload.assistant_message) {
    return { type: "ids", user: payload.user_message, assistant: payload.assistant_message };
  }
  if (Array.isArray(payload.choices)) {
    const choice = payload.choices[0];
    if (choice?.finish_reason) position.finished = true;
    const text = choice?.delta?.content;
    if (typeof text === "string" && text.length > 0) return { type: "delta", text };
  }
  return null;
}

/** Wait `ms`, or until `signal` aborts (then throw its reason). */
function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const abort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", abort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", abort, { once: true });
  });
}

/** Wait until the browser is online again (at most `RECONNECT.offlineWait`), or `signal` aborts. */
function untilOnline(signal) {
  return new Promise((resolve, reject) => {
    const finish = (settle) => {
      clearTimeout(timer);
      window.removeEventListener("online", online);
      signal?.removeEventListener("abort", abort);
      settle();
    };
    const online = () => finish(resolve);
    const abort = () => finish(() => reject(signal.reason));
    const timer = setTimeout(online, RECONNECT.offlineWait);
    window.addEventListener("online", online);
    signal?.addEventListener("abort", abort);
    if (signal?.aborted) abort();
  });
}
