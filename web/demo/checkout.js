// The demo merchant's checkout page. It embeds the card fields from the
// fields origin, asks them for a sealed card, and relays it to its own
// backend with the session id. It never reads a card field: it cannot
// (another origin), and it does not need to.

const FIELD_NAMES = { pan: "Card number", exp_month: "Expiry month", exp_year: "Expiry year", cvv: "Security code", cardholder_name: "Name on card", number: "Card number", expiry: "Expiry", cvc: "Security code", name: "Name on card", sealed: "Card details", session: "Session" };
const FIELD_OF = { pan: "number", exp_month: "expiry", exp_year: "expiry", cvv: "cvc", cardholder_name: "name" };

const config = await (await fetch("/config")).json();
const frame = document.getElementById("card-frame");
const pay = document.getElementById("pay");
const errorBox = document.getElementById("error");
const result = document.getElementById("result");
let session = null;

frame.src = `${config.fields_origin}/fields.html?origin=${encodeURIComponent(location.origin)}`;

function toFields(message) {
  frame.contentWindow.postMessage(message, config.fields_origin);
}

function showErrors(errors) {
  errorBox.textContent = errors.map((e) => `${FIELD_NAMES[e.field] || e.field} ${e.reason}`).join("; ");
}

// Each session opens one seal: a fresh one before every attempt.
async function newSession() {
  const r = await fetch("/session", { method: "POST" });
  session = await r.json();
  if (!r.ok) throw new Error(session.error ? session.error.message : "no session");
  toFields({ type: "session", sessionKey: session.session_key });
}

window.addEventListener("message", async (event) => {
  if (event.origin !== config.fields_origin || event.source !== frame.contentWindow) return;
  const m = event.data || {};
  if (m.type === "ready") {
    await newSession();
    pay.disabled = false;
  } else if (m.type === "invalid") {
    showErrors(m.errors);
    pay.disabled = false;
  } else if (m.type === "sealed") {
    const r = await fetch("/pay", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ session_id: session.session_id, sealed: m.sealed }),
    });
    const out = await r.json();
    await newSession();
    pay.disabled = false;
    if (out.token) {
      errorBox.textContent = "";
      result.textContent = `Paid. Token ${out.token} (${out.brand} •••• ${out.last4})`;
      result.dataset.token = out.token;
      toFields({ type: "clear" });
    } else {
      const e = out.error || { field: "card", reason: "was refused" };
      showErrors([e]);
      if (FIELD_OF[e.field]) toFields({ type: "errors", errors: [{ field: FIELD_OF[e.field], reason: e.reason }] });
    }
  }
});

pay.addEventListener("click", () => {
  pay.disabled = true;
  errorBox.textContent = "";
  result.textContent = "";
  toFields({ type: "seal" });
});
