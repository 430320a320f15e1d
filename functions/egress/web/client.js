// wsrelay browser client: one dependency-free ES module (docs/clients.md).
//
//   import { WsRelay } from "/client.js";
//   const c = new WsRelay("wss://egress.example.com/ws", { getToken: () => fetchToken() });
//   const sub = c.subscribe("room:1", {
//     onMessage: (m) => show(m.data),
//     onSubscribed: (recovered) => { if (!recovered) reload(); },
//   });
//   c.on("state", (s) => badge(s));
//
// It reconnects with exponential backoff and full jitter after every close
// the server marks as retryable, resubscribes each channel with "after" set
// to the last id it delivered (so nothing is lost or repeated), and tells
// the application when a resume had a gap (recovered === false). It does not
// reconnect after 4003 (disconnected by an operator), 1002, 1007, 1008 or 1009,
// nor after 4004 (token expired) without getToken, nor after a dial the
// browser refuses with a SecurityError (a ws:// URL from an https:// page,
// which would be refused at every dial), and asks getToken() for
// a fresh token after 4004 and after a connection refused before its
// welcome (an expired token is refused at the upgrade, which a browser
// reports only as a close).
//
// A connection that went silent without a close (laptop sleep, a Wi-Fi or
// NAT change) looks open to a page until TCP gives up, minutes later: the
// server's WebSocket pings are invisible to it. So when no frame has come
// for activityTimeout (50 s) the client sends {"type":"ping"}, and drops
// the socket (then reconnects and resumes, as after a 1006) when no frame
// at all follows within pongTimeout (10 s). A server whose welcome carries
// idle_timeout_ms closes idle connections itself (4000): the client then
// probes only after a silence longer than that, so its pings never keep
// open a connection the server would close. A dial not welcomed within
// connectTimeout (activityTimeout + pongTimeout) is dropped, probes on or
// off, and a getToken() not settled within it is asked again. Where the
// runtime has network events (browsers, workers), "online" ends a wait to
// reconnect at once and probes a connected socket, and "offline" probes
// it: a short loss keeps the connection, a dead one is dropped within
// pongTimeout.
//
// publish() sends a message through the ingress, retried with one
// Idempotency-Key so that it is written once:
//
//   import { publish } from "/client.js";
//   await publish("https://ingress.example.com", "room:1", { text: "hi" }, { token });

const FINAL = new Set([4003, 1002, 1007, 1008, 1009]);
const TOKEN_EXPIRED = 4004;
// activityTimeout's default (ms); connectTimeout's part of it when probes are off.
const ACTIVITY_TIMEOUT = 50000;
const PLANNED = new Set([1001, 4000, 4001]);
// The largest frame of subscribes sent, whatever max_frame_bytes allows.
const MAX_BATCH_BYTES = 64 * 1024;
// How much longer than a server's idle timeout (welcome idle_timeout_ms)
// a connection must be silent before the client probes it: the egress
// looks for idle connections every second, and its close (4000) must
// reach the client before the client's ping reaches the egress, which
// would make the connection active again.
const IDLE_MARGIN = 5000;
// How long a close the client sent (to retry a subscription) may go
// unanswered before the socket is cut, as the Go client's closeWait.
const CLOSE_WAIT = 5000;
const PING = JSON.stringify({ type: "ping" });
// The longest wait setTimeout takes (2³¹−1 ms, 24.8 days): it takes a
// longer one modulo 2³², so that the timer fires at once or at some other
// time. Longer waits (a long time option, a server's long idle_timeout_ms)
// are cut to it: the silence timer checks when it fires and waits again,
// and a reconnect 24.8 days on is as good as one later.
const MAX_TIMER = 2 ** 31 - 1;
// A monotonic clock (ms) for the client's own timing: the wall clock
// (Date.now) can be set back (NTP, a user, a laptop's clock corrected on
// wake), which would hold off a probe, or the drop of a socket that does
// not answer one, for as long as the step.
const clock = globalThis.performance?.now ? () => globalThis.performance.now() : Date.now;

/** Compares two stream ids "ms-seq" numerically: -1, 0 or 1. */
const ID = /^\d{1,20}(-\d{1,20})?$/;
const CHANNEL = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$/;
// A user id; not "." or "..", which a URL path resolves away.
const USER = /^(?!\.\.?$)[A-Za-z0-9_.:@-]{1,128}$/;
const U64 = (1n << 64n) - 1n;
// A token as the socket carries it, in the "token.<token>" subprotocol: a
// subprotocol is an HTTP token (RFC 6455 §4.1, RFC 9110 tchar), and the
// WebSocket constructor throws a SyntaxError for anything else (a space,
// a comma, a non-ASCII letter). A JWT fits.
const SOCKET_TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
// SOCKET_TOKEN in words, for the errors that refuse a token.
const SOCKET_TOKEN_RULE = "cannot be sent as a WebSocket subprotocol (printable ASCII without spaces or ()<>@,;:\\\"/[]?={})";

/** Reports whether t can be sent as the socket's token; absent or "" is no token. */
function sendableToken(t) {
  return t == null || t === "" || (typeof t === "string" && SOCKET_TOKEN.test(t));
}

/**
 * Calls an application's listener or handler. What it throws is logged,
 * not thrown into the socket's event, as the page's uncaught error: the
 * step that called it (the other listeners, the next frame) goes on.
 */
function call(fn, args) {
  try { fn?.(...args); } catch (e) { console.error(e); }
}

/** The full-jitter wait before attempt n (0-based), in ms: random in [0, min(max, min·2ⁿ)]. */
function backoff(min, max, n) {
  return Math.random() * Math.min(max, min * 2 ** Math.min(n, 20));
}

/**
 * A time option in ms, as the Go client takes its durations: absent or 0
 * means def; anything but a finite number from 0 up is a TypeError (a
 * backoff of 0 ms would reconnect or retry in a tight loop, and a string
 * would silently turn the arithmetic into NaN). With canTurnOff, a
 * negative number turns the feature off (as the Go client's negative
 * ReadTimeout): -1.
 */
