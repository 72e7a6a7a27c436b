// The chat page: a conversation list, one open conversation, and the answers streaming into it.
// Plain ES modules, no build step; everything it loads ships in static/.

import { ConnectionLost, followAnswer } from "./answers.js";
import * as api from "./api.js";
import { ApiKey } from "./apikey.js";
import { useKey } from "./http.js";
import { renderMarkdown } from "./markdown.js";

const $ = (selector) => document.querySelector(selector);

const ui = {
  sidebar: $("#sidebar"),
  backdrop: $("#backdrop"),
  menu: $("#menu"),
  newChat: $("#new-chat"),
  list: $("#conversations"),
  more: $("#more"),
  title: $("#title"),
  model: $("#model"),
  scroller: $("#scroller"),
  messages: $("#messages"),
  empty: $("#empty"),
  system: $("#system"),
  systemText: $("#system-text"),
  form: $("#composer"),
  prompt: $("#prompt"),
  send: $("#send"),
  stop: $("#stop"),
  toast: $("#toast"),
  forgetKey: $("#forget-key"),
};

// A gateway key for the chat; the usage page keeps the admin key apart (usage.js), so the
// most powerful key is never sent with chat requests.
const key = new ApiKey("tokenrelay.key", {
  title: "This server needs a key",
  label: "API key",
  intro: "Enter your API key (tr-…). The server’s admin makes one with “tokenrelay keys create”.",
});
useKey(key);

const STATUS_TEXT = {
  stopped: "Stopped",
  error: "Error",
  interrupted: "Interrupted: the answer was cut off before it finished",
  disconnected: "Connection lost: reload the page to follow the answer",
};
const SETTLE_TIMEOUT = 10_000; // ms to wait for the server to say how an answer ended

const state = {
  conversations: [], // newest first, as the server lists them
  hasMore: false,
  nextCursor: null,
  current: null, // the open conversation, or null for a new chat
  views: [], // MessageView of the open conversation, in order
  generations: new Map(), // conversation id -> the answer this tab is reading into it
  opening: 0, // guards against a slow response overwriting a newer navigation
  creating: false, // a new conversation is being created for the first question
  stickToBottom: true,
};

// -- messages --------------------------------------------------------------------------------

const viewOf = new WeakMap();

/** One message on screen; an assistant's text is Markdown, re-rendered at most once a frame. */
class MessageView {
  constructor({ id = null, role, content = "", status = "complete", error = null }) {
    this.id = id;
    this.role = role;
    this.text = content;
    this.frame = 0;

    this.el = document.createElement("article");
    this.el.className = `message message-${role}`;
    this.body = document.createElement("div");
    this.body.className = "message-body";
    this.content = document.createElement("div");
    this.content.className = role === "user" ? "content user-text" : "content markdown";
    this.statusLine = document.createElement("div");
    this.statusLine.className = "message-status";
    this.statusLine.setAttribute("role", "status");
    this.actions = document.createElement("div");
    this.actions.className = "message-actions";
    this.actions.append(actionButton("copy", "Copy", ICONS.copy));
    if (role === "assistant") {
      this.regenerate = actionButton("regenerate", "Regenerate", ICONS.regenerate);
      this.actions.append(this.regenerate);
    }
    this.body.append(this.content, this.statusLine, this.actions);
    this.el.append(this.body);
    viewOf.set(this.el, this);
    this.setId(id);
    this.setStatus(status, error);
    this.render();
  }

  setId(id) {
    this.id = id;
    if (id) this.el.dataset.id = id;
  }

