// The card fields page's glue: runs in an iframe on the fields origin, takes
// orders only from the embedding checkout page's origin (named in the URL
// as ?origin=, and checked against the frame's real ancestor), and gives
// that page nothing but sealed strings and field errors without values.

import { mount } from "./collect.js";

const card = document.getElementById("card");
const parentOrigin = new URLSearchParams(location.search).get("origin");
const ancestor = location.ancestorOrigins ? location.ancestorOrigins[0] : parentOrigin;

function refuse(reason) {
  card.textContent = `Card fields unavailable: ${reason}.`;
  throw new Error(reason);
}

if (window.parent === window) refuse("this page must be embedded in a checkout page");
if (!parentOrigin || ancestor !== parentOrigin) refuse("the embedding page's origin does not match");

function post(message) {
  window.parent.postMessage({ source: "cardvault-collect", ...message }, parentOrigin);
}

const fields = mount(card, {
  onChange: ({ brand, errors }) => post({ type: "change", brand, errors }),
});

window.addEventListener("message", async (event) => {
  if (event.source !== window.parent || event.origin !== parentOrigin) return;
  const m = event.data || {};
  if (m.type === "session") {
    try {
      fields.setSessionKey(m.sessionKey);
    } catch {
      post({ type: "invalid", errors: [{ field: "session", reason: "is not a collect session key" }] });
    }
  } else if (m.type === "seal") {
    try {
      post({ type: "sealed", sealed: await fields.seal() });
    } catch (e) {
      post({ type: "invalid", errors: e.errors || [{ field: "card", reason: "could not be sealed" }] });
    }
  } else if (m.type === "errors" && Array.isArray(m.errors)) {
    fields.showErrors(m.errors);
  } else if (m.type === "clear") {
    fields.clear();
  }
});

post({ type: "ready" });