function msOption(opts, name, def, canTurnOff = false) {
  const v = opts[name];
  if (v == null || v === 0) return def;
  if (canTurnOff && typeof v === "number" && v < 0) return -1;
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    throw new TypeError(`${name} must be a number of milliseconds from 0 up (0: ${def}${canTurnOff ? "; negative: off" : ""}): ${v}`);
  }
  return v;
}

/** Reports whether s is a message id as the server takes it: "<ms>-<seq>" or "<ms>", each at most 2⁶⁴−1. */
export function isId(s) {
  return typeof s === "string" && ID.test(s) && s.split("-").every((p) => BigInt(p) <= U64);
}

export function compareIds(a, b) {
  const [am, as = "0"] = String(a).split("-");
  const [bm, bs = "0"] = String(b).split("-");
  const x = BigInt(am), y = BigInt(bm);
  if (x !== y) return x < y ? -1 : 1;
  const p = BigInt(as), q = BigInt(bs);
  return p === q ? 0 : p < q ? -1 : 1;
}

/**
 * The URL the client dials: url resolved against the page, http(s) taken
 * as ws(s), its fragment dropped, user added. Throws a TypeError for a query that would work
 * against the client, silently: channels the server subscribes by itself
 * on every connect (no ref, so the client drops their messages and its own
 * subscribe() of them is answered already_subscribed; no resume position
 * either), a token or user that would override the options' (the server
 * reads the query's token before the subprotocol), or a token or user
 * given twice, or a user, token or channels with a ";" or a bad
 * %-escape, which the egress refuses with 400 on every dial.
 */
function dialUrl(url, opts) {
  const u = new URL(url, globalThis.location?.href); // TypeError if malformed
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  // Its scheme named, not the URL, which may hold a password or a token.
  if (u.protocol !== "ws:" && u.protocol !== "wss:") throw new TypeError(`not a WebSocket URL: its scheme is ${u.protocol} (want ws:, wss:, http: or https:)`);
  // A fragment (a hash-routed page's address, or a bare "#") is never
  // sent in a request, and the WebSocket constructor refuses a URL with
  // one (a SyntaxError), on every dial: dialled without it.
  u.hash = "";
  // A user, token or channels pair with a ";" or a bad %-escape: the
  // egress's query parser (Go's) cannot read it, so the egress refuses it
  // (400) on every dial, which a browser sees only as a close.
  for (const pair of u.search.slice(1).split("&")) {
    if (!pair.includes(";") && !/%(?![0-9A-Fa-f]{2})/.test(pair)) continue;
    for (const part of pair.split(";")) {
      let k = part.split("=")[0];
      try { k = decodeURIComponent(k.replace(/\+/g, " ")); } catch { /* the key as written */ }
      if (k === "user" || k === "token" || k === "channels") {
        throw new TypeError(`the URL's ${k} parameter is malformed (a ";" or a bad %-escape): the egress refuses it (400)`);
      }
    }
  }
  const q = u.searchParams;
  if (q.has("channels")) {
    throw new TypeError("the URL has a channels parameter: call subscribe() for each channel instead " +
      "(the client resumes its subscriptions across reconnects; the server's own subscriptions of the URL's channels are not delivered)");
  }
  for (const name of ["token", "user"]) {
    const n = q.getAll(name).length;
    if (n > 1) throw new TypeError(`the URL has ${n} ${name} parameters: the egress refuses a repeated ${name} (400)`);
  }
  // An empty token= is no token (docs/protocol.md): the server takes the
  // options' token from the subprotocol then.
  if (q.get("token") && (opts.token || typeof opts.getToken === "function")) {
    throw new TypeError("the URL has a token parameter and the token or getToken option is set: the server would use the URL's token; " +
      "remove it from the URL (the options' token travels as a subprotocol, out of the URLs proxies log)");
  }
  if (q.has("user") && opts.user) throw new TypeError("the URL has a user parameter and the user option is set: give the user one way");
  // The egress refuses it (400 invalid_user) on every dial, which a
  // browser sees only as a close: the client would retry for ever.
  if (opts.user && (typeof opts.user !== "string" || !USER.test(opts.user))) {
    throw new TypeError(`user is not a user id (1–128 characters [A-Za-z0-9_.:@-], not "." or ".."): ${opts.user}`);
  }
  // Added at the end, the rest of the query left as written (a
  // URLSearchParams set would encode it again).
  if (opts.user) u.search = (u.search.length > 1 ? u.search + "&" : "?") + "user=" + encodeURIComponent(opts.user);
  return u.toString();
}

/**
 * A connection to the egress that keeps its subscriptions alive.
 *
 * Options: token (string), getToken (async () => string, called before the
 * first connect, after 4004 and after any close before the welcome; one
 * not settled within connectTimeout fails the attempt, as its error would,
 * and is asked again after the backoff, its late answer ignored), user
 * (anonymous mode), minBackoff (ms, 500),
 * maxBackoff (ms, 20000), stableAfter (ms, 10000: a connection that lasted
 * this long from its welcome resets the backoff; planned rotations 1001/4000/4001 always do),
 * activityTimeout (ms, 50000: a silence from the server after which the
 * client pings; negative: no probes), pongTimeout (ms, 10000: how long a
 * probe waits for any frame before the socket is dropped), connectTimeout
 * (ms, activityTimeout + pongTimeout; 50000 + pongTimeout with probes
 * off: a socket not welcomed that long after its dial is dropped, as a
 * browser waits minutes on an upgrade that hangs, for ever on a welcome;
 * it bounds each wait for getToken too),
 * WebSocket (constructor, for tests); a time option of 0 means its default.
 * The constructor throws a TypeError for a time option that is not a
 * number from 0 up, for a user that is not a user id (the egress would
 * refuse every dial), for a token that cannot be sent as a subprotocol
 * (the WebSocket constructor would refuse every dial), for
 * a URL whose query has channels (use subscribe()), token when token or
 * getToken is set, user when user is set, or token or user twice. A
 * token from getToken that cannot be sent is reported as an "error" (a
 * TypeError) and getToken is asked again on the next attempt.
 *
 * Events (c.on(name, fn)): "state" (state, detail: the welcome at
 * "connected"; the close {code, reason} or the Error that ended the
 * attempt at "disconnected"; at "closed", the server's final close, or
 * nothing after close()), "welcome" (frame),
 * "error" (error frame, of a subscription without onError too, or
 * getToken's Error), "message" (targeted messages),
 * "gap" ({channel}) when a resume could not recover everything,
 * "close" ({code, reason}) for every socket close.
 * States: "connecting", "connected", "disconnected", "closed".
 * A listener or handler that throws is logged (console.error); delivery
 * goes on, and the message it threw on counts as delivered. A listener
 * that moves the state on (close(), drop()) ends the delivery of the event
 * it was called for: the listeners after it heard the newer state already.
 */
