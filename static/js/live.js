// The tenant's live events, one socket per page. Every event from /ws/dashboard/ is dispatched on
// document as "portal-dashboard" (detail: {kind, payload}); a notification also as "portal-notification",
// which the navbar's bell listens for. Pages whose own script opens /ws/dashboard/ keep their socket and
// this listens on it; on other pages this opens one. So no page holds two sockets to the same group.
(function () {
  "use strict";
  const PATH = "/ws/dashboard/";
  const Native = window.WebSocket;
  let pageHasSocket = false;

  function forward(message) {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch (error) {
      return;
    }
    document.dispatchEvent(new CustomEvent("portal-dashboard", {detail: event}));
    if (event.kind === "notification") {
      document.dispatchEvent(new CustomEvent("portal-notification", {detail: event.payload}));
    }
  }

  function isDashboard(url) {
    try {
      return new URL(String(url), location.href).pathname === PATH;
    } catch (error) {
      return false;
    }
  }

  // Sockets the page's scripts open are the browser's own; this only listens on the dashboard one.
  function Watched(url, protocols) {
    const socket = protocols === undefined ? new Native(url) : new Native(url, protocols);
    if (isDashboard(url)) {
      pageHasSocket = true;
      socket.addEventListener("message", forward);
    }
    return socket;
  }
  Watched.prototype = Native.prototype;
  Object.assign(Watched, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
  window.WebSocket = Watched;

  let delay = 1000;
  function connect() {
    if (pageHasSocket) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new Native(`${scheme}://${location.host}${PATH}`);
    socket.addEventListener("message", forward);
    socket.addEventListener("open", function () { delay = 1000; });
    socket.addEventListener("close", function (event) {
      if (event.code === 4403) return;  // not a member of any tenant: nothing to listen to
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    });
  }
  // Page scripts run before DOMContentLoaded: by then a page that opens its own socket has done so.
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", connect);
  } else {
    connect();
  }
})();