  append(text) {
    this.text += text;
    if (!this.frame) {
      // Tokens can arrive far faster than the screen refreshes: parse once per frame at most.
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  /** Draw now whatever text is still waiting for its frame. */
  flush() {
    if (this.frame) this.render();
  }

  render() {
    if (this.frame) {
      cancelAnimationFrame(this.frame);
      this.frame = 0;
    }
    if (this.role === "user") this.content.textContent = this.text;
    else this.content.replaceChildren(renderMarkdown(this.text));
    followBottom();
  }

  setStatus(status, error = null) {
    this.status = status;
    this.el.dataset.status = status;
    delete this.el.dataset.reconnecting;
    this.el.setAttribute("aria-busy", String(status === "streaming"));
    let text = STATUS_TEXT[status] || "";
    if (status === "error" && error) text = `Error: ${error}`;
    this.statusLine.textContent = text;
    this.statusLine.hidden = text === "";
  }

  /** While a dropped connection is being re-established: a quiet note, the answer stays. */
  setReconnecting(reconnecting) {
    if (reconnecting) this.el.dataset.reconnecting = "true";
    else delete this.el.dataset.reconnecting;
    this.statusLine.textContent = reconnecting ? "Reconnecting…" : "";
    this.statusLine.hidden = !reconnecting;
  }
}

function actionButton(action, label, icon) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-button";
  button.dataset.action = action;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.innerHTML = icon; // our own constant SVG, never model output
  return button;
}

const ICONS = {
  copy: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a2 2 0 0 1 2-2h10"/></svg>',
  regenerate: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M20 11a8 8 0 1 0-2.3 5.7"/><path d="M20 4v7h-7"/></svg>',
  rename: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16z"/></svg>',
  delete: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/></svg>',
};

function addView(view) {
  state.views.push(view);
  ui.messages.append(view.el);
  refreshMessageChrome();
  followBottom();
  return view;
}

/** Only the last answer can be regenerated, and only when nothing is streaming into it. */
function refreshMessageChrome() {
  const busy = isBusy();
  const lastAssistant = state.views.findLast((view) => view.role === "assistant");
  for (const view of state.views) {
    if (view.regenerate) view.regenerate.hidden = busy || view !== lastAssistant;
  }
  ui.empty.hidden = state.views.length > 0;
}

let autoScrollTop = -1;

function followBottom() {
  if (!state.stickToBottom) return;
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  autoScrollTop = ui.scroller.scrollTop;
}

ui.scroller.addEventListener("scroll", () => {
  // Our own scroll's event arrives a frame later, when more text may have pushed the bottom
  // further down: only a scroll the reader made decides whether to keep following.
  if (Math.abs(ui.scroller.scrollTop - autoScrollTop) < 2) return;
  const gap = ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight;
  // Reading an earlier part of the answer pauses autoscroll; scrolling back down resumes it.
  state.stickToBottom = gap < 48;
});

// -- generations -----------------------------------------------------------------------------

/** Stream a new answer into a new assistant message: `kind` is "messages" or "regenerate". */
async function generate(conversationId, kind, body, userView) {
  const view = new MessageView({ role: "assistant", status: "streaming" });
  const generation = startGeneration(conversationId, view, userView);
  if (state.current?.id === conversationId) {
    state.stickToBottom = true;
    addView(view);
  }
  refreshComposer();
  const open = (signal) => api.openAnswer(conversationId, kind, body, signal);
  await readAnswer(generation, followAnswer(open, generation.controller.signal));
}

/**
 * Follow an answer the server is writing that this tab did not start (after a reload, or from
 * another tab) in `view`, which shows the stored text. That text lags up to a second behind,
 * so the answer is read from its log's start and its events replace it.
 */
function resumeAnswer(conversationId, view, streamId) {
  const generation = startGeneration(conversationId, view, null);
  const open = (signal) => api.openStream(streamId, null, signal);
  readAnswer(generation, followAnswer(open, generation.controller.signal), { resumed: true });
}

function startGeneration(conversationId, view, userView) {
  const generation = { conversationId, view, userView, controller: new AbortController(), stopping: false };
  state.generations.set(conversationId, generation);
  view.setStatus("streaming");
  return generation;
}

/** Show an answer's items (see answers.js) in its view, until the answer ends. */
async function readAnswer(generation, items, { resumed = false } = {}) {
  const { conversationId, view, userView } = generation;
  let status = "interrupted";
  let error = null;
  let stored = null; // ask the server: "status" (how it ended) or "message" (its saved copy)
  let fresh = resumed; // the view still shows the stored text, to be replaced by the log's
  try {
    for await (const item of items) {
      if (fresh && (item.type === "delta" || item.type === "error" || item.type === "done")) {
        view.text = "";
        fresh = false;
      }
      if (item.type === "delta") view.append(item.text);
      else if (item.type === "ids") {
        if (item.user?.id) userView?.setId(item.user.id);
        if (item.assistant?.id) view.setId(item.assistant.id);
      } else if (item.type === "error") {
        status = "error";
        error = item.message;
      } else if (item.type === "done" && status !== "error") {
        status = "complete";
        // A stop from elsewhere (another tab, the API) ends the log with [DONE] and no finish
        // reason: the saved status tells which it was.
        if (!item.finished) stored = "status";
      } else if (item.type === "gone") stored = "message";
      else if (item.type === "reconnecting") view.setReconnecting(true);
      else if (item.type === "resumed") view.setReconnecting(false);
    }
  } catch (failure) {
    if (failure.name !== "AbortError") {
      if (failure instanceof ConnectionLost) status = "disconnected";
      else if (resumed && failure.status === 404) stored = "message"; // the log is gone
      else {
        // A failure before the stream began is the server's answer: an error.
        status = failure instanceof api.ApiError || view.text === "" ? "error" : "interrupted";
        error = status === "error" ? failure.message : null;
      }
    }
  }
  if (stored && !generation.stopping) {
    const saved = await savedMessage(conversationId, view);
    if (saved) {
      // Saved as `streaming` with no log left to read: the server was cut off mid-answer.
      status = saved.status === "streaming" ? "interrupted" : saved.status;
      error = saved.error;
      if (stored === "message") view.text = saved.content;
    } else if (stored === "message") status = "interrupted";
  }
  if (generation.stopping) status = "stopped";
  state.generations.delete(conversationId);
  view.render();
  view.setStatus(status, error);
  refreshComposer();
  refreshMessageChrome();
  touchConversation(conversationId);
}

/** The server's copy of the answer in `view`: one look, once its stream has ended. */
async function savedMessage(conversationId, view) {
  let conversation;
  try {
    conversation = await api.getConversation(conversationId, AbortSignal.timeout(SETTLE_TIMEOUT));
  } catch {
    return null;
  }
  const messages = conversation.messages || [];
  return view.id
    ? messages.find((message) => message.id === view.id)
    : messages.findLast((message) => message.role === "assistant");
}

/** Ask the server to stop the answer upstream, then drop our end of the stream. */
async function stopGeneration(generation) {
  if (generation.stopping) return;
  generation.stopping = true;
  refreshComposer();
  try {
    await api.stopGeneration(generation.conversationId);
  } catch (failure) {
    // Leaving the stream does not stop an answer (the server finishes and saves it for a
    // reload), so say that the stop did not reach the server.
    showToast(`Could not stop the answer: ${failure.message}`);
  }
  generation.controller.abort();
}

// -- composer --------------------------------------------------------------------------------

/** The open conversation is answering: this tab reads its answer (its own, or one it resumed). */
function isBusy() {
  return Boolean(state.current && state.generations.has(state.current.id));
}

function refreshComposer() {
  const generation = state.current && state.generations.get(state.current.id);
  const busy = isBusy();
  ui.stop.hidden = !busy;
  ui.stop.disabled = Boolean(generation?.stopping);
  ui.send.hidden = busy;
  ui.send.disabled = ui.prompt.value.trim() === "";
}

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

ui.prompt.addEventListener("input", () => {
  resizePrompt();
  refreshComposer();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && isBusy()) stopCurrent();
});

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (text === "" || isBusy() || state.creating) return;
  send(text);
});

