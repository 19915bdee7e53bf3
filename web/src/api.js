// Requests to the engine's REST API and its /ws shadow feed. Once the engine has users, the
// browser sends the session cookie that POST /auth/login sets with every request.

// Called when a request gets 401: the session expired, was revoked or never existed.
let unauthorizedHandler = null;

export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

async function readResponse(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.message ? body.message : response.statusText;
    if (response.status === 401 && unauthorizedHandler) unauthorizedHandler(message);
    throw new ApiError(response.status, message);
  }
  return body;
}

// With `timeoutSeconds`, a request without a reply by then fails with "no reply within N s".
export async function getJson(path, { timeoutSeconds } = {}) {
  const options = { headers: { Accept: "application/json" } };
  if (timeoutSeconds) options.signal = AbortSignal.timeout(timeoutSeconds * 1000);
  try {
    return await readResponse(await fetch(path, options));
  } catch (failure) {
    if (failure.name === "TimeoutError") throw new Error(`no reply within ${timeoutSeconds} s`);
    throw failure;
  }
}

export async function postJson(path, document) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(document),
  });
  return readResponse(response);
}

// GET /auth/session: {required: false} while the engine has no users, else the signed-in
// user. Throws ApiError with status 401 when a sign-in is needed.
export async function getSession() {
  return getJson("/auth/session");
}

// POST /auth/login, which sets the session cookie. A wrong password throws ApiError 401
// without calling the unauthorized handler.
export async function signIn(username, password) {
  const response = await fetch("/auth/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, body && body.message ? body.message : response.statusText);
  }
  return body;
}

export async function signOut() {
  await fetch("/auth/logout", { method: "POST" });
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Seconds between reconnection attempts after the feed closes.
const FEED_RECONNECT_SECONDS = 2;

// Follow the /ws feed for `patterns` (thing names or prefix patterns). `onFrame` gets each
// change frame, `onOpen` runs after every (re)subscription, so the caller can read the
// current state then, as the feed sends no snapshot. Returns a function that closes the feed.
export function followFeed(patterns, onFrame, onOpen) {
  let socket = null;
  let closed = false;
  let retry = null;

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}/ws`);
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ subscribe: patterns }));
    });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.thing !== undefined) {
        onFrame(message);
      } else if (message.subscriptions !== undefined) {
        onOpen();
      } else if (message.error !== undefined) {
        console.error("feed request rejected:", message.error);
      }
    });
    socket.addEventListener("close", () => {
      if (!closed) {
        retry = setTimeout(connect, FEED_RECONNECT_SECONDS * 1000);
      }
    });
  }

  connect();
  return () => {
    closed = true;
    clearTimeout(retry);
    socket.close();
  };
}
