// The engine view: GET /api/engine every REFRESH_SECONDS. Rates are the change of a counter
// between two readings divided by the time between them. With several worker processes the
// figures are the totals of the workers that replied, and a table shows each worker's own.
// A worker's rates count only between two readings of the same process: a worker that did
// not reply, or restarted (its counters went down), adds nothing to that interval's rates.
import { getJson } from "./api.js";
import { TimeChart } from "./chart.js";
import { element, formatNumber } from "./format.js";

const REFRESH_SECONDS = 1;
// The engine waits up to 2 s for each worker's figures. A reading that takes much longer
// waits on a stuck process that holds this page's connection, so it is given up.
const READ_TIMEOUT_SECONDS = 5;
// Ten minutes of readings in the chart.
const CHART_POINTS = 600;

export function mountEngine(root) {
  const figures = {};
  function card(key, label) {
    figures[key] = element("div", { class: "figure", id: `engine-${key}`, text: "–" });
    return element("div", { class: "card" }, element("div", { class: "label", text: label }), figures[key]);
  }

  const error = element("p", { class: "message error" });
  const workerRows = element("tbody", { id: "workers" });
  const workersSection = element(
    "section",
    { hidden: true },
    element("h2", { text: "Workers" }),
    element(
      "table",
      {},
      element(
        "thead",
        {},
        element(
          "tr",
          {},
          element("th", { text: "worker" }),
          element("th", { class: "number", text: "MQTT clients" }),
          element("th", { class: "number", text: "PUBLISH received/s" }),
          element("th", { class: "number", text: "shadow updates/s" }),
          element("th", { class: "number", text: "shadow writes waiting" }),
          element("th", { text: "state" }),
        ),
      ),
      workerRows,
    ),
  );
  const chartBox = element("div", { class: "panel" });
  root.append(
    element("h1", { text: "Engine" }),
    error,
    element("h2", { text: "Messages" }),
    element(
      "div",
      { class: "cards" },
      card("received", "PUBLISH received per second"),
      card("sent", "PUBLISH sent per second"),
      card("updates", "shadow updates per second"),
      card("dropped", "messages dropped (total)"),
    ),
    element("section", {}, chartBox),
    element("section", {}, element("h2", { text: "Connections" })),
    element(
      "div",
      { class: "cards" },
      card("mqtt", "MQTT clients connected"),
      card("mqttWebSocket", "of those over WebSocket"),
      card("offlineSessions", "offline persistent sessions"),
      card("feedClients", "live feed clients"),
    ),
    element("section", {}, element("h2", { text: "Store queues and backpressure" })),
    element(
      "div",
      { class: "cards" },
      card("pressure", "backpressure"),
      card("pendingWrites", "shadow writes waiting"),
      card("pendingBytes", "bytes waiting"),
      card("historyOutboxRows", "history rows waiting"),
    ),
    workersSection,
  );
  const chart = new TimeChart(chartBox, "messages per second", ["received", "sent"], CHART_POINTS);

  let previous = null;

  function show(key, text, alert = false) {
    figures[key].textContent = text;
    figures[key].parentElement.classList.toggle("alert", alert);
  }

  // A reading still waiting for its reply when the next one is due is left to finish.
  let reading = false;
  // Whether a reading failed since the last one shown, so that the chart breaks its lines.
  let missed = false;

  async function load() {
    if (reading) return;
    reading = true;
    let status;
    try {
      status = await getJson("/api/engine", { timeoutSeconds: READ_TIMEOUT_SECONDS });
    } catch (failure) {
      const age = previous ? ` (figures below from ${new Date(previous.timestamp * 1000).toLocaleTimeString()})` : "";
      error.textContent = `Reading /api/engine failed: ${failure.message}${age}`;
      missed = true;
      return;
    } finally {
      reading = false;
    }
    const counters = status.counters;
    const down = (status.workers ?? []).flatMap((worker, index) => (worker.up ? [] : [index]));
    error.textContent = down.length
      ? `${down.length > 1 ? "Workers" : "Worker"} ${down.join(", ")} did not reply (restarting or stuck); ` +
        `the figures leave ${down.length > 1 ? "them" : "it"} out.`
      : "";
    if (previous) {
      const seconds = status.timestamp - previous.timestamp;
      const rate = (name) => increase(status, previous, name) / seconds;
      show("received", formatNumber(rate("publishReceived"), 1));
      show("sent", formatNumber(rate("publishSent"), 1));
      show("updates", formatNumber(rate("shadowUpdates"), 1));
      // uPlot leaves a gap at a null value instead of drawing a line across the failed readings.
      if (missed) chart.append((previous.timestamp + status.timestamp) / 2, [null, null]);
      chart.append(status.timestamp, [rate("publishReceived"), rate("publishSent")]);
    }
    const dropped = counters.publishDropped + counters.queueDropped;
    show("dropped", formatNumber(dropped), dropped > 0);
    for (const [key, value] of Object.entries(status.connections)) show(key, formatNumber(value));

    const store = status.store;
    if (store) {
      let state = "normal";
      if (store.pressure) {
        state = "PRESSURE: devices slowed";
      } else if (status.readingPaused) {
        state = "reading paused";
      }
      show("pressure", state, store.pressure || status.readingPaused);
      show("pendingWrites", formatNumber(store.pendingWrites));
      show("pendingBytes", formatNumber(store.pendingBytes));
      show("historyOutboxRows", formatNumber(store.historyOutboxRows));
    } else {
      show("pressure", status.readingPaused ? "reading paused" : "normal (memory only)", status.readingPaused);
      for (const key of ["pendingWrites", "pendingBytes", "historyOutboxRows"]) show(key, "–");
    }
    showWorkers(status, previous);
    previous = status;
    missed = false;
  }

  // One row per worker; its rates need the same worker's previous reading.
  function showWorkers(status, previous) {
    const workers = status.workers;
    workersSection.hidden = !workers;
    if (!workers) return;
    const seconds = previous ? status.timestamp - previous.timestamp : 0;
    const rows = workers.map((worker, index) => {
      if (!worker.up) {
        const row = element("tr", { "data-worker": String(index), class: "alert" }, element("td", { text: String(index) }));
        for (const name of ["clients", "received", "updates", "writes"]) {
          row.append(element("td", { class: `number ${name}`, text: "–" }));
        }
        row.append(element("td", { class: "pressure", text: "not replying" }));
        return row;
      }
      const before = previous?.workers?.[index];
      const rate = (name) => {
        const change = counterIncrease(worker, before, name);
        return change === null || seconds <= 0 ? "–" : formatNumber(change / seconds, 1);
      };
      const store = worker.store;
      let pressure = "normal";
      if (store?.pressure) {
        pressure = "PRESSURE";
      } else if (worker.readingPaused) {
        pressure = "reading paused";
      }
      return element(
        "tr",
        { "data-worker": String(index) },
        element("td", { text: String(index) }),
        element("td", { class: "number clients", text: formatNumber(worker.connections.mqtt) }),
        element("td", { class: "number received", text: rate("publishReceived") }),
        element("td", { class: "number updates", text: rate("shadowUpdates") }),
        element("td", { class: "number writes", text: store ? formatNumber(store.pendingWrites) : "–" }),
        element("td", { class: "pressure", text: pressure }),
      );
    });
    workerRows.replaceChildren(...rows);
  }

  // The increase of counter `name` from `previous` to `status`: the sum over the workers
  // that gave both readings from the same process.
  function increase(status, previous, name) {
    if (!status.workers) return status.counters[name] - previous.counters[name];
    return status.workers.reduce(
      (sum, worker, index) => sum + (counterIncrease(worker, previous.workers?.[index], name) ?? 0),
      0,
    );
  }

  load();
  const timer = setInterval(load, REFRESH_SECONDS * 1000);
  return () => {
    clearInterval(timer);
    chart.destroy();
  };
}

// The increase of one worker's counter between two readings, or null when either reading
// is missing or down, or the counter went down because the worker restarted in between.
function counterIncrease(worker, before, name) {
  if (!worker?.up || !before?.up) return null;
  const change = worker.counters[name] - before.counters[name];
  return change >= 0 ? change : null;
}