ui.stop.addEventListener("click", stopCurrent);

function stopCurrent() {
  const conversation = state.current;
  if (!conversation) return;
  const generation = state.generations.get(conversation.id);
  if (generation) stopGeneration(generation);
}

async function send(text) {
  const model = ui.model.value || undefined;
  let conversation = state.current;
  ui.prompt.value = "";
  resizePrompt();
  if (!conversation) {
    state.creating = true;
    try {
      conversation = await api.createConversation({ model });
    } catch (failure) {
      ui.prompt.value = text; // nothing was sent: give the words back
      resizePrompt();
      refreshComposer();
      showToast(failure.message);
      return;
    } finally {
      state.creating = false;
    }
    // The server names an untitled conversation after its first question; show that name now.
    conversation.title ??= titleFrom(text);
    state.conversations.unshift(conversation);
    state.current = { ...conversation, messages: [] };
    history.pushState(null, "", `#/c/${encodeURIComponent(conversation.id)}`);
    showConversationTitle();
    renderConversationList();
  }
  const userView = addView(new MessageView({ role: "user", content: text }));
  await generate(conversation.id, "messages", { content: text, model }, userView);
}

/** The title the server gives an untitled conversation: its first question, cut at a word. */
function titleFrom(text, length = 60) {
  const line = text.split(/\s+/).filter(Boolean).join(" ");
  if (line.length <= length) return line;
  const cut = line.slice(0, length);
  const space = cut.lastIndexOf(" ");
  return `${space > 0 ? cut.slice(0, space) : cut}…`;
}