export class WsRelay {
  constructor(url, opts = {}) {
    this.url = url;
    this.opts = opts;
    this.dialUrl = dialUrl(url, opts); // throws on a URL that would fight the client
    // The WebSocket constructor would throw on every dial, for ever.
    if (!sendableToken(opts.token)) {
      throw new TypeError("the token " + SOCKET_TOKEN_RULE + ": a user token (JWT)");
    }
    this.minBackoff = msOption(opts, "minBackoff", 500);
    this.maxBackoff = Math.max(msOption(opts, "maxBackoff", 20000), this.minBackoff);
    this.stableAfter = msOption(opts, "stableAfter", 10000);
    this.activityTimeout = msOption(opts, "activityTimeout", ACTIVITY_TIMEOUT, true);
    this.pongTimeout = msOption(opts, "pongTimeout", 10000);
    // Probes or not: a browser gives up on an upgrade that hangs only
    // after minutes (Chromium: 4), and on a missing welcome never.
    this.connectTimeout = msOption(opts, "connectTimeout",
      (this.activityTimeout < 0 ? ACTIVITY_TIMEOUT : this.activityTimeout) + this.pongTimeout);
    this.WS = opts.WebSocket ?? globalThis.WebSocket;
    this.state = "disconnected";
    this.stateSeq = 0; // counts setState's changes, so that a delivery sees a newer one
    this.subs = new Map(); // channel → subscription
    this.refs = new Map(); // ref → subscription
    this.listeners = new Map();
    this.token = opts.token ?? "";
    this.needToken = typeof opts.getToken === "function";
    this.attempt = 0;
    this.nextRef = 0;
    this.ws = null;
    this.timer = null;
    this.waiting = false; // this.timer is a reconnect's backoff
    this.probeTimer = null;
    this.tokenWait = null; // the wait for getToken() (askToken)
    this.closed = false;
    this.final = false; // a final close is being reported (lost())
    this.network = null;
    this.listenNetwork();
    // Connect after the caller's synchronous setup, so listeners added
    // right after the constructor see the first "connecting".
    queueMicrotask(() => this.connect());
  }

