// Runs collect.js's HPKE suite (the vendored @hpke/core on WebCrypto) in
// the browser against RFC 9180's published vectors for the suite: with
// the vector's ephemeral key, sealing gives the vector's enc and
// ciphertexts; the recipient opens them to the plaintexts. The browser
// test reads the verdict from #result.

import { aad, sealCard, suite } from "../collect.js";

const hex = (s) => Uint8Array.from(s.match(/../g) || [], (h) => parseInt(h, 16));
const toHex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");
const result = document.getElementById("result");

function same(what, got, want) {
  if (toHex(got) !== want) throw new Error(`${what}: got ${toHex(got)}, want ${want}`);
}

try {
  const file = await (await fetch("hpke-vectors.json")).json();
  let checks = 0;
  for (const v of file.vectors) {
    if (v.mode !== 0 || v.kem_id !== 16 || v.kdf_id !== 1 || v.aead_id !== 2) throw new Error("not this suite's vector");
    const s = suite();
    const recipient = await s.kem.deriveKeyPair(hex(v.ikmR).buffer);
    same("pkR", await s.kem.serializePublicKey(recipient.publicKey), v.pkRm);
    const ephemeral = await s.kem.deriveKeyPair(hex(v.ikmE).buffer);
    const sender = await s.createSenderContext({
      recipientPublicKey: recipient.publicKey,
      info: hex(v.info),
      ekm: ephemeral,
    });
    same("enc", sender.enc, v.enc);
    for (const e of v.encryptions) {
      same("ct", await sender.seal(hex(e.pt), hex(e.aad)), e.ct);
      checks++;
    }
    const opener = await s.createRecipientContext({ recipientKey: recipient, enc: hex(v.enc).buffer, info: hex(v.info) });
    for (const e of v.encryptions) {
      same("pt", await opener.open(hex(e.ct), hex(e.aad)), e.pt);
      checks++;
    }
    // And sealCard's own framing round-trips through the same suite.
    const pk = new Uint8Array(await s.kem.serializePublicKey(recipient.publicKey));
    let b64 = btoa(String.fromCharCode(...pk)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    const sealed = await sealCard(`cvk1.demo.cs_AAAAAAAAAAAAAAAAAAAAAA.${b64}`, { pan: "4111111111111111", exp_month: 12, exp_year: 2030 });
    const raw = Uint8Array.from(atob(sealed.slice(3).replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
    const back = await s.open({ recipientKey: recipient, enc: raw.slice(0, 65).buffer, info: new TextEncoder().encode("cardvault-collect-v1") }, raw.slice(65), aad("demo", "cs_AAAAAAAAAAAAAAAAAAAAAA"));
    const card = JSON.parse(new TextDecoder().decode(back));
    if (card.pan !== "4111111111111111" || card.exp_month !== 12) throw new Error("sealCard round trip");
    checks++;
  }
  result.textContent = `PASS ${checks}`;
} catch (e) {
  result.textContent = `FAIL ${e && e.message ? e.message : e}`;
}
