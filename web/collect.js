// cardvault collect: card fields whose values leave the page only sealed
// (HPKE, RFC 9180) to a key that only the vault holds. The merchant's
// backend relays the sealed string to TokenizeSealed and never sees the
// card. One ES module, no build step; HPKE is the vendored @hpke/core
// (web/vendor/hpke-core, see its package.json for the version), which runs
// on WebCrypto. The wire format is in docs/collect.md.

import {
  Aes256Gcm,
  CipherSuite,
  DhkemP256HkdfSha256,
  HkdfSha256,
} from "./vendor/hpke-core/esm/mod.js";

const encoder = new TextEncoder();

/** HPKE `info`, and the head of the associated data. */
export const INFO = encoder.encode("cardvault-collect-v1");

/** The suite: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM. */
export function suite() {
  return new CipherSuite({
    kem: new DhkemP256HkdfSha256(),
    kdf: new HkdfSha256(),
    aead: new Aes256Gcm(),
  });
}

function b64urlEncode(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function b64urlDecode(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new Error("not base64url");
  const b = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(b, (c) => c.charCodeAt(0));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Reads a session key ("cvk1." tenant "." session id "." base64url public
 * key), as CreateCollectSession returns it.
 */
export function parseSessionKey(text) {
  const parts = String(text).split(".");
  const bad = () => new Error("sessionKey: not a cardvault collect session key");
  if (parts.length !== 4 || parts[0] !== "cvk1") throw bad();
  const [, tenant, sessionId, key] = parts;
  if (!/^[a-z0-9_-]{1,64}$/.test(tenant) || !/^cs_[A-Za-z0-9_-]{22}$/.test(sessionId)) {
    throw bad();
  }
  const publicKey = b64urlDecode(key);
  if (publicKey.length !== 65 || publicKey[0] !== 4) throw bad();
  return { tenant, sessionId, publicKey };
}

/** The associated data: INFO, 0x00, tenant, 0x00, session id. */
export function aad(tenant, sessionId) {
  return concat(INFO, [0], encoder.encode(tenant), [0], encoder.encode(sessionId));
}

/**
 * Seals a card ({pan, exp_month, exp_year, cvv?, name?}) to a session key.
 * Returns "v1." and base64url of enc || ciphertext.
 */
export async function sealCard(sessionKey, card) {
  const { tenant, sessionId, publicKey } = parseSessionKey(sessionKey);
  const s = suite();
  const recipientPublicKey = await s.kem.deserializePublicKey(publicKey);
  const sender = await s.createSenderContext({ recipientPublicKey, info: INFO });
  const payload = { pan: card.pan, exp_month: card.exp_month, exp_year: card.exp_year };
  if (card.cvv) payload.cvv = card.cvv;
  if (card.name) payload.name = card.name;
  const plaintext = encoder.encode(JSON.stringify(payload));
  try {
    const ct = new Uint8Array(await sender.seal(plaintext, aad(tenant, sessionId)));
    return "v1." + b64urlEncode(concat(new Uint8Array(sender.enc), ct));
  } finally {
    plaintext.fill(0);
  }
}

// ---------------------------------------------------------------- card rules

/** The digits of a typed card number (spaces and dashes dropped). */
export function digitsOf(text) {
  return String(text).replace(/[\s-]/g, "");
}

/** The Luhn check. */
export function luhnValid(digits) {
  if (!/^\d+$/.test(digits)) return false;
  let sum = 0;
  for (let i = 0; i < digits.length; i++) {
    let d = digits.charCodeAt(digits.length - 1 - i) - 48;
    if (i % 2 === 1) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
  }
  return sum % 10 === 0;
}

/** The brand of a card number by its leading digits ("" when unknown). */
export function brandOf(digits) {
  if (/^3[47]/.test(digits)) return "amex";
  if (/^4/.test(digits)) return "visa";
  if (/^(5[1-5]|2(2[2-9]|[3-6]\d|7[01]|720))/.test(digits)) return "mastercard";
  if (/^(6011|65|64[4-9])/.test(digits)) return "discover";
  if (/^35(2[89]|[3-8])/.test(digits)) return "jcb";
  if (/^3(0[0-5]|[68])/.test(digits)) return "diners";
  return "";
}

/** Groups a card number for display: 4-6-5 for Amex, fours otherwise. */
export function formatNumber(digits) {
  const d = digits.replace(/\D/g, "").slice(0, 19);
  const groups = brandOf(d) === "amex" ? [4, 6, 5] : [4, 4, 4, 4, 3];
  const out = [];
  let at = 0;
  for (const g of groups) {
    if (at >= d.length) break;
    out.push(d.slice(at, at + g));
    at += g;
  }
  return out.join(" ");
}

/** Reads "MM/YY" or "MM/YYYY"; null when malformed. */
export function parseExpiry(text) {
  const m = /^\s*(\d{1,2})\s*\/\s*(\d{2}|\d{4})\s*$/.exec(text);
  if (!m) return null;
  const month = Number(m[1]);
  const year = m[2].length === 2 ? 2000 + Number(m[2]) : Number(m[2]);
  return { month, year };
}

/**
 * Checks a card before sealing. Returns [{field, reason}] naming the field
 * and the reason, never the value; empty when the card looks valid (the
 * vault checks again).
 */
export function validate(card, today = new Date()) {
  const errors = [];
  const d = digitsOf(card.number);
  if (!d) errors.push({ field: "number", reason: "is required" });
  else if (!/^\d{12,19}$/.test(d)) errors.push({ field: "number", reason: "must be 12 to 19 digits" });
  else if (!luhnValid(d)) errors.push({ field: "number", reason: "fails the check; look again at the number" });
  const exp = parseExpiry(card.expiry || "");
  if (!exp || exp.month < 1 || exp.month > 12) {
    errors.push({ field: "expiry", reason: "must be MM/YY" });
  } else {
    const now = today.getFullYear() * 12 + today.getMonth();
    if (exp.year * 12 + exp.month - 1 < now) errors.push({ field: "expiry", reason: "has passed" });
  }
  const cvc = (card.cvc || "").trim();
  const cvcLen = brandOf(d) === "amex" ? 4 : 3;
  if (cvc && !new RegExp(`^\\d{${cvcLen}}$`).test(cvc)) {
    errors.push({ field: "cvc", reason: `must be ${cvcLen} digits` });
  }
  return errors;
}

// -------------------------------------------------------------------- fields

const LABELS = { number: "Card number", expiry: "Expiry (MM/YY)", cvc: "Security code", name: "Name on card" };

/**
 * Draws card fields into `element`. Options: `sessionKey` (from
 * CreateCollectSession; can be replaced with `setSessionKey`), and
 * optionally `onChange({brand, errors})`. Returns a handle whose `seal()`
 * validates and resolves to the sealed string, or rejects with
 * `{errors: [{field, reason}]}`.
 */
export function mount(element, options = {}) {
  let sessionKey = options.sessionKey || null;
  const doc = element.ownerDocument;
  const inputs = {};
  const messages = {};
  const form = doc.createElement("div");
  form.className = "cv-card";
  for (const [field, attrs] of [
    ["number", { inputmode: "numeric", autocomplete: "cc-number", placeholder: "1234 1234 1234 1234" }],
    ["expiry", { inputmode: "numeric", autocomplete: "cc-exp", placeholder: "MM/YY" }],
    ["cvc", { inputmode: "numeric", autocomplete: "cc-csc", placeholder: "123" }],
    ["name", { autocomplete: "cc-name", placeholder: "As on the card" }],
  ]) {
    const row = doc.createElement("label");
    row.className = `cv-row cv-${field}`;
    const caption = doc.createElement("span");
    caption.textContent = LABELS[field];
    const input = doc.createElement("input");
    input.name = field;
    input.id = `cv-${field}`;
    for (const [k, v] of Object.entries(attrs)) input.setAttribute(k, v);
    input.spellcheck = false;
    const msg = doc.createElement("span");
    msg.className = "cv-error";
    msg.id = `cv-${field}-error`;
    msg.setAttribute("role", "alert");
    row.append(caption, input, msg);
    form.append(row);
    inputs[field] = input;
    messages[field] = msg;
  }
  const brand = doc.createElement("span");
  brand.className = "cv-brand";
  brand.id = "cv-brand";
  inputs.number.after(brand);
  element.replaceChildren(form);

  const card = () => ({
    number: inputs.number.value,
    expiry: inputs.expiry.value,
    cvc: inputs.cvc.value,
    name: inputs.name.value,
  });
  const show = (errors) => {
    for (const f of Object.keys(messages)) messages[f].textContent = "";
    for (const e of errors) {
      if (messages[e.field]) messages[e.field].textContent = `${LABELS[e.field]} ${e.reason}`;
    }
  };
  const changed = () => {
    const d = digitsOf(inputs.number.value);
    brand.textContent = brandOf(d);
    // A hint while typing: a full-length number that fails the check.
    const full = brandOf(d) === "amex" ? d.length === 15 : d.length >= 16;
    const errors = full && !luhnValid(d) ? [{ field: "number", reason: "fails the check; look again at the number" }] : [];
    show(errors);
    if (options.onChange) options.onChange({ brand: brandOf(d), errors });
  };
  inputs.number.addEventListener("input", () => {
    const pos = inputs.number.selectionStart === inputs.number.value.length;
    inputs.number.value = formatNumber(inputs.number.value);
    if (pos) inputs.number.selectionStart = inputs.number.value.length;
    changed();
  });
  inputs.expiry.addEventListener("input", () => {
    const d = inputs.expiry.value.replace(/\D/g, "").slice(0, 4);
    inputs.expiry.value = d.length > 2 ? `${d.slice(0, 2)}/${d.slice(2)}` : d;
  });
  inputs.cvc.addEventListener("input", () => {
    inputs.cvc.value = inputs.cvc.value.replace(/\D/g, "").slice(0, 4);
  });

  return {
    /** Replaces the session key (each session opens one seal). */
    setSessionKey(key) {
      parseSessionKey(key);
      sessionKey = key;
    },
    /** Field errors of the current input, shown beside the fields. */
    validate() {
      const errors = validate(card());
      show(errors);
      return errors;
    },
    /** Shows errors the vault returned ({field, reason}). */
    showErrors(errors) {
      show(errors);
    },
    /** Validates and seals the card; rejects with {errors}. */
    async seal() {
      const errors = this.validate();
      if (errors.length) throw { errors };
      if (!sessionKey) throw { errors: [{ field: "session", reason: "is missing" }] };
      const c = card();
      const exp = parseExpiry(c.expiry);
      return sealCard(sessionKey, {
        pan: digitsOf(c.number),
        exp_month: exp.month,
        exp_year: exp.year,
        cvv: c.cvc.trim() || undefined,
        name: c.name.trim() || undefined,
      });
    },
    /** Empties the fields. */
    clear() {
      for (const i of Object.values(inputs)) i.value = "";
      changed();
    },
  };
}
