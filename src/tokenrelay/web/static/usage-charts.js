// The usage page's charts: a summary's series (usage.js) as lines over time, one per key or
// per model, drawn by uPlot (vendor/uplot, loaded as a classic script before the modules).

const { uPlot } = globalThis;

const STEP = { minute: 60, hour: 3600, day: 86400 }; // seconds in a bucket
const PALETTE = ["#2563eb", "#e4572e", "#17a673", "#a855f7", "#f2a900", "#0ea5b7", "#d63384", "#6b7280"];
const MAX_LINES = PALETTE.length; // past this many groups the smallest are added up as "others"
const HEIGHT = 220;
// Steps between a count axis's ticks: whole numbers only (no "0.5 requests").
const WHOLE_STEPS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9].flatMap((power) => [1, 2, 5].map((m) => m * 10 ** power));

/**
 * What each chart draws: a line per group for each of its figures. `average` figures are
 * averages per row, combined weighted by what each averages (`weight`); the rest are sums. A dashed figure shares
 * its group's colour.
 */
export const CHARTS = {
  requests: [{ field: "requests" }],
  tokens: [
    { field: "completion_tokens", name: "completion" },
    { field: "prompt_tokens", name: "prompt", dash: [6, 4] },
  ],
  errors: [
    { field: "errors", name: "errors" },
    { field: "rate_limited", name: "rate limited", dash: [6, 4] },
  ],
  ttft: [{ field: "ttft_ms_avg", average: true, weight: "ttft_count", unit: " ms" }],
};

/** Every bucket's start (Unix seconds) from `since` to `until`: the API lists only busy ones. */
export function bucketStarts(summary) {
  const step = STEP[summary.bucket];
  const until = Date.parse(summary.until) / 1000;
  const starts = [];
  // Buckets are UTC and a day starts at 00:00 UTC, so flooring Unix time lines them up.
  for (let start = Math.floor(Date.parse(summary.since) / 1000 / step) * step; start < until; start += step) {
    starts.push(start);
  }
  return starts;
}

/** What a key is called on the page: its name, or "(no key)" for the admin's and a keyless server's. */
export const keyLabel = (row) => (row.key_id === null ? "(no key)" : (row.key_name ?? row.key_id));

/** A bucket's name (`2026-11-30 15`, UTC) as Unix seconds. */
function bucketStart(name) {
  const [date, time = "00"] = name.split(" ");
  const [year, month, day] = date.split("-").map(Number);
  const [hour, minute = 0] = time.split(":").map(Number);
  return Date.UTC(year, month - 1, day, hour, minute) / 1000;
}

/**
 * The series' rows grouped by `split` ("key" or "model"): `{id, label, rows}` in `order`
 * (the summary's by_key or by_model: busiest first), the tail folded into "others".
 */
function groupRows(summary, split) {
  const idOf = split === "key" ? (row) => row.key_id ?? "" : (row) => row.model;
  const labelOf = split === "key" ? keyLabel : (row) => row.model;
  const order = split === "key" ? summary.by_key : summary.by_model;
  const groups = order.map((row) => ({ id: idOf(row), label: labelOf(row), rows: [] }));
  const shown = groups.slice(0, groups.length > MAX_LINES ? MAX_LINES - 1 : MAX_LINES);
  const others = { id: null, label: `${groups.length - shown.length} others`, rows: [] };
  const byId = new Map(shown.map((group) => [group.id, group]));
  for (const row of summary.series) (byId.get(idOf(row)) ?? others).rows.push(row);
  return others.rows.length ? [...shown, others] : shown;
}

/** One figure of one group per bucket: sums (0 when idle), or averages (null when idle). */
function line(rows, figure, index) {
  const totals = new Array(index.size).fill(0);
  const weights = new Array(index.size).fill(0);
  for (const row of rows) {
    const at = index.get(bucketStart(row.bucket));
    if (at === undefined) continue;
    if (!figure.average) totals[at] += row[figure.field];
    else if (row[figure.field] !== null) {
      // Rows of one group for other keys or models: an average weighted by what each averages.
      totals[at] += row[figure.field] * row[figure.weight];
      weights[at] += row[figure.weight];
    }
  }
  if (!figure.average) return totals;
  return totals.map((total, at) => (weights[at] ? Math.round((total / weights[at]) * 10) / 10 : null));
}

function theme() {
  const style = getComputedStyle(document.documentElement);
  return {
    muted: style.getPropertyValue("--fg-muted").trim(),
    grid: style.getPropertyValue("--border").trim(),
  };
}

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

/** The usage page's set of charts, redrawn whole for each summary. */
export class Charts {
  #plots = [];

  constructor() {
    // A chart is drawn at its box's width: follow the window.
    this.resize = new ResizeObserver(() => {
      for (const { plot, box } of this.#plots) plot.setSize({ width: box.clientWidth, height: HEIGHT });
    });
  }

  /** Draw `summary` into `boxes` (chart name -> element), a line per key or model (`split`). */
  draw(summary, split, boxes) {
    this.clear();
    const starts = bucketStarts(summary);
    const index = new Map(starts.map((start, at) => [start, at]));
    const groups = groupRows(summary, split);
    const colours = theme();
    for (const [name, figures] of Object.entries(CHARTS)) {
      const box = boxes[name];
      const series = [{}];
      const data = [starts];
      groups.forEach((group, number) => {
        for (const figure of figures) {
          series.push({
            label: figure.name && figures.length > 1 ? `${group.label} · ${figure.name}` : group.label,
            stroke: PALETTE[number % PALETTE.length],
            width: 2,
            dash: figure.dash,
            // An average exists only in busy buckets: a lone one has no line to show it.
            points: figure.average ? { show: true, size: 6, fill: PALETTE[number % PALETTE.length] } : {},
            value: (_, value) => (value === null ? "–" : `${value.toLocaleString()}${figure.unit ?? ""}`),
          });
          data.push(line(group.rows, figure, index));
        }
      });
      const axis = {
        stroke: colours.muted,
        grid: { stroke: colours.grid, width: 1 },
        ticks: { stroke: colours.grid },
      };
      const yAxis = { ...axis, size: 56, values: (_, ticks) => ticks.map((tick) => compact.format(tick)) };
      if (!figures[0].average) yAxis.incrs = WHOLE_STEPS;
      const plot = new uPlot(
        {
          width: box.clientWidth,
          height: HEIGHT,
          series,
          scales: { y: { range: (_, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
          axes: [axis, yAxis],
          cursor: { points: { size: 7 } },
        },
        data,
        box,
      );
      this.#plots.push({ plot, box });
      this.resize.observe(box);
    }
  }

  clear() {
    for (const { plot, box } of this.#plots) {
      this.resize.unobserve(box);
      plot.destroy();
    }
    this.#plots = [];
  }
}
