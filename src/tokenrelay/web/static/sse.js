// Server-Sent Events, parsed as the HTML standard says ("Interpreting an event stream").
// The chat streams are POST responses, so EventSource cannot read them; fetch hands us the
// bytes and this module turns them into events. It is the page's only SSE parser.

/**
 * Incremental parser: feed it decoded text as it arrives, get back the events it completed.
 * Lines end in CRLF, LF or CR; a blank line dispatches; `:` starts a comment; an event without
 * any `data:` line is dropped; an incomplete event at the end of the stream is discarded.
 */
export class EventStreamParser {
  #buffer = "";
  #data = [];
  #event = "";
  #lastEventId = "";
  #started = false;

  /** @returns {{event: string, data: string, id: string}[]} */
  push(text) {
    if (!this.#started && text.length > 0) {
      this.#started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // one leading BOM is ignored
    }
    this.#buffer += text;
    const events = [];
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.#buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF split across two reads.
      if (match[0] === "\r" && match.index === this.#buffer.length - 1) break;
      const event = this.#line(this.#buffer.slice(start, match.index));
      if (event) events.push(event);
      start = lineEnd.lastIndex;
    }
    this.#buffer = this.#buffer.slice(start);
    return events;
  }

  #line(line) {
    if (line === "") return this.#dispatch();
    if (line.startsWith(":")) return null; // comment, e.g. the server's `: ping`
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.#data.push(value);
    else if (field === "event") this.#event = value;
    else if (field === "id" && !value.includes("\0")) this.#lastEventId = value;
    // `retry` only matters to EventSource's reconnection; other fields are ignored.
    return null;
  }

  #dispatch() {
    const hadData = this.#data.length > 0;
    const event = { event: this.#event || "message", data: this.#data.join("\n"), id: this.#lastEventId };
    this.#data = [];
    this.#event = "";
    return hadData ? event : null;
  }
}

/**
 * Yield the events of a fetch Response whose body is `text/event-stream`. `onBytes` is called
 * whenever bytes arrive, comments included, so that a caller can tell a quiet stream (the
 * server pings it) from a dead connection.
 */
export async function* readEventStream(response, onBytes = null) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new EventStreamParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onBytes?.();
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.push(decoder.decode());
  } finally {
    // Leaving the loop early (a consumer's break or an error) must still close the connection.
    reader.cancel().catch(() => {});
  }
}
