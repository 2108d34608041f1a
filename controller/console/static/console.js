// edgefleet console: live updates over server-sent events, fragment swap, confirmations.
// No inline scripts anywhere (the CSP forbids them); this file is all the JavaScript.
"use strict";

(function () {
  const main = document.getElementById("main");
  let source = null;
  let fetching = false;
  let again = false;

  // Keep the focused control (by id or name), what is typed into it, its caret and the
  // scroll positions across a swap: live data never throws typing away.
  function focusState() {
    const el = document.activeElement;
    if (!el || el === document.body || !main.contains(el)) return null;
    const state = { id: el.id, name: el.name, value: null, start: null, end: null };
    if (el.matches("input, textarea, select")) {
      state.value = el.value;
      if (typeof el.selectionStart === "number") {
        state.start = el.selectionStart;
        state.end = el.selectionEnd;
      }
    }
    return state.id || state.name ? state : null;
  }

  function restoreFocus(state) {
    if (!state) return;
    const el = state.id
      ? document.getElementById(state.id)
      : main.querySelector('[name="' + CSS.escape(state.name) + '"]');
    if (!el) return;
    if (state.value !== null && "value" in el) el.value = state.value;
    el.focus({ preventScroll: true });
    if (state.start !== null && typeof el.setSelectionRange === "function") {
      try {
        el.setSelectionRange(state.start, state.end);
      } catch (err) {
        // Inputs without a text caret (checkbox, number) have no selection.
      }
    }
  }

  function scrollers() {
    return Array.from(main.querySelectorAll(".scroll")).map((el) => el.scrollLeft);
  }

  async function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const resp = await fetch(window.location.href, {
        headers: { "X-Console-Fragment": "main" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (resp.redirected || resp.status === 401) {
        window.location.assign("/ui/login");
        return;
      }
      if (!resp.ok) return;
      const html = await resp.text();
      const focus = focusState();
      const x = window.scrollX;
      const y = window.scrollY;
      const lefts = scrollers();
      main.innerHTML = html;
      main.querySelectorAll(".scroll").forEach((el, i) => {
        if (lefts[i] !== undefined) el.scrollLeft = lefts[i];
      });
      window.scrollTo(x, y);
      restoreFocus(focus);
      main.dispatchEvent(new CustomEvent("console:swapped", { bubbles: true }));
    } catch (err) {
      // A network hiccup: the next event tries again.
    } finally {
      fetching = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function connect() {
    const view = main && main.dataset.live;
    if (!view || !window.EventSource) return;
    source = new EventSource("/ui/live?view=" + encodeURIComponent(view));
    source.addEventListener("changed", refresh);
    source.addEventListener("logout", () => {
      source.close();
      window.location.assign("/ui/login");
    });
  }

  // Confirmation for destructive actions: forms with data-confirm ask first.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    }
  });

  window.addEventListener("pagehide", () => {
    if (source) source.close();
  });

  if (main) {
    connect();
    document.documentElement.classList.add("js");
  }
})();
