// The usage page: `GET api/usage` for a chosen range, as totals, charts and two tables with
// the numbers `tokenrelay usage` prints. Key and model names are untrusted: text only.

import { ApiKey } from "./apikey.js";
import { request, useKey } from "./http.js";
import { Charts, keyLabel } from "./usage-charts.js";

const $ = (selector) => document.querySelector(selector);

/** Each range's bucket: about 24 to 168 points a chart, far below the API's 2000. */
const BUCKETS = { "1h": "minute", "24h": "hour", "7d": "hour", "30d": "day" };
const FIGURES = [
  "requests",
  "prompt_tokens",
  "completion_tokens",
  "errors",
  "rate_limited",
  "client_left",
  "ttft_ms_avg",
];

// The admin key is kept apart from the chat page's key (tokenrelay.key): it is sent only from
// here, and a person who uses both pages is not made to trade one for the other.
const key = new ApiKey("tokenrelay.adminKey", {
  refusals: [401, 403], // 403: a valid key, but not the admin's
  title: "Usage needs the admin key",
  label: "Admin key",
  intro: "Usage is for the server’s admin: enter the admin key (TOKENRELAY_ADMIN_KEY).",
});
useKey(key);

const charts = new Charts();
const boxes = Object.fromEntries(
  [...document.querySelectorAll("[data-chart]")].map((box) => [box.dataset.chart, box]),
);
let summary = null;
let loading = 0; // the latest load; an older answer that arrives late is dropped

const integer = new Intl.NumberFormat();
const tenths = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });

/** A figure as shown: counts grouped by thousands, averages in tenths of a ms, "–" for none. */
function shown(field, value) {
  if (value === null || value === undefined) return "–";
  return field === "ttft_ms_avg" ? tenths.format(value) : integer.format(value);
}

const choice = (name) => document.querySelector(`input[name="${name}"]:checked`).value;

async function load() {
  const ticket = ++loading;
  const range = choice("range");
  document.body.removeAttribute("data-ready");
  setStatus("Loading…");
  let answer;
  try {
    answer = await request("GET", `api/usage?since=${range}&bucket=${BUCKETS[range]}`);
  } catch (failure) {
    if (ticket === loading) setStatus(failure.message, true);
    return;
  }
  if (ticket !== loading) return;
  summary = answer;
  setStatus(summary.totals.requests ? "" : "No requests in this range.");
  showPeriod();
  showTotals();
  fillTable($("#by-key tbody"), summary.by_key, keyLabel);
  fillTable($("#by-model tbody"), summary.by_model, (row) => row.model);
  drawCharts();
  document.body.dataset.ready = "true";
}

function drawCharts() {
  if (summary) charts.draw(summary, choice("split"), boxes);
}

function setStatus(text, failed = false) {
  $("#status").textContent = text;
  $("#status").hidden = text === "";
  $("#status").classList.toggle("failed", failed);
}

function showPeriod() {
  const format = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  const since = new Date(summary.since);
  const until = new Date(summary.until);
  $("#period").textContent = `${format.format(since)} – ${format.format(until)}, by ${summary.bucket}`;
}

function showTotals() {
  for (const cell of document.querySelectorAll("#totals [data-field]")) {
    const field = cell.dataset.field;
    const value = shown(field, summary.totals[field]);
    cell.textContent = field === "ttft_ms_avg" && value !== "–" ? `${value} ms` : value;
  }
}

function fillTable(body, rows, nameOf) {
  body.replaceChildren(
    ...rows.map((row) => {
      const line = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = nameOf(row);
      line.append(name);
      for (const field of FIGURES) {
        const cell = document.createElement("td");
        cell.textContent = shown(field, row[field]);
        line.append(cell);
      }
      return line;
    }),
  );
  if (rows.length === 0) {
    const line = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = FIGURES.length + 1;
    cell.className = "none";
    cell.textContent = "Nothing in this range.";
    line.append(cell);
    body.append(line);
  }
}

for (const input of document.querySelectorAll('input[name="range"]')) input.addEventListener("change", load);
for (const input of document.querySelectorAll('input[name="split"]'))
  input.addEventListener("change", drawCharts);
$("#refresh").addEventListener("click", load);

function showKeyButton() {
  $("#forget-key").hidden = key.secret === null;
}
key.addEventListener("change", showKeyButton);
$("#forget-key").addEventListener("click", () => {
  key.forget();
  location.reload(); // the usage shown came with that key
});

showKeyButton();
load();