// -- message actions -------------------------------------------------------------------------

ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const action = button.dataset.action;
  if (action === "copy-code") {
    const code = button.closest(".code-block")?.querySelector("pre");
    if (code) flash(button, (await copyText(code.textContent)) ? "Copied" : "Copy failed");
    return;
  }
  const view = viewOf.get(button.closest(".message"));
  if (!view) return;
  if (action === "copy") {
    flash(button, (await copyText(view.text)) ? "Copied" : "Copy failed");
  } else if (action === "regenerate") {
    regenerate(view);
  }
});

function regenerate(view) {
  const conversation = state.current;
  if (!conversation || isBusy()) return;
  // The server drops the last answer and writes a new one for the same question.
  state.views = state.views.filter((other) => other !== view);
  view.el.remove();
  generate(conversation.id, "regenerate", { model: ui.model.value || undefined }, null);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // The async clipboard needs a secure context (https or localhost); a LAN address over
    // plain http falls back to the old selection-based copy.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    area.remove();
    return copied;
  }
}

function flash(button, label) {
  button.dataset.feedback = label;
  button.classList.add("flash");
  if (button.classList.contains("copy-code")) button.textContent = label;
  setTimeout(() => {
    button.classList.remove("flash");
    if (button.classList.contains("copy-code")) button.textContent = "Copy";
  }, 1500);
}

// -- conversations ---------------------------------------------------------------------------

async function loadConversations({ append = false } = {}) {
  try {
    const page = await api.listConversations(append ? state.nextCursor : null);
    const known = new Set(append ? state.conversations.map((c) => c.id) : []);
    const fresh = page.data.filter((c) => !known.has(c.id));
    state.conversations = append ? state.conversations.concat(fresh) : page.data;
    state.hasMore = Boolean(page.has_more && page.next_cursor);
    state.nextCursor = page.next_cursor ?? null;
  } catch (failure) {
    showToast(`Could not load conversations: ${failure.message}`);
  }
  renderConversationList();
}

function touchConversation(id) {
  const index = state.conversations.findIndex((c) => c.id === id);
  if (index < 0) return;
  const [conversation] = state.conversations.splice(index, 1);
  conversation.updated_at = new Date().toISOString();
  state.conversations.unshift(conversation);
  renderConversationList();
}

function renderConversationList() {
  const groups = new Map();
  for (const conversation of state.conversations) {
    const label = dayLabel(conversation.updated_at || conversation.created_at);
    if (!groups.has(label)) groups.set(label, []);
    groups.get(label).push(conversation);
  }
  const nodes = [];
  for (const [label, conversations] of groups) {
    const heading = document.createElement("li");
    heading.className = "group-label";
    heading.textContent = label;
    nodes.push(heading);
    for (const conversation of conversations) nodes.push(conversationItem(conversation));
  }
  ui.list.replaceChildren(...nodes);
  ui.more.hidden = !state.hasMore;
}