  /** Registers fn for event name; returns a function that removes it. */
  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name)?.delete(fn);
  }

  /**
   * Calls name's listeners with args, until one of them closes the client
   * or moves its state on (close(), from a listener, is the last thing it
   * hears; the socket's own "close" after close() is still delivered, as
   * it starts closed). After a drop() the listeners after it have heard
   * "disconnected": a welcome, or a gap, of the socket dropped would come
   * to them stale.
   */
  emit(name, ...args) {
    const closed = this.closed, seq = this.stateSeq;
    for (const fn of this.listenersOf(name)) {
      if (this.closed !== closed || this.stateSeq !== seq) return;
      call(fn, args);
    }
  }

  /**
   * name's listeners as they were when its delivery began, as
   * EventTarget and Node's EventEmitter deliver: one added meanwhile
   * hears the next event (a one-shot listener that re-arms itself would
   * otherwise be called again for this one, for ever), and one removed
   * meanwhile is not called.
   */
  *listenersOf(name) {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) if (set.has(fn)) yield fn;
  }

  setState(s, detail) {
    // "closed" is final, even when close() was called from a listener in
    // the middle of a step that goes on to report another state.
    if (this.state === s || this.state === "closed") return;
    this.state = s;
    const seq = ++this.stateSeq;
    for (const fn of this.listenersOf("state")) {
      // A listener moved the state on (close(), drop()): every listener
      // has heard the newer state, and the rest must not hear this one
      // after it.
      if (this.stateSeq !== seq) return;
      call(fn, [s, detail]);
    }
  }

  /**
   * Subscribes to channel until unsubscribe() or close(), across reconnects.
   * handlers: onMessage(msg), onSubscribed(recovered), onError(frame),
   * after (a message id to start after, e.g. one the app stored; "",
   * null or absent: none).
   */
  subscribe(channel, handlers = {}) {
    // Refused here, not by the server on every connect: ten refusals in a
    // row close the connection for good (1008).
    if (typeof channel !== "string" || !CHANNEL.test(channel)) throw new TypeError(`not a channel name: ${channel}`);
    // An empty after is no position, as Go's zero Handler.After.
    if (handlers.after != null && handlers.after !== "" && !isId(handlers.after)) throw new TypeError(`after is not a message id (a string such as "1700000000000-0"): ${handlers.after}`);
    if (this.subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    // As Go's ErrClosed: a closed client (close(), or a final close by the
    // server) never connects again, so the subscription would never start.
    if (this.closed || this.final) throw new Error(`client is closed: cannot subscribe to ${channel}`);
    const sub = {
      channel,
      ref: ++this.nextRef,
      handlers,
      last: handlers.after || null,
      unsubscribe: () => {
        if (this.subs.get(channel) !== sub) return;
        this.subs.delete(channel);
        this.refs.delete(sub.ref);
        this.send({ type: "unsubscribe", channel });
      },
      get lastId() { return sub.last; },
    };
    this.subs.set(channel, sub);
    this.refs.set(sub.ref, sub);
    // Once the socket is welcomed (send() drops the frame otherwise); the
    // welcome sends the ones made before it (subscribeAll).
    this.send(this.subscribeFrame(sub));
    return sub;
  }

  subscribeFrame(sub) {
    // Not live until the server answers this subscribe: frames for the
    // channel until then belong to an earlier subscription of it (still on
    // the wire after an unsubscribe) and would move sub.last past the
    // replay to come.
    sub.live = false;
    const f = { type: "subscribe", channel: sub.channel, ref: sub.ref };
    if (sub.last) f.after = sub.last;
    return f;
  }

  /**
   * Sends every subscription's subscribe on a socket just welcomed. A
   * server whose welcome has max_frame_bytes reads several requests per
   * frame: they go packed into as few frames as fit (newline-separated,
   * each frame at most min(max_frame_bytes, 64 KiB)), so a reconnect's
   * burst stays within a platform's per-connection message rate (SCF
   * takes 10 a second on a WebSocket function's connection). An older
   * server gets one each.
   */
  subscribeAll(ws, maxFrameBytes) {
    const limit = Number.isSafeInteger(maxFrameBytes) && maxFrameBytes > 0 ? Math.min(maxFrameBytes, MAX_BATCH_BYTES) : 0;
    let batch = "";
    // Subscription order (a Map keeps it). Channel names and ids are
    // ASCII, so a frame's length in characters is its length in bytes.
    for (const sub of this.subs.values()) {
      const f = JSON.stringify(this.subscribeFrame(sub));
      if (!limit) {
        ws.send(f);
        continue;
      }
      if (batch && batch.length + 1 + f.length > limit) {
        ws.send(batch);
        batch = "";
      }
      batch = batch ? batch + "\n" + f : f;
    }
    if (batch) ws.send(batch);
  }

  /** Sends one request (e.g. {type: "ping"}) if the socket is welcomed; dropped otherwise. */
  send(frame) {
    if (this.ws && this.ws.readyState === 1 && this.ws.welcomed) this.ws.send(JSON.stringify(frame));
  }

  /** Closes the socket (1000) for good. */
  close() {
    this.closed = true;
    this.waiting = false;
    clearTimeout(this.timer);
    clearTimeout(this.probeTimer);
    this.tokenWait?.cancel(); // a getToken() awaited: connect() sees the client closed
    this.unlistenNetwork();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      clearTimeout(ws.closeWait);
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this.setState("closed");
  }

  /**
   * Drops the socket abruptly, as a network failure would: the client then
   * reconnects and resumes like after any lost connection. For demos/tests.
   */
  drop() {
    this.cut("dropped", "dropped by the application");
  }

  cut(reason, closeReason) {
    if (!this.ws) return;
    const ws = this.ws;
    this.detach(ws);
    try { ws.close(4999, closeReason); } catch { /* ignore */ }
    // A socket not yet welcomed is dropped as a refused one closes: a
    // fresh token next, and no backoff reset.
    this.lost({ code: 1006, reason }, ws.welcomedAt, ws.welcomed);
  }

  detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    clearTimeout(ws.closeWait);
    if (this.ws === ws) {
      this.ws = null;
      clearTimeout(this.probeTimer);
    }
  }

  /**
   * Listens to the runtime's network events, where it has them (browsers
   * and workers; not Node): see online() and offline(). close() and a
   * final close remove the listeners, so a closed client is not kept
   * reachable from globalThis.
   */
  listenNetwork() {
    if (typeof globalThis.addEventListener !== "function") return;
    this.network = { online: () => this.online(), offline: () => this.offline() };
    for (const [name, fn] of Object.entries(this.network)) globalThis.addEventListener(name, fn);
  }

  unlistenNetwork() {
    if (!this.network) return;
    for (const [name, fn] of Object.entries(this.network)) globalThis.removeEventListener?.(name, fn);
    this.network = null;
  }

  /**
   * The network is back: a wait to reconnect is pointless now, and a
   * connected socket is probed at once, since a network change usually
   * leaves its old TCP path dead. The backoff is not reset: if the dial
   * fails, the next wait is as long as it would have been.
   */
  online() {
    if (this.closed) return;
    if (this.waiting) {
      this.waiting = false;
      clearTimeout(this.timer);
      this.connect();
      return;
    }
    this.probe();
  }

  /**
   * The browser lost its network. As pusher-js does, the socket is probed
   * rather than dropped: a short loss (roaming between access points, a
   * VPN that reconnects) keeps the TCP connection and its subscriptions,
   * and a dial would fail while offline anyway; a path that did die is
   * dropped within pongTimeout, and "online" ends the wait that follows.
   */
  offline() {
    if (!this.closed) this.probe();
  }

  /** Pings the welcomed socket now, unless a probe is already waiting or probes are off. */
  probe() {
    const ws = this.ws;
    if (this.activityTimeout < 0 || !ws || !ws.welcomed || ws.readyState !== 1 || ws.pingedAt) return;
    ws.pingedAt = clock();
    ws.send(PING);
    this.watch(ws);
  }

  /**
   * How long ws may be silent before it is probed: activityTimeout, or
   * longer than the server's idle timeout, which the server announces so
   * that a client never pings an idle connection before the server closes
   * it (a ping is a data frame: it would keep the connection open).
   */
  silence(ws) {
    return ws.idleTimeout ? Math.max(this.activityTimeout, ws.idleTimeout + IDLE_MARGIN) : this.activityTimeout;
  }

  /**
   * Arms the silence timer of the current socket: at the end of its
   * connectTimeout until the welcome, then of its silence, or of the wait
   * for a probe's answer. Frames only stamp the socket (dispatch); the
   * timer checks the stamps when it fires, so a busy socket costs no
   * timer per frame.
   */
  watch(ws) {
    // The timer is the current socket's: a socket replaced took its own
    // with it (detach), and must not clear its successor's.
    if (this.ws !== ws) return;
    clearTimeout(this.probeTimer);
    if (this.closed || (this.activityTimeout < 0 && ws.welcomed)) return;
    const due = !ws.welcomed ? ws.openedAt + this.connectTimeout
      : ws.pingedAt ? ws.pingedAt + this.pongTimeout : ws.lastRecv + this.silence(ws);
    this.probeTimer = setTimeout(() => this.checkSilence(ws), Math.min(Math.max(0, due - clock()), MAX_TIMER));
  }

  checkSilence(ws) {
    if (this.ws !== ws || this.closed) return;
    const now = clock();
    if (!ws.welcomed) {
      // Still dialing, or opened and silent: nothing is sent before the
      // welcome.
      if (now - ws.openedAt >= this.connectTimeout) {
        this.cut("no welcome", "silent connection");
        return;
      }
    } else if (ws.pingedAt) {
      // Any frame answers a probe (dispatch clears pingedAt): a pong
      // queued behind a replay is as good as the replay.
      if (now - ws.pingedAt >= this.pongTimeout) {
        this.cut("no answer to ping", "silent connection");
        return;
      }
    } else if (now - ws.lastRecv >= this.silence(ws)) {
      ws.pingedAt = now;
      if (ws.readyState === 1) ws.send(PING);
    }
    this.watch(ws);
  }

  async connect() {
    if (this.closed) return;
    this.setState("connecting");
    if (this.closed) return; // close() from a "state" listener
    if (this.needToken) {
      try {
        const token = await this.askToken();
        // The WebSocket constructor would throw; needToken stays set, so
        // the next attempt asks again rather than dial with it for ever.
        if (!sendableToken(token)) {
          throw new TypeError("getToken gave a token that " + SOCKET_TOKEN_RULE);
        }
        this.token = token ?? "";
        this.needToken = false;
      } catch (e) {
        if (this.closed) return; // close() while the token was awaited
        this.emit("error", e);
        this.setState("disconnected", e);
        this.schedule();
        return;
      }
      if (this.closed) return;
    }
    let ws;
    try {
      // The token travels as a subprotocol, not in the URL, which
      // gateways and proxies write to their access logs.
      ws = this.token
        ? new this.WS(this.dialUrl, ["wsrelay", "token." + this.token])
        : new this.WS(this.dialUrl);
    } catch (e) {
      if (e?.name === "SecurityError") {
        // A URL the browser blocks for this page (a ws:// one from an
        // https:// page, a port it bars): every dial would throw, for
        // ever. Final, as a close that retrying cannot mend.
        this.final = true;
        this.emit("error", e);
        if (this.closed) return;
        this.closed = true;
        this.unlistenNetwork();
        this.setState("closed", e);
        return;
      }
      // A token the browser refuses: a fresh token next, as after a dial
      // refused before its welcome.
      if (typeof this.opts.getToken === "function") this.needToken = true;
      this.emit("error", e);
      this.setState("disconnected", e);
      this.schedule();
      return;
    }
    this.ws = ws;
    ws.openedAt = clock();
    ws.welcomed = false;
    ws.welcomedAt = 0;
    ws.lastRecv = ws.openedAt; // the silence timer runs from the dial
    ws.pingedAt = 0; // when the probe waiting for an answer was sent
    ws.idleTimeout = 0; // the server's, from its welcome
    this.watch(ws);
    // Nothing is sent before the welcome, which says how the server
    // takes the subscribes (subscribeAll).
    ws.onopen = null;
    ws.onmessage = (ev) => this.dispatch(ws, ev.data);
    ws.onclose = (ev) => {
      this.detach(ws);
      this.lost({ code: ev.code, reason: ev.reason }, ws.welcomedAt, ws.welcomed);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  /**
   * getToken()'s answer, given up after connectTimeout, as a dial without
   * its welcome is: a token endpoint that never answers would otherwise
   * leave the client connecting for ever. Given up, the attempt fails as
   * after getToken's own error, the next attempt calls it again, and the
   * late answer is ignored. close() ends the wait at once.
   */
  askToken() {
    return new Promise((resolve, reject) => {
      const wait = {};
      const end = (settle, v) => {
        if (this.tokenWait !== wait) return; // given up, or ended by close()
        this.tokenWait = null;
        clearTimeout(wait.timer);
        settle(v);
      };
      wait.cancel = () => end(reject, new Error("closed"));
      this.tokenWait = wait;
      wait.timer = setTimeout(() => end(reject, new Error(`getToken has not settled within connectTimeout (${this.connectTimeout} ms)`)),
        Math.min(this.connectTimeout, MAX_TIMER));
      let p;
      try { p = this.opts.getToken(); } catch (e) { p = Promise.reject(e); }
      Promise.resolve(p).then((t) => end(resolve, t), (e) => end(reject, e));
    });
  }

  lost(ev, welcomedAt, welcomed) {
    // Without getToken, a 4004 leaves the client with the expired token:
    // each dial would be refused at the upgrade, a close like any other
    // to a browser, for ever.
    const final = FINAL.has(ev.code) || (ev.code === TOKEN_EXPIRED && typeof this.opts.getToken !== "function");
    // Final before "close" is heard: a subscribe() from its listener is
    // refused, as after, not left waiting for a connect that never comes.
    this.final = final;
    this.emit("close", ev);
    if (this.closed) return;
    if (final) {
      this.closed = true;
      this.unlistenNetwork();
      this.setState("closed", ev);
      return;
    }
    if ((ev.code === TOKEN_EXPIRED || !welcomed) && typeof this.opts.getToken === "function") this.needToken = true;
    if (welcomed && (PLANNED.has(ev.code) || clock() - welcomedAt >= this.stableAfter)) this.attempt = 0;
    this.setState("disconnected", ev);
    this.schedule();
  }

  schedule() {
    if (this.closed) return; // close() from a listener of this step
    const wait = backoff(this.minBackoff, this.maxBackoff, this.attempt);
    this.attempt++;
    clearTimeout(this.timer);
    this.waiting = true;
    this.timer = setTimeout(() => {
      this.waiting = false;
      this.connect();
    }, Math.min(wait, MAX_TIMER));
  }

  dispatch(ws, raw) {
    // What a socket still delivers after close(), or after the client let
    // go of it (dropped, or replaced by a reconnect), reaches no handler:
    // a browser drops it once the handlers are unset, other WebSocket
    // implementations may not, and a late welcome would report the
    // client connected while its current socket is not.
    if (this.closed || ws !== this.ws) return;
    // Any frame shows the path is alive and answers a probe.
    ws.lastRecv = clock();
    ws.pingedAt = 0;
    let f;
    try { f = JSON.parse(raw); } catch { return; }
    if (f === null || typeof f !== "object") return; // JSON, but no frame
    switch (f.type) {
      case "welcome":
        if (ws.welcomed) break;
        ws.welcomed = true;
        ws.welcomedAt = clock(); // stableAfter counts from here
        // An older server's welcome has no idle timeout: it closes no
        // idle connection, or does not say, and activityTimeout applies.
        if (Number.isSafeInteger(f.idle_timeout_ms) && f.idle_timeout_ms > 0) ws.idleTimeout = f.idle_timeout_ms;
        this.watch(ws); // from the connect deadline to the silence timer (none with probes off)
        if (ws.readyState === 1) this.subscribeAll(ws, f.max_frame_bytes);
        this.setState("connected", f);
        // close() or drop() from a state listener: the welcome is of a
        // socket gone.
        if (this.ws !== ws) break;
        this.emit("welcome", f);
        break;
      case "message": {
        if (!f.channel) { this.emit("message", f); break; }
        const sub = this.subs.get(f.channel);
        if (!sub || !sub.live) break; // unsubscribed, or an earlier subscription's
        if (!isId(f.id)) break; // not from a wsrelay egress
        if (sub.last && compareIds(f.id, sub.last) <= 0) break; // duplicate
        sub.last = f.id;
        call(sub.handlers.onMessage, [f]);
        break;
      }
      case "subscribed": {
        const sub = this.subs.get(f.channel);
        if (!sub || f.ref !== sub.ref) break; // unsubscribed, or an earlier subscription's
        // One subscribe, one answer: a repeat (a faulty server or proxy)
        // saying "not recovered" from an older position would move the
        // subscription back, and what followed would be delivered twice.
        if (sub.live) break;
        sub.live = true;
        const recovered = f.recovered !== false;
        // A fresh subscription starts from the server's position, so a
        // cut before its first message still resumes without a gap. A
        // resume that was not recovered goes on from where the stream
        // does, which can be behind the id held (one from a Redis that
        // failed over): holding on to it would drop what follows.
        if (isId(f.position) && (!sub.last || !recovered)) sub.last = f.position;
        if (!recovered) this.emit("gap", { channel: f.channel });
        // close(), drop(), or unsubscribe() of the channel, from a gap
        // listener: the subscription no longer waits for this answer (a
        // drop()'s reconnect subscribes it again, and that answer counts).
        if (this.closed || this.ws !== ws || this.subs.get(f.channel) !== sub) break;
        call(sub.handlers.onSubscribed, [recovered]);
        break;
      }
      case "error": {
        // The answer to an unsubscribe of a subscription the server had
        // refused: the state the client asked for, not news.
        if (f.code === "not_subscribed") break;
        const sub = typeof f.ref === "number" ? this.refs.get(f.ref) : undefined;
        if (sub && f.code === "unavailable") {
          // The server could not subscribe now: a reconnect retries it.
          try { ws.close(1000, "retrying subscription"); } catch { /* ignore */ }
          // A server that never answers (it stopped reading, or a proxy
          // lost the close) must not keep the client on a socket it can
          // no longer send on until the browser gives up on it.
          // One wait per socket, however many unavailables come; it ends
          // with the socket (detach) or the client (close), so that a
          // closed client holds no timer (Node would wait for it).
          if (!ws.closeWait) ws.closeWait = setTimeout(() => { if (this.ws === ws) this.cut("close not answered", "close not answered"); }, CLOSE_WAIT);
        }
        if (sub?.handlers.onError) call(sub.handlers.onError, [f]);
        else this.emit("error", f);
        break;
      }
      case "pong": // the answer to a probe or to an application's c.send({type: "ping"})
        this.emit("pong", f);
        break;
    }
  }
}

/**
 * Why a publish failed: an ingress's (or a gateway's) answer (status,
 * code, detail, retryAfter in ms), or no answer at all (status 0, code
 * "network", the fetch error as cause). outcomeUnknown, as Go's
 * publisher.ErrOutcomeUnknown, is true when the message may have been
 * written all the same: an attempt got no answer, a 5xx, 409
 * idempotency_in_progress or a 2xx that was not the ingress's reply,
 * whatever a later attempt answered. A connection refused counts as no
 * answer: fetch rejects with the same bare TypeError for it as for an
 * answer lost, so a page cannot tell that nothing was sent (Go's
 * publisher can, and does not set ErrOutcomeUnknown for it).
 */
export class PublishError extends Error {
  constructor(status, code, message, retryAfter, cause) {
    super(code ? `${status} ${code}: ${message}` : `HTTP ${status}${message ? ": " + message : ""}`, cause === undefined ? undefined : { cause });
    this.name = "PublishError";
    this.status = status;
    this.code = code;
    this.detail = message;
    this.retryAfter = retryAfter;
    this.outcomeUnknown = false;
  }
}

// The longest wait a Retry-After can ask a publish for (ms), as Go's
// publisher.MaxRetryAfter.
const MAX_RETRY_AFTER = 60_000;
// An event name as the ingress takes it (docs/api.md).
const EVENT = /^[\x20-\x7e]{0,64}$/;

// An HTTP date in full (RFC 9110 §5.6.7: IMF-fixdate, or the obsolete
// RFC 850 and asctime forms), as Go's http.ParseTime takes them.
// Date.parse alone takes "-1", "1.5" or "Mon 5" for dates in 2001: a wait
// of 0, where Go's publisher sees no Retry-After (and a 429 without one is
// final).
const DAY = "(Mon|Tue|Wed|Thu|Fri|Sat|Sun)";
const MONTH = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)";
const CLOCK = "\\d\\d:\\d\\d:\\d\\d";
const HTTP_DATE = new RegExp(
  "^(?:" + DAY + ", \\d\\d " + MONTH + " \\d{4} " + CLOCK + " GMT" +
  "|(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), \\d\\d-" + MONTH + "-\\d\\d " + CLOCK + " GMT" +
  "|" + DAY + " " + MONTH + " [ \\d]\\d " + CLOCK + " \\d{4})$");

