// The dashboard's router: the URL hash selects the view, so a view can be bookmarked and the
// server serves one page. Each view's mount() returns a function that stops its timers and
// feeds.
import { mountEngine } from "./engine.js";
import { mountFleet } from "./fleet.js";
import { mountThing } from "./thing.js";

let unmount = null;

function route() {
  const root = document.getElementById("view");
  if (unmount) unmount();
  root.replaceChildren();

  const hash = location.hash.replace(/^#/, "") || "/";
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

window.addEventListener("hashchange", route);
route();
