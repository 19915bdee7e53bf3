// Formatting and small DOM helpers shared by the views.

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") {
      node.textContent = value;
    } else if (value !== undefined && value !== null && value !== false) {
      node.setAttribute(name, value === true ? "" : value);
    }
  }
  node.append(...children);
  return node;
}

export function timeAgo(epochSeconds) {
  if (epochSeconds === null || epochSeconds === undefined) {
    return "never";
  }
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function isoTime(epochSeconds) {
  return epochSeconds == null ? "" : new Date(epochSeconds * 1000).toISOString();
}

// Flatten a state section into [dotted path, value] pairs. Arrays stay whole, as the
// shadow service replaces them whole.
export function flatten(value, prefix = "", out = []) {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const key of Object.keys(value).sort()) {
      flatten(value[key], prefix ? `${prefix}.${key}` : key, out);
    }
  } else if (prefix) {
    out.push([prefix, value]);
  }
  return out;
}

export function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

export function formatNumber(value, digits = 0) {
  return value.toLocaleString("en", { maximumFractionDigits: digits });
}
