// The fleet view: one page of GET /things at a time, filtered by name prefix and connection
// state, read again every REFRESH_SECONDS so that connects and updates show up.
import { getJson } from "./api.js";
import { element, isoTime, timeAgo } from "./format.js";
import { thingHash } from "./thing.js";

const PAGE_SIZE = 50;
const REFRESH_SECONDS = 2;
// A page request without a reply by then is given up and reported.
const READ_TIMEOUT_SECONDS = 5;
// Wait after the last keystroke in the prefix box before requesting, in milliseconds.
const TYPING_DELAY_MS = 250;

// The filter outlives the view, so going back from a thing keeps it.
const filter = { prefix: "", status: "all" };

export function mountFleet(root) {
  // Tokens of the pages before the current one; the first page has token null.
  const tokens = [null];
  let nextToken = null;
  let typingTimer = null;

  const prefixInput = element("input", {
    id: "prefix",
    type: "search",
    placeholder: "name prefix",
    value: filter.prefix,
    "aria-label": "Name prefix",
  });
  const statusSelect = element(
    "select",
    { id: "status", "aria-label": "Connection state" },
    element("option", { value: "all", text: "all" }),
    element("option", { value: "connected", text: "connected" }),
    element("option", { value: "offline", text: "offline" }),
  );
  statusSelect.value = filter.status;
  const previous = element("button", { type: "button", text: "Previous" });
  const next = element("button", { type: "button", text: "Next" });
  const pageLabel = element("span", { class: "muted" });
  const error = element("span", { class: "message error" });
  // Workers left out of the page, while they restart or are stuck.
  const notice = element("p", { id: "fleet-notice", class: "message error" });
  const body = element("tbody");
  const table = element(
    "table",
    { id: "things" },
    element(
      "thead",
      {},
      element(
        "tr",
        {},
        element("th", { text: "Thing" }),
        element("th", { text: "Status" }),
        element("th", { text: "Last seen" }),
        element("th", { class: "number", text: "Shadow version" }),
        element("th", { text: "Delta" }),
      ),
    ),
    body,
  );

  root.append(
    element(
      "div",
      { class: "fleet" },
      element("h1", { text: "Fleet" }),
      element("div", { class: "toolbar" }, prefixInput, statusSelect, previous, next, pageLabel, error),
      notice,
      table,
    ),
  );

  // A request still waiting for its reply when the next refresh is due is left to finish.
  // A request made by the user (a new filter or page) runs anyway, and only the newest
  // reply is shown.
  let latest = 0;
  let waiting = false;

  async function load({ refresh = false } = {}) {
    if (refresh && waiting) return;
    const request = ++latest;
    waiting = true;
    const params = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
    if (filter.prefix) params.set("prefix", filter.prefix);
    if (filter.status !== "all") params.set("connected", String(filter.status === "connected"));
    const token = tokens[tokens.length - 1];
    if (token) params.set("nextToken", token);
    let page = null;
    let failure = null;
    try {
      page = await getJson(`/things?${params}`, { timeoutSeconds: READ_TIMEOUT_SECONDS });
    } catch (caught) {
      failure = caught;
    }
    if (request !== latest) return;
    waiting = false;
    if (failure) {
      error.textContent = `Loading things failed: ${failure.message}`;
    } else {
      error.textContent = "";
      nextToken = page.nextToken;
      render(page.things);
      notice.textContent = missingText(page.unavailableWorkers ?? []);
    }
    previous.disabled = tokens.length === 1;
    next.disabled = !nextToken;
    pageLabel.textContent = `page ${tokens.length}`;
  }

  function render(things) {
    const rows = things.map((thing) => {
      const link = element("a", { href: thingHash(thing.name), text: thing.name });
      const status = thing.connected ? "connected" : "offline";
      return element(
        "tr",
        { "data-thing": thing.name },
        element("td", {}, link),
        element("td", { class: `status ${status}`, text: status }),
        element("td", { title: isoTime(thing.lastSeen), text: timeAgo(thing.lastSeen) }),
        element("td", { class: "number", text: thing.version ?? "–" }),
        element("td", {
          class: "delta-marker",
          title: thing.pendingDelta ? "desired differs from reported" : "",
          text: thing.pendingDelta ? "● pending" : "",
        }),
      );
    });
    if (rows.length === 0) {
      rows.push(element("tr", {}, element("td", { colspan: "5", class: "muted", text: "No things match." })));
    }
    body.replaceChildren(...rows);
  }

  function missingText(missing) {
    if (missing.length === 0) return "";
    const workers = missing.map((entry) => entry.worker).join(", ");
    const plural = missing.length > 1;
    return (
      `${plural ? "Workers" : "Worker"} ${workers} did not respond, so ` +
      `${plural ? "their" : "its"} things are missing from this list. ` +
      missing.map((entry) => `Worker ${entry.worker}: ${entry.error}.`).join(" ")
    );
  }

  function restart() {
    tokens.length = 1;
    load();
  }

  prefixInput.addEventListener("input", () => {
    clearTimeout(typingTimer);
    typingTimer = setTimeout(() => {
      filter.prefix = prefixInput.value.trim();
      restart();
    }, TYPING_DELAY_MS);
  });
  statusSelect.addEventListener("change", () => {
    filter.status = statusSelect.value;
    restart();
  });
  next.addEventListener("click", () => {
    if (nextToken) {
      tokens.push(nextToken);
      load();
    }
  });
  previous.addEventListener("click", () => {
    if (tokens.length > 1) {
      tokens.pop();
      load();
    }
  });

  load();
  const timer = setInterval(() => load({ refresh: true }), REFRESH_SECONDS * 1000);
  return () => {
    clearInterval(timer);
    clearTimeout(typingTimer);
  };
}
