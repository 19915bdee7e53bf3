// The thing view. It shows one shadow of a thing, the classic one or a named one picked in
// the menu. Its desired, reported and delta sections stand side by side, kept current by the
// /ws feed, with a form that sets desired values through the REST API. Each numeric reported
// field gets a chart, started from the history API and extended by the feed.
import { followFeed, getJson, postJson } from "./api.js";
import { TimeChart } from "./chart.js";
import { element, flatten, formatValue, isoTime, timeAgo } from "./format.js";

// How far back the charts start, in seconds.
const HISTORY_WINDOW_SECONDS = 3600;
const HISTORY_LIMIT = 20000;
const SUMMARY_REFRESH_SECONDS = 2;
// A read that has no reply by then is given up. Its connection may belong to a worker that
// is stopped, and the reads that follow go over other connections, at last a new one that a
// running worker accepts.
const READ_TIMEOUT_SECONDS = 5;
const SECTIONS = ["desired", "reported", "delta"];

// The hash of a thing view: #/thing/{thing} for the classic shadow and
// #/thing/{thing}/shadow/{name} for a named one. Thing names cannot contain "/".
export function thingHash(thing, shadowName = null) {
  const base = `#/thing/${encodeURIComponent(thing)}`;
  return shadowName === null ? base : `${base}/shadow/${encodeURIComponent(shadowName)}`;
}

