// How numbers read on the page.

const numberFormat = new Intl.NumberFormat();

export function count(value) {
  return value === null || value === undefined ? "–" : numberFormat.format(value);
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 10000) return `${(value / 1000).toFixed(1)} s`;
  return `${value >= 100 ? Math.round(value) : value.toFixed(1)} ms`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  const s = Math.round(value);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${unit ? size.toFixed(1) : size} ${units[unit]}`;
}

export function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
}

const significant = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });

export function rate(value, unit) {
  if (value === null || value === undefined) return "–";
  return `${value >= 100 ? numberFormat.format(Math.round(value)) : significant.format(value)} ${unit}`;
}

export function clock(timestamp) {
  // Stored timestamps are UTC text (2026-05-01T12:00:00.000000Z); shown in the browser's time zone.
  const when = new Date(timestamp.slice(0, 23) + "Z");
  return Number.isNaN(when.getTime()) ? timestamp : when.toLocaleTimeString();
}

export function value(v) {
  if (v === null || v === undefined) return "";
  if (Array.isArray(v)) return v.join(",");
  return String(v);
}