function conversationItem(conversation) {
  const item = document.createElement("li");
  item.className = "conversation";
  item.dataset.id = conversation.id;
  const link = document.createElement("a");
  link.className = "conversation-link";
  link.href = `#/c/${encodeURIComponent(conversation.id)}`;
  link.textContent = conversation.title || "Untitled chat";
  link.title = link.textContent;
  if (state.current?.id === conversation.id) link.setAttribute("aria-current", "page");
  const actions = document.createElement("div");
  actions.className = "conversation-actions";
  const rename = actionButton("rename", "Rename", ICONS.rename);
  const remove = actionButton("delete", "Delete", ICONS.delete);
  actions.append(rename, remove);
  item.append(link, actions);
  return item;
}

function dayLabel(timestamp) {
  const date = new Date(timestamp);
  if (Number.isNaN(date.getTime())) return "Earlier";
  const today = new Date();
  today.setHours(0, 0, 0, 0);
  const days = Math.floor((today - date) / 86_400_000) + 1;
  if (date >= today) return "Today";
  if (days <= 1) return "Yesterday";
  if (days <= 7) return "Previous 7 days";
  if (days <= 30) return "Previous 30 days";
  return "Older";
}

ui.list.addEventListener("click", (event) => {
  const item = event.target.closest(".conversation");
  if (!item) return;
  const button = event.target.closest("button[data-action]");
  if (!button) {
    closeSidebar();
    return;
  }
  if (button.dataset.action === "rename") startRename(item);
  else if (button.dataset.action === "delete") confirmDelete(item, button);
});

function startRename(item) {
  const conversation = state.conversations.find((c) => c.id === item.dataset.id);
  const link = item.querySelector(".conversation-link");
  if (!conversation || !link) return;
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = conversation.title || "";
  input.setAttribute("aria-label", "Conversation title");
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        Object.assign(conversation, await api.renameConversation(conversation.id, title));
        if (state.current?.id === conversation.id) state.current.title = conversation.title;
        showConversationTitle();
      } catch (failure) {
        showToast(failure.message);
      }
    }
    renderConversationList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    else if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  link.replaceWith(input);
  input.focus();
  input.select();
}

function confirmDelete(item, button) {
  if (!button.classList.contains("confirm")) {
    // A second click confirms; moving away cancels.
    button.classList.add("confirm");
    button.title = "Click again to delete";
    button.setAttribute("aria-label", "Confirm delete");
    button.addEventListener("blur", () => button.classList.remove("confirm"), { once: true });
    return;
  }
  deleteConversation(item.dataset.id);
}

async function deleteConversation(id) {
  const generation = state.generations.get(id);
  if (generation) await stopGeneration(generation);
  try {
    await api.deleteConversation(id);
  } catch (failure) {
    if (failure.status !== 404) {
      showToast(failure.message);
      return;
    }
  }
  state.conversations = state.conversations.filter((c) => c.id !== id);
  renderConversationList();
  if (state.current?.id === id) navigateToNewChat();
}

ui.more.addEventListener("click", () => loadConversations({ append: true }));

// -- navigation ------------------------------------------------------------------------------

function routeId() {
  const match = /^#\/c\/(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function route() {
  const id = routeId();
  if (id === (state.current?.id ?? null) && (id === null || state.views.length > 0)) return;
  if (id) openConversation(id);
  else showNewChat();
}

window.addEventListener("hashchange", route);
window.addEventListener("popstate", route);

function navigateToNewChat() {
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  showNewChat();
}

function showNewChat() {
  state.opening += 1;
  state.current = null;
  state.views = [];
  ui.messages.replaceChildren();
  showConversationTitle();
  renderConversationList();
  refreshMessageChrome();
  refreshComposer();
  ui.prompt.focus();
}