export function mountThing(root, thing, shadowName = null) {
  const path = `/things/${encodeURIComponent(thing)}`;
  // The query that selects the shadow in the shadow and history endpoints.
  const nameQuery = shadowName === null ? {} : { name: shadowName };
  const shadowPath = `${path}/shadow${shadowName === null ? "" : `?${new URLSearchParams(nameQuery)}`}`;
  const status = element("span", { class: "status" });
  const lastSeen = element("span", { class: "muted" });
  const version = element("span", { class: "muted", id: "shadow-version" });
  // Why the thing or its shadow could not be read, such as a worker that does not respond,
  // or that the thing is unknown.
  const notice = element("p", { id: "thing-notice", class: "message", role: "status" });
  const shadowMenu = element("select", { id: "shadow-name", "aria-label": "shadow" });
  shadowMenu.append(shadowOption(null));
  if (shadowName !== null) shadowMenu.append(shadowOption(shadowName));
  shadowMenu.value = shadowName ?? "";
  shadowMenu.addEventListener("change", () => {
    location.hash = thingHash(thing, shadowMenu.value === "" ? null : shadowMenu.value);
  });
  const tables = {};
  const panels = SECTIONS.map((section) => {
    tables[section] = element("tbody");
    return element(
      "div",
      { class: "panel" },
      element("h2", { text: section }),
      element("table", { id: section }, tables[section]),
    );
  });

  const fieldInput = element("input", { id: "desired-field", placeholder: "field, e.g. speed or motor.rpm", required: true });
  const valueInput = element("input", { id: "desired-value", placeholder: "value (JSON, or text)" });
  const formMessage = element("span", { class: "message", id: "desired-message", role: "status" });
  const form = element(
    "form",
    { class: "toolbar", id: "desired-form" },
    element("label", { text: "Set desired" }),
    fieldInput,
    valueInput,
    element("button", { type: "submit", text: "Send" }),
    formMessage,
  );
  const chartNote = element("p", { class: "muted" });
  const chartGrid = element("div", { class: "charts" });

  root.append(
    element("h1", {}, `${thing} `, status, " ", lastSeen, " ", version),
    notice,
    element("div", { class: "toolbar" }, element("label", { text: "Shadow" }), shadowMenu),
    element("div", { class: "panels" }, ...panels),
    element("section", {}, form),
    element("section", {}, element("h2", { text: "Reported numeric fields" }), chartNote, chartGrid),
  );

  let shadowVersion = -1;
  const charts = new Map();
  let historyRequested = false;
  let historyLoaded = false;
  // Reads that failed other than with 404, repeated once the thing can be read again.
  let shadowFailed = false;
  let historyFailed = false;
  let summaryFailed = false;
  const framesBeforeHistory = [];

  function showState(state, newVersion) {
    if (newVersion < shadowVersion) return;
    shadowVersion = newVersion;
    version.textContent = newVersion >= 0 ? `shadow version ${newVersion}` : "no shadow yet";
    for (const section of SECTIONS) {
      const pairs = flatten((state && state[section]) || {});
      const rows = pairs.map(([field, value]) =>
        element(
          "tr",
          { "data-field": field },
          element("td", { text: field }),
          element("td", { class: "value", text: formatValue(value) }),
        ),
      );
      if (rows.length === 0) rows.push(element("tr", {}, element("td", { class: "muted", text: "empty" })));
      tables[section].replaceChildren(...rows);
    }
  }

  function chartFor(field) {
    let chart = charts.get(field);
    if (!chart) {
      const box = element("div", { class: "panel", "data-chart": field });
      chartGrid.append(box);
      chart = new TimeChart(box, field, [field]);
      charts.set(field, chart);
    }
    return chart;
  }

  function plotFrame(frame) {
    const reported = frame.state && frame.state.reported;
    for (const [field, value] of flatten(reported || {})) {
      if (typeof value !== "number") continue;
      const chart = chartFor(field);
      if (frame.timestamp >= chart.lastTime()) chart.append(frame.timestamp, [value]);
    }
  }

  async function loadHistory() {
    try {
      const engine = await getJson("/api/engine", { timeoutSeconds: READ_TIMEOUT_SECONDS });
      if (!engine.historyKept) {
        chartNote.textContent = "No history: the engine runs with --memory-only true, so the charts start now.";
        historyLoaded = true;
        for (const frame of framesBeforeHistory.splice(0)) plotFrame(frame);
        return;
      }
    } catch {
      // Request the history anyway: its own error message names the problem.
    }
    const to = Date.now() / 1000;
    const params = new URLSearchParams({
      from: String(to - HISTORY_WINDOW_SECONDS),
      limit: String(HISTORY_LIMIT),
      ...nameQuery,
    });
    try {
      const history = await getJson(`${path}/history?${params}`, {
        timeoutSeconds: READ_TIMEOUT_SECONDS,
      });
      const byField = new Map();
      for (const point of history.points) {
        if (!byField.has(point.field)) byField.set(point.field, []);
        byField.get(point.field).push([point.time, point.value]);
      }
      for (const [field, rows] of byField) {
        rows.sort((a, b) => a[0] - b[0]);
        chartFor(field).load(rows);
      }
      chartNote.textContent = `History of the last ${HISTORY_WINDOW_SECONDS / 60} minutes, then live.`;
      historyFailed = false;
    } catch (failure) {
      historyFailed = true;
      chartNote.textContent = `History not loaded: ${failure.message} The charts start now.`;
    }
    historyLoaded = true;
    for (const frame of framesBeforeHistory.splice(0)) plotFrame(frame);
  }

  function showNotice(text, isError) {
    notice.className = isError ? "message error" : "message muted";
    notice.textContent = text;
  }

  async function loadShadow() {
    try {
      const document = await getJson(shadowPath, { timeoutSeconds: READ_TIMEOUT_SECONDS });
      showState(document.state, document.version);
      shadowFailed = false;
    } catch (failure) {
      if (failure.status === 404) {
        showState({}, -1);
      } else {
        shadowFailed = true;
        showNotice(`Reading the shadow failed: ${failure.message}`, true);
      }
    }
  }

  // Read the shadow again if it failed, and after the thing could not be read, the history
  // too. Feed frames that arrive meanwhile wait for the history, as at the start.
  function readAgain(afterOutage) {
    if (shadowFailed) loadShadow();
    if (afterOutage && historyFailed) {
      historyFailed = false;
      historyLoaded = false;
      loadHistory();
    }
  }

  let summaryPending = false;

  async function loadSummary() {
    if (summaryPending) return; // a worker that does not respond makes a request wait
    summaryPending = true;
    let failed = false;
    try {
      const summary = await getJson(path, { timeoutSeconds: READ_TIMEOUT_SECONDS });
      const state = summary.connected ? "connected" : "offline";
      status.className = `status ${state}`;
      status.textContent = state;
      lastSeen.textContent = `last seen ${timeAgo(summary.lastSeen)}`;
      lastSeen.title = isoTime(summary.lastSeen);
      showNotice("", false);
      showShadowNames(summary.namedShadows || []);
    } catch (failure) {
      status.className = "status offline";
      lastSeen.textContent = "";
      lastSeen.title = "";
      if (failure.status === 404) {
        status.textContent = "unknown";
        showNotice(failure.message, false);
      } else {
        failed = true;
        status.textContent = "unavailable";
        showNotice(`Reading the thing failed: ${failure.message}`, true);
      }
    } finally {
      summaryPending = false;
    }
    if (!failed && (summaryFailed || shadowFailed)) readAgain(summaryFailed);
    summaryFailed = failed;
  }

  // Offer the classic shadow, every named shadow of the thing, and the one shown even if
  // it does not exist (yet).
  function showShadowNames(names) {
    const offered = [...new Set([...names, ...(shadowName === null ? [] : [shadowName])])].sort();
    const current = [...shadowMenu.options].slice(1).map((option) => option.value);
    if (offered.join("\n") === current.join("\n")) return;
    shadowMenu.replaceChildren(shadowOption(null), ...offered.map(shadowOption));
    shadowMenu.value = shadowName ?? "";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const field = fieldInput.value.trim();
    let value;
    try {
      value = JSON.parse(valueInput.value);
    } catch {
      value = valueInput.value;
    }
    // "motor.rpm" becomes {"motor": {"rpm": value}}, which the shadow service merges.
    const desired = field
      .split(".")
      .reverse()
      .reduce((inner, key) => ({ [key]: inner }), value);
    formMessage.className = "message";
    formMessage.textContent = "sending…";
    try {
      const accepted = await postJson(shadowPath, { state: { desired } });
      formMessage.className = "message ok";
      formMessage.textContent = `Accepted: version ${accepted.version}`;
    } catch (failure) {
      formMessage.className = "message error";
      formMessage.textContent = `Rejected (${failure.status}): ${failure.message}`;
    }
  });

  const closeFeed = followFeed(
    [thing],
    (frame) => {
      if (frame.thing !== thing || frame.shadow !== shadowName) return;
      showState(frame.deleted ? {} : frame.state, frame.version);
      if (historyLoaded) plotFrame(frame);
      else framesBeforeHistory.push(frame);
    },
    () => {
      // Subscribed: now read the current state, which the feed does not send.
      loadShadow();
      if (!historyRequested) {
        historyRequested = true;
        loadHistory();
      }
    },
  );
  loadSummary();
  const timer = setInterval(loadSummary, SUMMARY_REFRESH_SECONDS * 1000);

  return () => {
    clearInterval(timer);
    closeFeed();
    for (const chart of charts.values()) chart.destroy();
  };
}

function shadowOption(name) {
  return element("option", { value: name ?? "", text: name ?? "classic" });
}
