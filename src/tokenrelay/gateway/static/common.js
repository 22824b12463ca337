// What the two pages share. Nothing here (or anywhere in the pages) turns a string into
// HTML: text goes in with textContent and text nodes only, and the Content-Security-Policy
// (Trusted Types) makes any innerHTML assignment throw.
"use strict";

const Relay = {
  // The terminal viewer's rule (tokenrelay.terminal.printable): C0 controls but tab and
  // newline, DEL, C1 controls and the bidirectional overrides become U+FFFD.
  printable(text) {
    return text
      .replace(/\r\n/g, "\n")
      .replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]/g, "\ufffd");
  },

  // A new element holding `text` as text.
  el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  },

  // Show `text` in the element with id `id` (hidden when empty), made printable: messages
  // quote what model servers and models wrote.
  say(id, text) {
    const node = document.getElementById(id);
    node.textContent = Relay.printable(text || "");
    node.hidden = !text;
  },

  // fetch() a JSON endpoint; resolves to {ok, status, body}.
  async call(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (error) {
      return { ok: false, status: 0, body: { error: { message: "the gateway cannot be reached" } } };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    return { ok: response.ok, status: response.status, body };
  },

  // The message of an error body, or a fallback.
  message(result, fallback) {
    return (result.body && result.body.error && result.body.error.message) || fallback;
  },

  bearer(key) {
    return { Authorization: "Bearer " + key };
  },
};
