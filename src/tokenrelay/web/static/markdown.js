// Model output is untrusted: it becomes Markdown with raw HTML escaped, then passes through
// DOMPurify anyway, so `<img src=x onerror=...>` or `<script>` show up as text and run nothing.

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const marked = new Marked({ gfm: true, breaks: false, async: false });
marked.use({
  renderer: {
    // Raw HTML in the Markdown is shown as the text it is, never parsed.
    html({ text, block }) {
      const shown = escapeHtml(text);
      return block ? `<p class="raw-html">${shown}</p>` : shown;
    },
    // An image in an answer would make the browser fetch any URL the model wrote (a tracking
    // pixel, or a request that fails offline); show a link the reader can choose to open.
    image({ href, text }) {
      const label = escapeHtml(text || href);
      return `<a href="${escapeHtml(href)}" class="image-link">${label}</a>`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "button", "textarea", "select", "iframe", "svg", "math"],
  FORBID_ATTR: ["style", "id", "name"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** A sanitized DocumentFragment for `markdown`, with copy buttons on code blocks. */
export function renderMarkdown(markdown) {
  const fragment = DOMPurify.sanitize(marked.parse(markdown), PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  for (const table of fragment.querySelectorAll("table")) {
    // Wide tables scroll on their own instead of widening the whole page on a phone.
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return fragment;
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  const language = /(?:^|\s)language-([\w#+.-]+)/.exec(code?.className || "")?.[1] || "";
  const block = document.createElement("div");
  block.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.dataset.action = "copy-code";
  copy.textContent = "Copy";
  bar.append(label, copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}
