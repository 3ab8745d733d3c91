// Figures over time (uPlot, vendored) and the per-model / per-key breakdowns of the same window.
// Each chart also has its numbers as a table, for screen readers and for anyone who wants them.

import { api } from "./api.js";
import { el, table } from "./dom.js";
import * as f from "./format.js";

const CHARTS = [
  { id: "requests", title: "API requests per second", series: [["requests_per_second", "requests/s"]], format: (v) => f.rate(v, "/s") },
  { id: "tokens", title: "Tokens generated per second", series: [["tokens_per_second", "tokens/s"]], format: (v) => f.rate(v, "/s") },
  { id: "ttft", title: "Time to first token", series: [["ttft_p50_ms", "p50"], ["ttft_p95_ms", "p95"]], format: f.ms },
  { id: "duration", title: "Request duration", series: [["duration_p50_ms", "p50"], ["duration_p95_ms", "p95"]], format: f.ms },
  { id: "failures", title: "Failures by kind, per bucket", series: null, format: f.count },
];
const HEIGHT = 200;

const plots = new Map(); // chart id -> { plot, labels }
let last = null;
let resizeObserver = null;

export function setupCharts(onWindow) {
  const grid = document.getElementById("chart-grid");
  for (const chart of CHARTS) {
    const titleId = `chart-${chart.id}-title`;
    grid.append(
      el("figure", { class: "chart", id: `chart-${chart.id}`, "aria-labelledby": titleId },
        el("figcaption", {}, el("h2", { id: titleId, text: chart.title })),
        el("div", { class: "plot", role: "img", "aria-label": `${chart.title}: chart; the table below has its numbers` }),
        el("details", {}, el("summary", { text: "Numbers" }), el("div", { class: "table-wrap" }, el("table", { class: "data" })))),
    );
  }
  for (const input of document.querySelectorAll('input[name="window"]')) input.addEventListener("change", onWindow);
  resizeObserver = new ResizeObserver(() => {
    for (const [id, { plot }] of plots) plot.setSize({ width: plotWidth(id), height: HEIGHT });
  });
  resizeObserver.observe(grid);
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    for (const { plot } of plots.values()) plot.destroy();
    plots.clear();
    if (last) draw(last);
  });
}

export function chosenWindow() {
  return document.querySelector('input[name="window"]:checked').value;
}

let library = null;

// uPlot is loaded when a chart is first drawn (the page only prefetches it): the other pages'
// first paint never waits for it.
function chartLibrary() {
  library ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = document.getElementById("chart-library").href;
    script.addEventListener("load", () => resolve());
    script.addEventListener("error", () => {
      library = null;
      script.remove();
      reject(new Error("the chart library did not load"));
    });
    document.head.append(script);
  });
  return library;
}

export async function refreshCharts() {
  const state = document.getElementById("charts-state");
  try {
    const [figures] = await Promise.all([api(`/admin/ui/api/series?window=${chosenWindow()}`), chartLibrary()]);
    last = figures;
    draw(figures);
    state.textContent = `Updated ${new Date().toLocaleTimeString()} · ${f.count(figures.total.requests)} API requests in the last ${figures.window}`;
  } catch (error) {
    state.textContent = `Could not read the figures: ${error.message}`;
  }
}

function seriesOf(chart, figures) {
  if (chart.series) return chart.series.map(([key, label]) => ({ label, values: figures[key] }));
  const kinds = Object.entries(figures.failures);
  if (!kinds.length) return [{ label: "failures", values: figures.time.map(() => 0) }];
  return kinds.map(([kind, values]) => ({ label: kind, values }));
}

function draw(figures) {
  const colors = palette();
  for (const chart of CHARTS) {
    const series = seriesOf(chart, figures);
    const data = [figures.time, ...series.map((s) => s.values)];
    const labels = series.map((s) => s.label).join("\n");
    const known = plots.get(chart.id);
    if (known && known.labels === labels) {
      known.plot.setData(data);
    } else {
      if (known) known.plot.destroy();
      const target = document.querySelector(`#chart-${chart.id} .plot`);
      target.replaceChildren();
      const plot = new uPlot(options(chart, series, colors, plotWidth(chart.id)), data, target);
      plots.set(chart.id, { plot, labels });
    }
    const figure = document.getElementById(`chart-${chart.id}`);
    figure.dataset.points = String(figures.time.length);
    numbers(figure.querySelector("details table"), chart, figures.time, series);
  }
  breakdown("by-model", "Model", "model", figures.by_model);
  breakdown("by-key", "API key", "key", figures.by_key);
}

function plotWidth(id) {
  const target = document.querySelector(`#chart-${id} .plot`);
  return Math.max(target?.clientWidth || 300, 200);
}

function palette() {
  const css = getComputedStyle(document.documentElement);
  const read = (name) => css.getPropertyValue(name).trim();
  return {
    fg: read("--fg"),
    line: read("--line"),
    series: [1, 2, 3, 4, 5, 6].map((i) => read(`--series-${i}`)),
  };
}

function options(chart, series, colors, width) {
  const axis = { stroke: colors.fg, grid: { stroke: colors.line, width: 1 }, ticks: { stroke: colors.line, width: 1 } };
  return {
    width,
    height: HEIGHT,
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: colors.series[i % colors.series.length],
        width: 2,
        points: { show: true, size: 4 },
        value: (u, v) => chart.format(v),
      })),
    ],
    axes: [axis, { ...axis, size: 70, values: (u, ticks) => ticks.map((v) => chart.format(v)) }],
    legend: { live: true },
  };
}

function numbers(node, chart, times, series) {
  const columns = [
    { label: "Bucket start", cell: (i) => new Date(times[i] * 1000).toLocaleTimeString() },
    ...series.map((s) => ({ label: s.label, num: true, cell: (i) => chart.format(s.values[i]) })),
  ];
  table(node, columns, times.map((_, i) => i), `${chart.title}, one row per bucket`);
}

function breakdown(id, label, field, items) {
  const node = document.getElementById(id);
  if (!items.length) {
    node.replaceChildren(el("caption", { text: "No request in this window." }));
    return;
  }
  table(node, [
    { label, wrap: true, cell: (r) => r[field] ?? (field === "key" ? "(no key)" : "(none)") },
    { label: "Requests", num: true, cell: (r) => f.count(r.requests) },
    { label: "Errors", num: true, cell: (r) => f.count(r.errors) },
    { label: "Timeouts", num: true, cell: (r) => f.count(r.timeouts) },
    { label: "Error rate", num: true, cell: (r) => f.percent(r.error_rate) },
    { label: "Duration p50 / p95", num: true, cell: (r) => `${f.ms(r.p50_duration_ms)} / ${f.ms(r.p95_duration_ms)}` },
    { label: "TTFT p50 / p95", num: true, cell: (r) => `${f.ms(r.p50_ttft_ms)} / ${f.ms(r.p95_ttft_ms)}` },
    { label: "Tokens in", num: true, cell: (r) => f.count(r.prompt_tokens) },
    { label: "Tokens out", num: true, cell: (r) => f.count(r.completion_tokens) },
    { label: "Tokens/s", num: true, cell: (r) => f.rate(r.tokens_per_second, "/s") },
  ], items, `${label}s in the window`);
}
