// The dashboard's router: the URL hash selects the view, so a view can be bookmarked and the
// server serves one page. Each view's mount() returns a function that stops its timers and
// feeds. Once the engine has users, the sign-in view replaces the others until the browser
// has a valid session, and again whenever a request gets 401.
import { getSession, onUnauthorized, signOut } from "./api.js";
import { mountEngine } from "./engine.js";
import { mountFleet } from "./fleet.js";
import { mountLogin } from "./login.js";
import { mountThing, thingHash } from "./thing.js";

let unmount = null;
// The GET /auth/session document, or null while signed out or not yet read.
let session = null;
let signedOut = false;

function clearView() {
  const root = document.getElementById("view");
  if (unmount) unmount();
  unmount = null;
  root.replaceChildren();
  return root;
}

function showSession() {
  document.body.classList.toggle("signed-out", signedOut);
  const box = document.getElementById("session");
  const signedIn = session !== null && session.required;
  box.hidden = !signedIn;
  if (signedIn) {
    document.getElementById("session-user").textContent = `${session.username} (${session.role})`;
  }
}

function showLogin(notice) {
  if (signedOut) return;
  signedOut = true;
  session = null;
  showSession();
  const root = clearView();
  unmount = mountLogin(root, notice, (document) => {
    signedOut = false;
    session = document;
    showSession();
    route();
  });
}

function route() {
  if (signedOut) return;
  const hash = location.hash.replace(/^#/, "") || "/";
  // A device may read only its own thing, so it starts there.
  if (session && session.role === "device" && !hash.startsWith("/thing/")) {
    location.hash = thingHash(session.username);
    return;
  }
  const root = clearView();
  let active = "fleet";
  if (hash.startsWith("/thing/")) {
    // thingHash() in thing.js writes these: /thing/{thing} or /thing/{thing}/shadow/{name}.
    const [thing, shadowName] = hash.slice("/thing/".length).split("/shadow/");
    unmount = mountThing(
      root,
      decodeURIComponent(thing),
      shadowName === undefined ? null : decodeURIComponent(shadowName),
    );
  } else if (hash === "/engine") {
    active = "engine";
    unmount = mountEngine(root);
  } else {
    unmount = mountFleet(root);
  }
  for (const link of document.querySelectorAll("header nav a[data-view]")) {
    link.classList.toggle("active", link.dataset.view === active);
  }
}

async function start() {
  // The sign-in view shows the reason for a 401 in the middle of a session (expired, or the
  // user was removed), but not for the first one, before any sign-in.
  onUnauthorized((message) => showLogin(session ? `Signed out: ${message}` : ""));
  document.getElementById("sign-out").addEventListener("click", async (event) => {
    event.preventDefault();
    await signOut();
    session = null;
    showLogin("");
  });
  window.addEventListener("hashchange", route);
  try {
    session = await getSession();
  } catch (failure) {
    // A 401 has already shown the sign-in view. The views show other failures themselves.
    if (failure.status === 401) return;
  }
  showSession();
  route();
}

start();