async function openConversation(id) {
  const ticket = ++state.opening;
  let conversation;
  try {
    conversation = await api.getConversation(id);
  } catch (failure) {
    if (ticket !== state.opening) return;
    showToast(failure.status === 404 ? "That conversation no longer exists." : failure.message);
    navigateToNewChat();
    return;
  }
  if (ticket !== state.opening) return;
  state.current = conversation;
  state.views = [];
  state.stickToBottom = true;
  ui.messages.replaceChildren();
  if (conversation.model && ui.model.value !== conversation.model) selectModel(conversation.model);

  const generation = state.generations.get(id);
  const messages = conversation.messages || [];
  // An answer still being written that this tab is not reading yet: it follows its log.
  const last = messages.at(-1);
  const follow = !generation && last?.status === "streaming" && last.stream_id ? last : null;
  const live = new Set([generation?.view.id, generation?.userView?.id].filter(Boolean));
  let followView = null;
  for (const [index, message] of messages.entries()) {
    // This tab's own stream shows itself; the server's copy of it would only lag behind.
    if (live.has(message.id)) continue;
    // A stream this tab started whose ids have not arrived yet is on screen already.
    if (generation && !generation.view.id && index >= messages.length - 2) continue;
    if (message === follow) followView = addView(new MessageView(message));
    else addView(new MessageView(shownMessage(message)));
  }
  if (generation) {
    if (generation.userView) addView(generation.userView);
    addView(generation.view);
  }
  if (followView) resumeAnswer(id, followView, follow.stream_id);
  showConversationTitle();
  renderConversationList();
  refreshMessageChrome();
  refreshComposer();
  followBottom();
}

/** A message still `streaming` that has no log to follow was cut off (a crashed server). */
function shownMessage(message) {
  if (message.status === "streaming") return { ...message, status: "interrupted" };
  return message;
}

function showConversationTitle() {
  const title = state.current ? state.current.title || "Untitled chat" : "New chat";
  ui.title.textContent = title;
  document.title = `${title} · tokenrelay`;
  showSystemPrompt();
}

/** The open conversation's system prompt, as plain text, above its messages. */
function showSystemPrompt() {
  const system = state.current?.system || "";
  ui.systemText.textContent = system;
  ui.system.hidden = system === "";
}

ui.newChat.addEventListener("click", () => {
  closeSidebar();
  navigateToNewChat();
});

// -- models ----------------------------------------------------------------------------------

async function loadModels() {
  try {
    const models = await api.listModels();
    ui.model.replaceChildren(...models.map(modelOption));
    ui.model.disabled = models.length === 0;
  } catch (failure) {
    ui.model.replaceChildren(new Option("default model", ""));
    showToast(`Could not list models: ${failure.message}`);
  }
}

/** A picker entry; an unavailable model stays listed, disabled, with the reason in its label. */
function modelOption(model) {
  if (model.status !== "unavailable") return new Option(model.id, model.id);
  const option = new Option(`${model.id} (unavailable)`, model.id);
  option.disabled = true;
  option.title = model.status_reason || "This model cannot answer right now.";
  option.dataset.unavailable = "true";
  return option;
}

function selectModel(id) {
  if (![...ui.model.options].some((option) => option.value === id)) ui.model.append(new Option(id, id));
  ui.model.value = id;
}

// -- chrome ----------------------------------------------------------------------------------

function openSidebar() {
  document.body.classList.add("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "false");
}

ui.menu.addEventListener("click", () =>
  document.body.classList.contains("sidebar-open") ? closeSidebar() : openSidebar(),
);
ui.backdrop.addEventListener("click", closeSidebar);

function showKeyButton() {
  ui.forgetKey.hidden = key.secret === null;
}
key.addEventListener("change", showKeyButton);
ui.forgetKey.addEventListener("click", () => {
  key.forget();
  location.reload(); // nothing loaded with the key stays on screen
});

let toastTimer = 0;
function showToast(message) {
  ui.toast.textContent = message;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    ui.toast.hidden = true;
  }, 6000);
}

document.querySelector("#suggestions")?.addEventListener("click", (event) => {
  const chip = event.target.closest("button[data-prompt]");
  if (!chip) return;
  ui.prompt.value = chip.dataset.prompt;
  resizePrompt();
  refreshComposer();
  ui.form.requestSubmit();
});

// -- start -----------------------------------------------------------------------------------

showKeyButton();
await Promise.all([loadModels(), loadConversations()]);
route();
if (!routeId()) showNewChat();
document.body.dataset.ready = "true";