/** A response's Retry-After in ms (seconds or an HTTP date, capped), or null. */
function retryAfterMs(h) {
  const v = h.get("Retry-After");
  if (v == null || v === "") return null;
  if (/^\d+$/.test(v)) return Math.min(Number(v) * 1000, MAX_RETRY_AFTER);
  // asctime, which alone ends with a digit (its year), has no zone: it is
  // GMT, which Date.parse would take for local time.
  const t = HTTP_DATE.test(v) ? Date.parse(/\d$/.test(v) ? v + " GMT" : v) : NaN;
  return Number.isNaN(t) ? null : Math.min(Math.max(t - Date.now(), 0), MAX_RETRY_AFTER);
}

/**
 * A token as publish() sends it: absent, or printable ASCII without
 * spaces (an API key or a JWT), as Go's publisher.New takes it. Anything
 * else fetch would refuse on every attempt with a TypeError, which would
 * pass for a network error.
 */
function checkToken(t) {
  if (t == null || t === "" || (typeof t === "string" && /^[\x21-\x7e]+$/.test(t))) return t;
  throw new TypeError("the token must be printable ASCII without spaces (a user token or an API key)");
}

/**
 * opts.getToken()'s answer for publish(), ended at once by an abort of
 * opts.signal (with its reason, as publish()'s other waits are) and given
 * up after timeout ms (an Error, as if getToken had failed with it): a
 * token endpoint that never answers would otherwise leave the call
 * pending for ever, aborted or not. The late answer is ignored. An
 * aborted signal asks no token.
 */
function tokenWithin(opts, timeout) {
  opts.signal?.throwIfAborted();
  return new Promise((resolve, reject) => {
    const end = (settle, v) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", abort);
      settle(v);
    };
    const abort = () => end(reject, opts.signal.reason);
    const timer = setTimeout(() => end(reject, new Error(`getToken has not settled within timeout (${timeout} ms)`)), Math.min(timeout, MAX_TIMER));
    opts.signal?.addEventListener("abort", abort, { once: true });
    let p;
    try { p = opts.getToken(); } catch (e) { p = Promise.reject(e); }
    Promise.resolve(p).then((t) => end(resolve, t), (e) => end(reject, e));
  });
}

/** A random Idempotency-Key: 22 base64url characters (128 bits). */
function newKey() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Publishes data to channel through the ingress (POST
 * /v1/channels/{channel}/messages) and resolves to {id, channel,
 * replayed} once the message is in Redis. ingress is its base URL
 * ("https://ingress.example.com", or "" for the page's origin).
 *
 * Safe retries, as Go's publisher package: the request carries an
 * Idempotency-Key (opts.idempotencyKey, or a random one made for this
 * call) and is retried, with the same key and body, after a network error,
 * 502/503/504, 429 with Retry-After and 409 idempotency_in_progress, so a
 * publish whose answer was lost is written once (replayed: true). The wait
 * is full-jitter backoff (opts.minBackoff 100 ms doubling to
 * opts.maxBackoff 5 s), at least the answer's Retry-After; at most
 * opts.maxAttempts (4) attempts, each given up after opts.timeout (10 s,
 * the answer's body included) as one without an answer. A 401 with
 * opts.getToken asks it for a fresh token and tries again (the key is
 * scoped to the user, not the token); if getToken then fails, the call
 * rejects with the 401, getToken's error as cause. Any other answer is
 * final. Each getToken() is given up after opts.timeout, as if it had
 * failed with an Error "getToken has not settled within timeout", and an
 * abort ends the wait for it at once; the first one's error, before any
 * request, ends the call as it is. A refusal, or attempts run out,
 * rejects with a PublishError (code "network" when the last attempt got
 * no answer; outcomeUnknown when the message may have been written); bad
 * input (a channel name, data that is null in JSON, an event, a from that
 * is not a user id, a token that is not printable ASCII without spaces,
 * a maxAttempts that is not a whole number (0 means 4), a backoff or
 * timeout that is not a number of ms from 0 up (0 means its default))
 * with a TypeError before any request. opts: token or getToken (a user token, sent as
 * Authorization: Bearer), event, from, idempotencyKey, maxAttempts,
 * minBackoff, maxBackoff, timeout, signal (an AbortSignal that stops the
 * call and its waits, getToken's included), fetch (a stand-in, for tests).
 */
export async function publish(ingress, channel, data, opts = {}) {
  if (typeof channel !== "string" || !CHANNEL.test(channel)) throw new TypeError(`not a channel name: ${channel}`);
  // As Go's publisher refuses Data that marshals to null: NaN, a function
  // or a toJSON() giving null would go as null or not at all.
  const dataJSON = JSON.stringify(data);
  if (dataJSON === undefined || dataJSON === "null") throw new TypeError("data is required and must not be null in JSON (the ingress refuses it: missing_data)");
  if (opts.event != null && (typeof opts.event !== "string" || !EVENT.test(opts.event) || /["\\]/.test(opts.event))) {
    throw new TypeError(`not an event name (at most 64 printable ASCII characters without " or \\): ${opts.event}`);
  }
  if (opts.from != null && opts.from !== "" && (typeof opts.from !== "string" || !USER.test(opts.from))) {
    throw new TypeError(`not a user id (1–128 characters [A-Za-z0-9_.:@-], not "." or ".."): ${opts.from}`);
  }
  const key = opts.idempotencyKey ?? newKey();
  if (typeof key !== "string" || !/^[\x20-\x7e]{1,255}$/.test(key) || key.trim() !== key) {
    throw new TypeError("idempotencyKey must be 1–255 printable ASCII characters, not starting or ending with a space");
  }
  const body = JSON.stringify({ data, event: opts.event || undefined, from: opts.from || undefined });
  const doFetch = opts.fetch ?? globalThis.fetch.bind(globalThis);
  // As Go's MaxAttempts: 0 (or absent) means 4; anything but a whole
  // number from 1 up would retry for ever or not at all.
  const attempts = opts.maxAttempts == null || opts.maxAttempts === 0 ? 4 : opts.maxAttempts;
  if (!Number.isInteger(attempts) || attempts < 1) throw new TypeError(`maxAttempts must be a whole number from 1 (0: 4): ${opts.maxAttempts}`);
  const min = msOption(opts, "minBackoff", 100), max = Math.max(msOption(opts, "maxBackoff", 5000), min);
  const timeout = msOption(opts, "timeout", 10000);
  const url = `${String(ingress).replace(/\/+$/, "")}/v1/channels/${encodeURIComponent(channel)}/messages`;
  // An empty token is none: getToken is asked, as WsRelay asks it.
  let token = checkToken((opts.token == null || opts.token === "") && opts.getToken ? await tokenWithin(opts, timeout) : opts.token);
  let last, unknown = false;
  for (let n = 0; ; n++) {
    opts.signal?.throwIfAborted();
    const headers = { "Content-Type": "application/json", "Idempotency-Key": key };
    if (token) headers.Authorization = "Bearer " + token;
    let retry = false, freshToken = false, wait = 0;
    // Each attempt ends within timeout, answer read included, as Go's
    // HTTPClient.Timeout ends one: a request out on a path that died
    // would otherwise wait for TCP to give up (minutes), not be retried.
    const attempt = new AbortController();
    const abort = () => attempt.abort(opts.signal.reason);
    opts.signal?.addEventListener("abort", abort, { once: true });
    const timer = setTimeout(() => attempt.abort(new Error(`no answer within ${timeout} ms`)), Math.min(timeout, MAX_TIMER));
    try {
      // A redirect is not followed, as Go's publisher does not: a 301,
      // 302 or 303 would turn the POST into a GET (of the channel's
      // history, a 200 that is no publish), a 307 or 308 send the message
      // to a URL the page did not name. The browser hides where to
      // (status 0, "opaqueredirect").
      const r = await doFetch(url, { method: "POST", headers, body, signal: attempt.signal, redirect: "manual" });
      if (r.type === "opaqueredirect" || (r.status >= 300 && r.status < 400)) {
        throw new PublishError(r.status, "redirect", "the ingress URL answered with a redirect, which is not followed: use the URL it redirects to");
      }
      // The body is read whole before the status is judged: a read that
      // fails (the connection lost mid-answer, or the signal) is a network
      // error like fetch's, so a 2xx cut short is retried with the key,
      // whose replay has the id, and an abort is not taken for a reply.
      const text = await r.text();
      let json = null;
      try { json = JSON.parse(text); } catch { /* not JSON: a gateway's page */ }
      // A 2xx without a body, or whose object ends before its JSON does
      // (a reply delimited by the connection's close, cut by it, which
      // fetch takes for whole): no answer, as Go's publisher takes it.
      if (r.ok && json === null && /^\s*([{[]|$)/.test(text)) {
        throw new Error(`the ${r.status} reply ${text.trim() ? "was cut short" : "has no body"}`);
      }
      if (r.ok && json?.id) return { id: json.id, channel: json.channel, replayed: r.headers.get("Idempotent-Replayed") === "true" };
      const ra = retryAfterMs(r.headers);
      last = new PublishError(r.status, json?.error?.code ?? "", json?.error?.message ?? "", ra);
      // Answers after which the message may be in Redis all the same: a
      // 5xx (the append timed out after Redis ran it, a gateway's after
      // forwarding it), a request with the key still being processed,
      // and a 2xx without an id (not an ingress: what it did is unknown).
      if (r.status >= 500 || r.ok || (r.status === 409 && last.code === "idempotency_in_progress")) unknown = true;
      if (r.ok) throw last;
      retry = r.status === 502 || r.status === 503 || r.status === 504 ||
        (r.status === 429 && ra !== null) || (r.status === 409 && last.code === "idempotency_in_progress");
      if (r.status === 401 && opts.getToken) freshToken = retry = true;
      wait = ra ?? 0;
    } catch (err) {
      // Aborted: the signal's reason, as when a wait is aborted, whatever
      // the read of a body made of it (Chromium: "Failed to fetch").
      if (opts.signal?.aborted) throw opts.signal.reason;
      if (err instanceof PublishError) {
        err.outcomeUnknown = unknown;
        throw err;
      }
      // fetch's TypeError, the body's read failing or the attempt's
      // timeout: no answer. Wrapped, so that a TypeError from publish()
      // always means bad input.
      last = new PublishError(0, "network", String(err?.message ?? err), undefined, err);
      unknown = retry = true;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", abort);
    }
    if (!retry || n + 1 >= attempts) {
      last.outcomeUnknown = unknown;
      throw last;
    }
    // A getToken that fails (or gives a token that cannot be sent) ends
    // the call with the 401, its error as cause (retrying with the token
    // just refused would only be refused again): a PublishError, which
    // says whether an earlier attempt may have written the message.
    if (freshToken) {
      try {
        token = checkToken(await tokenWithin(opts, timeout));
      } catch (e) {
        opts.signal?.throwIfAborted();
        last.cause = e;
        last.outcomeUnknown = unknown;
        throw last;
      }
    }
    // Aborted after the answer (while getToken ran): the wait below would
    // never hear the abort event, which has fired already.
    opts.signal?.throwIfAborted();
    wait = Math.max(wait, backoff(min, max, n));
    await new Promise((resolve, reject) => {
      const abort = () => { clearTimeout(t); reject(opts.signal.reason); };
      const t = setTimeout(() => { opts.signal?.removeEventListener("abort", abort); resolve(); }, Math.min(wait, MAX_TIMER));
      opts.signal?.addEventListener("abort", abort, { once: true });
    });
  }
}

export default WsRelay;
