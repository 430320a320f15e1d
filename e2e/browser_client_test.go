package e2e

import (
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// clientJSCases drive the browser client (/client.js) against a scripted
// socket in the page: the cases where the wire's order matters and a real
// server cannot be made to show it on demand. Each case resolves to "ok"
// or to what went wrong.
const clientJSCases = `(async () => {
  const { WsRelay } = await import("/client.js");
  const sockets = [];
  class FakeWS {
    constructor(url, protocols) { this.url = url; this.protocols = protocols || []; this.readyState = 0; this.sent = []; this.frames = []; this.at = performance.now(); sockets.push(this); FakeWS.dialed?.(this); }
    // frames: what each send() carried; sent: the requests in them.
    send(s) { this.frames.push(s); for (const r of s.split("\n")) this.sent.push(JSON.parse(r)); }
    close() { this.readyState = 3; }
    open() { this.readyState = 1; this.onopen?.(); }
    recv(f) { this.onmessage?.({ data: JSON.stringify(f) }); }
    recvRaw(data) { this.onmessage?.({ data }); } // a frame as it came: broken JSON, a Blob (binary)
    shut(code) { this.readyState = 3; this.onclose?.({ code, reason: "" }); }
  }
  const settle = () => new Promise((r) => setTimeout(r, 20));
  // until polls cond until it holds or ms have passed: for what comes
  // after timers that a loaded machine runs late.
  const until = async (cond, ms) => {
    for (const by = performance.now() + ms; !cond() && performance.now() < by;) await new Promise((r) => setTimeout(r, 5));
  };
  const results = {};
  const newClient = (opts = {}) => new WsRelay("ws://127.0.0.1:1/ws", { WebSocket: FakeWS, minBackoff: 1, maxBackoff: 2, ...opts });
  // A client whose first socket is open and welcomed.
  const welcomed = async (opts) => {
    sockets.length = 0;
    const c = newClient(opts);
    await settle();
    const ws = sockets[0];
    ws.open();
    ws.recv({ type: "welcome", connection_id: "c1", instance: "i" });
    return [c, ws];
  };

  // An unsubscribe and an immediate resubscribe after the last id, while a
  // message and a reply of the earlier subscription are still on the wire.
  {
    const [c, ws] = await welcomed();
    const first = c.subscribe("a", { onMessage() {} });
    const ref1 = ws.sent.at(-1).ref;
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: ref1 });
    ws.recv({ type: "message", channel: "a", id: "2-0", ts: 1, data: 2 });
    first.unsubscribe();
    const got = [];
    let subscribed = 0;
    c.subscribe("a", { after: first.lastId, onMessage: (m) => got.push(m.id), onSubscribed: () => subscribed++ });
    const again = ws.sent.at(-1);
    ws.recv({ type: "message", channel: "a", id: "4-0", ts: 1, data: 4 });
    ws.recv({ type: "subscribed", channel: "a", position: "4-0", ref: ref1 });
    ws.recv({ type: "unsubscribed", channel: "a" });
    ws.recv({ type: "subscribed", channel: "a", recovered: true, position: "2-0", ref: again.ref });
    ws.recv({ type: "message", channel: "a", id: "3-0", ts: 1, data: 3 });
    ws.recv({ type: "message", channel: "a", id: "4-0", ts: 1, data: 4 });
    results.resubscribe = again.after === "2-0" && got.join(" ") === "3-0 4-0" && subscribed === 1
      ? "ok" : "after " + again.after + ", got [" + got + "], onSubscribed " + subscribed + " times";
    c.close();
  }

  // A subscribe made after the socket opened and before the welcome is sent.
  {
    sockets.length = 0;
    const c = newClient();
    await settle();
    const ws = sockets[0];
    ws.open();
    c.subscribe("room", {});
    const early = ws.frames.length;
    ws.recv({ type: "welcome", connection_id: "c1", instance: "i" });
    const subs = ws.sent.filter((f) => f.type === "subscribe" && f.channel === "room").length;
    results.subscribeBeforeWelcome = subs === 1 && early === 0 ? "ok" : subs + " subscribe frames sent, " + early + " before the welcome";
    c.close();
  }

  // On each connection the subscribes wait for the welcome. A welcome with
  // max_frame_bytes gets them packed into as few frames as fit, in
  // subscription order, resuming where each was; one without (an older
  // server) gets one frame each. A subscribe() while connected is one frame.
  for (const [name, max, want] of [["resubscribeBatched", 65536, 1], ["resubscribeOlderServer", undefined, 6], ["resubscribeSmallFrames", 256, 3]]) {
    const welcome = { type: "welcome", connection_id: "c1", instance: "i" };
    if (max) welcome.max_frame_bytes = max;
    sockets.length = 0;
    const c = newClient();
    const long = "x".repeat(40); // a subscribe of ~90 bytes
    const subs = [0, 1, 2, 3, 4].map((i) => c.subscribe(long + "-" + i, {}));
    await settle();
    sockets[0].open();
    sockets[0].recv(welcome);
    sockets[0].recv({ type: "subscribed", channel: long + "-1", position: "5-0", ref: subs[1].ref });
    sockets[0].recv({ type: "message", channel: long + "-1", id: "6-0", ts: 1, data: 6 });
    sockets[0].shut(1006);
    await settle();
    const ws = sockets.at(-1);
    ws.open();
    c.subscribe("early", {}); // before the welcome: sent with the others
    const early = ws.frames.length;
    ws.recv(welcome);
    const burst = ws.frames.length;
    const sizes = ws.frames.map((f) => f.length);
    c.subscribe("late", {});
    const refs = ws.sent.map((f) => f.type + f.ref + (f.after ? "@" + f.after : "")).join(" ");
    const wantRefs = "subscribe1 subscribe2@6-0 subscribe3 subscribe4 subscribe5 subscribe6 subscribe7";
    const problems = [];
    if (early) problems.push(early + " frames before the welcome");
    if (burst !== want) problems.push("the 6 subscribes in " + burst + " frames");
    if (max && sizes.some((n) => n > max)) problems.push("frames of " + sizes + " bytes over " + max);
    if (ws.frames.length !== burst + 1 || ws.frames.at(-1).includes("\n")) problems.push("subscribe() while connected not one frame of its own");
    if (refs !== wantRefs) problems.push("sent " + refs + ", want " + wantRefs);
    results[name] = problems.length ? problems.join("; ") : "ok";
    c.close();
  }

  // No reconnect after 1007.
  {
    const [c] = await welcomed();
    sockets[0].shut(1007);
    await settle();
    results.final1007 = sockets.length === 1 && c.state === "closed" ? "ok" : sockets.length + " dials, state " + c.state;
    c.close();
  }

  // A connection refused before its welcome (an expired token is refused
  // at the upgrade, which the browser reports as a close) asks for a new
  // token before the next dial.
  {
    let calls = 0;
    const [c] = await welcomed({ getToken: async () => "t" + ++calls });
    sockets[0].shut(1006);
    await settle();
    sockets[1].shut(1006); // refused: no welcome
    await settle();
    const ws = sockets.at(-1);
    const last = (ws.protocols.find((p) => p.startsWith("token.")) || "").slice("token.".length);
    const inURL = new URL(ws.url).searchParams.has("token");
    results.tokenAfterRefusal = calls === 2 && last === "t2" && !inURL && ws.protocols[0] === "wsrelay"
      ? "ok" : calls + " getToken calls, last dial with " + last + (inURL ? ", token in the URL" : "");
    c.close();
  }
  // drop() of a socket not yet welcomed (an application's watchdog giving
  // up on an upgrade that hangs) is a close before the welcome like any
  // other: getToken is asked again before the next dial, and the backoff
  // goes on growing instead of starting over (stableAfter 1 ms, which a
  // welcomed connection would have outlasted; 0 would be the default).
  {
    let calls = 0;
    sockets.length = 0;
    const c = newClient({ getToken: async () => "t" + ++calls, stableAfter: 1 });
    await settle();
    sockets[0].open(); // never welcomed
    c.drop();
    await settle();
    sockets[1].open();
    c.drop();
    await settle();
    results.dropBeforeWelcome = calls === 3 && sockets.length === 3 && c.attempt === 2
      ? "ok" : calls + " getToken calls for " + sockets.length + " dials, backoff attempt " + c.attempt + " (want 3 calls, attempt 2)";
    c.close();
  }
  // stableAfter counts from the welcome, not the dial: a socket welcomed
  // late (an upgrade that hung, a slow server) and cut at once lasted no
  // time, and the backoff goes on growing. One that lived stableAfter
  // after its welcome starts it over.
  {
    sockets.length = 0;
    const c = newClient({ stableAfter: 200 });
    await settle();
    sockets[0].shut(1006); // refused twice: attempt 2
    await until(() => sockets.length === 2, 1000);
    sockets[1].shut(1006);
    await until(() => sockets.length === 3, 1000);
    const ws = sockets[2];
    ws.open();
    await new Promise((r) => setTimeout(r, 250));
    ws.recv({ type: "welcome", connection_id: "c1", instance: "i" });
    ws.shut(1006);
    const late = c.attempt; // 3 not reset, 1 reset
    await until(() => sockets.length === 4, 1000);
    sockets[3].open();
    sockets[3].recv({ type: "welcome", connection_id: "c2", instance: "i" });
    await new Promise((r) => setTimeout(r, 250));
    sockets[3].shut(1006);
    const lived = c.attempt;
    results.stableFromWelcome = late === 3 && lived === 1 ? "ok"
      : "backoff attempt " + late + " after a late welcome cut at once (want 3), " + lived + " after a connection of 250 ms (want 1)";
    c.close();
  }
  // Nothing reaches a handler after close(), though the socket delivers
  // what it still had (Chromium drops it; WebSocket implementations
  // outside browsers, such as Node's ws, may not); the socket's own close
  // is still reported ("close"), and nothing else follows it.
  {
    const [c, ws] = await welcomed();
    let got = 0, welcomes = 0;
    const closes = [], states = [];
    c.on("welcome", () => welcomes++);
    c.subscribe("a", { onMessage: () => got++ });
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: ws.sent.at(-1).ref });
    c.close();
    c.on("close", (e) => closes.push(e.code));
    c.on("state", (s) => states.push(s));
    ws.recv({ type: "message", channel: "a", id: "2-0", ts: 1, data: 2 });
    ws.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    ws.shut(1000);
    await settle();
    results.nothingAfterClose = got === 0 && welcomes === 0 && c.state === "closed" && closes.join() === "1000" && !states.length && sockets.length === 1
      ? "ok" : got + " messages and " + welcomes + " welcomes after close(), closes [" + closes + "], states [" + states + "], " + sockets.length + " dials, state " + c.state;
  }
  // A resume that was not recovered goes on from the server's position,
  // which can be behind the id held (one a failed-over Redis never had).
  {
    const [c, ws] = await welcomed();
    const got = [];
    const gaps = [];
    c.on("gap", (g) => gaps.push(g.channel));
    const s = c.subscribe("a", { after: "90-0", onMessage: (m) => got.push(m.id) });
    const ref = ws.sent.at(-1).ref;
    ws.recv({ type: "subscribed", channel: "a", recovered: false, position: "5-0", ref });
    ws.recv({ type: "message", channel: "a", id: "6-0", ts: 1, data: 6 });
    results.unrecoveredPosition = got.join(" ") === "6-0" && s.lastId === "6-0" && gaps.join() === "a"
      ? "ok" : "got [" + got + "], last id " + s.lastId + ", gaps [" + gaps + "]";
    c.close();
  }

  // Names and ids are checked before anything goes on the wire (the
  // server counts refusals, and ten in a row close the connection for
  // good), and a malformed id from the wire is ignored.
  {
    const [c, ws] = await welcomed();
    const refused = [];
    const cases = [["bad name", {}], ["", {}], ["ok", { after: "bogus" }], ["ok", { after: 1700000000000 }], ["ok", { after: "18446744073709551616-0" }]];
    for (const [ch, h] of cases) {
      try { c.subscribe(ch, h); } catch (e) { if (e instanceof TypeError) refused.push(ch); }
    }
    const got = [];
    const s = c.subscribe("b", { onMessage: (m) => got.push(m.id) });
    ws.recv({ type: "subscribed", channel: "b", position: "junk", ref: ws.sent.at(-1).ref });
    ws.recv({ type: "message", channel: "b", id: "bogus", ts: 1, data: 0 });
    ws.recv({ type: "message", channel: "b", id: "7-0", ts: 1, data: 7 });
    const sent = ws.sent.filter((f) => f.type === "subscribe").map((f) => f.channel);
    let pongs = 0;
    c.on("pong", () => pongs++);
    ws.recv({ type: "pong" });
    results.validation = pongs === 1 && refused.length === cases.length && sent.join() === "b" && got.join() === "7-0" && s.lastId === "7-0"
      ? "ok" : "refused [" + refused + "], sent [" + sent + "], got [" + got + "], last id " + s.lastId + ", pongs " + pongs;
    c.close();
  }
  // An empty after is no position, as Go's zero Handler.After: an app
  // that keeps its last id in a string starting out empty subscribes
  // from the server's position, not with a TypeError.
  {
    const [c, ws] = await welcomed();
    let err = null;
    try { c.subscribe("e", { after: "" }); } catch (e) { err = e; }
    const f = ws.sent.at(-1);
    results.emptyAfter = err === null && f && f.type === "subscribe" && f.channel === "e" && !("after" in f)
      ? "ok" : "error " + err + ", sent " + JSON.stringify(f);
    c.close();
  }
  // close() from a listener stops the client there: an application that
  // gives up on the next attempt (a "state" listener closing at
  // "connecting") gets no socket opened after it, and the state stays
  // "closed".
  {
    const [c] = await welcomed();
    c.on("state", (s) => { if (s === "connecting") c.close(); });
    sockets[0].shut(1006);
    await settle();
    results.closeFromListener = sockets.length === 1 && c.state === "closed"
      ? "ok" : sockets.length + " sockets, the last opened after close(); state " + c.state;
  }

  // close() from a listener while the client dispatches a frame: what
  // that frame would still have emitted after it reaches nobody (the
  // welcome after the "connected" state; onSubscribed after a gap).
  {
    const wrong = [];
    sockets.length = 0;
    const c = newClient();
    await settle();
    let welcomes = 0;
    c.on("state", (s) => { if (s === "connected") c.close(); });
    c.on("welcome", () => welcomes++);
    sockets[0].open();
    sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i" });
    if (welcomes !== 0) wrong.push("welcome emitted after close() from a state listener");
    const [c2, ws2] = await welcomed();
    let subscribed = 0;
    c2.on("gap", () => c2.close());
    c2.subscribe("a", { after: "5-0", onSubscribed: () => subscribed++ });
    ws2.recv({ type: "subscribed", channel: "a", recovered: false, position: "9-0", ref: ws2.sent.at(-1).ref });
    if (subscribed !== 0) wrong.push("onSubscribed called after close() from a gap listener");
    results.closeMidDispatch = wrong.length === 0 && c.state === "closed" && c2.state === "closed" ? "ok" : wrong.join("; ") + " (states " + c.state + ", " + c2.state + ")";
  }

  // Time options as the Go client's durations: 0 is the default, a
  // negative, non-finite or non-number one is refused (a 0 ms backoff
  // would reconnect in a tight loop).
  {
    const wrong = [];
    const c = newClient({ minBackoff: 0, maxBackoff: 0, stableAfter: 0 });
    if (c.minBackoff !== 500 || c.maxBackoff !== 20000 || c.stableAfter !== 10000) wrong.push("0 is not the default: " + [c.minBackoff, c.maxBackoff, c.stableAfter]);
    c.close();
    const p = newClient({ activityTimeout: 0, pongTimeout: 0 });
    if (p.activityTimeout !== 50000 || p.pongTimeout !== 10000) wrong.push("0 is not the default: " + [p.activityTimeout, p.pongTimeout]);
    p.close();
    const off = newClient({ activityTimeout: -1 });
    if (off.activityTimeout !== -1) wrong.push("activityTimeout -1 (off) taken as " + off.activityTimeout);
    off.close();
    for (const [name, o] of [["minBackoff -1", { minBackoff: -1 }], ["maxBackoff '5'", { maxBackoff: "5" }], ["stableAfter Infinity", { stableAfter: Infinity }],
      ["pongTimeout -1", { pongTimeout: -1 }], ["activityTimeout '5'", { activityTimeout: "5" }], ["activityTimeout NaN", { activityTimeout: NaN }]]) {
      try { newClient(o).close(); wrong.push(name + " accepted"); } catch (e) { if (!(e instanceof TypeError)) wrong.push(name + ": " + e); }
    }
    results.timeOptions = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The silence probe: a ping after activityTimeout without a frame, any
  // frame as its answer, and a drop (a lost connection, resumed) when
  // none comes within pongTimeout.
  {
    const wrong = [];
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    const pings = (ws) => ws.sent.filter((f) => f.type === "ping").length;
    const [c, ws] = await welcomed({ activityTimeout: 200, pongTimeout: 200 });
    const closes = [];
    c.on("close", (e) => closes.push(e.code + " " + e.reason));
    const s = c.subscribe("a", {});
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: ws.sent.at(-1).ref });
    ws.recv({ type: "message", channel: "a", id: "2-0", ts: 1, data: 2 });
    await wait(100);
    if (pings(ws)) wrong.push("pinged after 100 ms of silence (activityTimeout 200)");
    await wait(200);
    if (pings(ws) !== 1) wrong.push(pings(ws) + " pings after 300 ms of silence, want 1");
    ws.recv({ type: "message", channel: "a", id: "3-0", ts: 1, data: 3 }); // any frame answers
    await wait(100);
    if (sockets.length !== 1) wrong.push("dropped though a frame answered the ping");
    await wait(400);
    if (pings(ws) !== 2 || sockets.length !== 2 || c.ws === ws) wrong.push(pings(ws) + " pings, " + sockets.length + " sockets after an unanswered ping");
    if (closes.join() !== "1006 no answer to ping") wrong.push("closes [" + closes + "]");
    const ws2 = sockets.at(-1);
    ws2.open();
    ws2.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    const resume = ws2.sent.find((f) => f.type === "subscribe");
    if (resume?.after !== "3-0" || s.lastId !== "3-0") wrong.push("resumed after " + resume?.after);
    c.close();
    // A socket never welcomed (a proxy that accepts and forwards nothing)
    // is dropped too, after activityTimeout + pongTimeout, with nothing sent.
    sockets.length = 0;
    const c2 = newClient({ activityTimeout: 30, pongTimeout: 30 });
    await settle();
    sockets[0].open();
    await wait(120);
    if (sockets.length < 2 || sockets[0].frames.length) wrong.push("a socket never welcomed: " + sockets.length + " dials, " + sockets[0].frames.length + " frames sent");
    c2.close();
    // A server that closes idle connections (welcome idle_timeout_ms) is
    // not pinged before its idle timeout: its 4000 comes first.
    sockets.length = 0;
    const c3 = newClient({ activityTimeout: 20, pongTimeout: 20 });
    await settle();
    sockets[0].open();
    sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i", idle_timeout_ms: 1000 });
    await wait(200);
    if (pings(sockets[0])) wrong.push("pinged before the server's idle timeout");
    c3.close();
    // Probes off: no ping, and no drop.
    const [c4, ws4] = await welcomed({ activityTimeout: -1, pongTimeout: 10 });
    await wait(100);
    globalThis.dispatchEvent(new Event("offline"));
    globalThis.dispatchEvent(new Event("online"));
    if (pings(ws4) || c4.ws !== ws4) wrong.push("probes off: " + pings(ws4) + " pings");
    c4.close();
    results.silenceProbe = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // connectTimeout: a dial not welcomed within it is dropped, probes on or
  // off (a browser waits minutes on an upgrade that hangs, and for ever
  // on an upgraded socket that never sends its welcome), with nothing
  // sent, and dialled again; a welcomed socket with probes off is never
  // dropped; close() leaves no timer behind.
  {
    const wrong = [];
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    for (const [name, opts] of [["probes off", { activityTimeout: -1 }], ["probes on", { activityTimeout: 60000, pongTimeout: 60000 }]]) {
      sockets.length = 0;
      // Every other dial hangs (never opens); the others open but send no welcome.
      FakeWS.dialed = (ws) => { if (sockets.length % 2 === 0) ws.open(); };
      const c = newClient({ ...opts, connectTimeout: 60 });
      const closes = [];
      c.on("close", (e) => closes.push(e.code + " " + e.reason));
      await until(() => sockets.length >= 3 && closes.length >= 2, 10000);
      FakeWS.dialed = null;
      const gaps = sockets.slice(1).map((ws, i) => Math.round(ws.at - sockets[i].at));
      if (sockets.length < 3 || closes.length < 2 || closes.some((e) => e !== "1006 no welcome") || gaps.some((g) => g < 55) || sockets.some((ws) => ws.frames.length)) {
        wrong.push(name + ": " + sockets.length + " dials " + gaps.join(" ") + " ms apart, closes [" + closes + "], " + sockets.map((ws) => ws.frames.length) + " frames sent");
      }
      c.close();
      const dials = sockets.length;
      await wait(150);
      if (sockets.length !== dials) wrong.push(name + ": dialled after close()");
    }
    // Probes off: the welcomed socket stays, however silent.
    const [c, ws] = await welcomed({ activityTimeout: -1, connectTimeout: 200 });
    await wait(400);
    if (c.ws !== ws || c.state !== "connected") wrong.push("probes off: a welcomed socket dropped (state " + c.state + ")");
    c.close();
    // The default: activityTimeout + pongTimeout, activityTimeout's
    // default when probes are off; a bad value is refused.
    for (const [opts, want] of [[{}, 60000], [{ activityTimeout: -1, pongTimeout: 5000 }, 55000], [{ activityTimeout: 1000, pongTimeout: 500 }, 1500], [{ connectTimeout: 7000 }, 7000]]) {
      const d = newClient(opts);
      if (d.connectTimeout !== want) wrong.push(JSON.stringify(opts) + ": connectTimeout " + d.connectTimeout + ", want " + want);
      d.close();
    }
    for (const v of [-1, "5", NaN]) {
      try { newClient({ connectTimeout: v }).close(); wrong.push("connectTimeout " + v + " accepted"); } catch (e) { if (!(e instanceof TypeError)) wrong.push("connectTimeout " + v + ": " + e); }
    }
    results.connectTimeout = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // 4004 (token expired) without getToken ends the client: the token it
  // holds is expired, and every dial with it would be refused at the
  // upgrade, which a browser sees only as a close, for ever. The final
  // state carries the close. With getToken, 4004 reconnects (closeCodes).
  {
    const wrong = [];
    for (const [name, opts, url] of [["token option", { token: "t1" }, undefined], ["token in the URL", {}, "ws://127.0.0.1:1/ws?token=t1"]]) {
      sockets.length = 0;
      const c = url ? new WsRelay(url, { WebSocket: FakeWS, minBackoff: 1, maxBackoff: 2 }) : newClient(opts);
      const states = [];
      c.on("state", (s, d) => states.push(s + (d?.code ? " " + d.code : "")));
      await settle();
      sockets[0].open();
      sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i" });
      sockets[0].shut(4004);
      await settle();
      if (sockets.length !== 1 || c.state !== "closed" || states.at(-1) !== "closed 4004") wrong.push(name + ": " + sockets.length + " dials, states [" + states + "]");
      c.close();
    }
    results.expiredStaticToken = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // Network events: "online" ends a wait to reconnect and probes a
  // connected socket, "offline" probes it; close() and a final close
  // remove the listeners.
  {
    const wrong = [];
    const added = new Map();
    const add = globalThis.addEventListener, remove = globalThis.removeEventListener;
    globalThis.addEventListener = function (name, fn, o) { if (name === "online" || name === "offline") added.set(fn, name); return add.call(this, name, fn, o); };
    globalThis.removeEventListener = function (name, fn, o) { added.delete(fn); return remove.call(this, name, fn, o); };
    const random = Math.random;
    Math.random = () => 1; // every backoff its longest
    try {
      const [c, ws] = await welcomed({ minBackoff: 60000, maxBackoff: 60000 });
      if (added.size !== 2) wrong.push(added.size + " network listeners, want 2");
      globalThis.dispatchEvent(new Event("offline"));
      const pinged = ws.sent.filter((f) => f.type === "ping").length;
      globalThis.dispatchEvent(new Event("online")); // a probe is waiting already
      if (pinged !== 1 || ws.sent.filter((f) => f.type === "ping").length !== 1) wrong.push("offline then online: " + ws.sent.filter((f) => f.type === "ping").length + " pings, want 1");
      ws.recv({ type: "pong" });
      globalThis.dispatchEvent(new Event("online"));
      if (ws.sent.filter((f) => f.type === "ping").length !== 2) wrong.push("online while connected sent no probe");
      ws.shut(1006);
      await settle();
      if (sockets.length !== 1 || c.state !== "disconnected") wrong.push("reconnected before the 60 s backoff: " + sockets.length + " dials");
      globalThis.dispatchEvent(new Event("online"));
      await settle();
      if (sockets.length !== 2) wrong.push("online while waiting: " + sockets.length + " dials, want 2");
      c.close();
      if (added.size) wrong.push(added.size + " listeners left after close()");
      const [c2, ws2] = await welcomed();
      ws2.shut(4003);
      await settle();
      if (added.size || c2.state !== "closed") wrong.push(added.size + " listeners left after a final close");
    } finally {
      globalThis.addEventListener = add;
      globalThis.removeEventListener = remove;
      Math.random = random;
    }
    results.networkEvents = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // Waits past setTimeout's limit (2³¹−1 ms, 24.8 days), which a timer
  // takes modulo 2³² (a longer one fires at once): a server with a long
  // IDLE_TIMEOUT, or a long time option, must not make the client's timers
  // fire in a loop (the page's CPU) nor its reconnects storm.
  {
    const wrong = [];
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    const day = 86400000;
    for (const [name, opts, welcome] of [
      ["activityTimeout 30 days", { activityTimeout: 30 * day }, {}],
      ["pongTimeout 30 days", { activityTimeout: 20, pongTimeout: 30 * day }, {}],
      ["idle_timeout_ms 30 days", { activityTimeout: 20 }, { idle_timeout_ms: 30 * day }],
    ]) {
      sockets.length = 0;
      const c = newClient(opts);
      let checks = 0;
      const check = c.checkSilence.bind(c);
      c.checkSilence = (ws) => { checks++; check(ws); };
      await settle();
      sockets[0].open();
      sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i", ...welcome });
      await wait(200);
      if (checks > 2 || sockets.length !== 1) wrong.push(name + ": " + checks + " silence checks, " + sockets.length + " dials in 200 ms");
      c.close();
    }
    // A 30-day connectTimeout bounds a getToken() that does not settle
    // without giving it up at once (and asking again, in a loop).
    {
      sockets.length = 0;
      let calls = 0;
      const errors = [];
      const c = newClient({ connectTimeout: 30 * day, getToken: () => { calls++; return new Promise(() => {}); } });
      c.on("error", (e) => errors.push(String(e?.message ?? e)));
      await wait(200);
      if (calls !== 1 || errors.length || c.state !== "connecting") wrong.push("connectTimeout 30 days awaiting getToken: " + calls + " getToken calls, errors [" + errors.slice(0, 2) + "], state " + c.state + " after 200 ms");
      c.close();
    }
    const random = Math.random;
    Math.random = () => 1; // every backoff its longest
    try {
      const [c, ws] = await welcomed({ minBackoff: 30 * day, maxBackoff: 30 * day });
      ws.shut(1006);
      await wait(100);
      if (sockets.length !== 1) wrong.push("a 30-day backoff: " + sockets.length + " dials in 100 ms");
      c.close();
    } finally {
      Math.random = random;
    }
    results.longTimers = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // Unsubscribing a subscription the server refused is answered
  // not_subscribed: the state asked for, which reaches no error listener.
  {
    const [c, ws] = await welcomed();
    const errs = [];
    c.on("error", (e) => errs.push("client " + e.code));
    const s = c.subscribe("a", { onError: (e) => errs.push("subscription " + e.code) });
    ws.recv({ type: "error", code: "forbidden", message: "no", ref: ws.sent.at(-1).ref });
    s.unsubscribe();
    ws.recv({ type: "error", code: "not_subscribed", message: "not subscribed to a" });
    results.unsubscribeRefused = errs.join() === "subscription forbidden" && ws.sent.at(-1).type === "unsubscribe" ? "ok" : "errors [" + errs + "]";
    c.close();
  }

  // subscribe() on a closed client throws, whether close() or the
  // server (a final 4003) closed it: the subscription could never start.
  {
    const wrong = [];
    const [c] = await welcomed();
    c.close();
    try { c.subscribe("a"); wrong.push("subscribe after close() accepted"); } catch (e) { if (!e.message.includes("closed")) wrong.push("after close(): " + e); }
    const [c2, ws2] = await welcomed();
    ws2.shut(4003);
    await settle();
    try { c2.subscribe("a"); wrong.push("subscribe after 4003 accepted (state " + c2.state + ")"); } catch (e) { if (!e.message.includes("closed")) wrong.push("after 4003: " + e); }
    // From a "close" listener of the final close, before the state
    // says closed: refused too.
    const [c3, ws3] = await welcomed();
    let inListener = "not called";
    c3.on("close", () => {
      try { c3.subscribe("a"); inListener = "accepted (state " + c3.state + ")"; } catch (e) { inListener = e.message.includes("closed") ? "ok" : "" + e; }
    });
    ws3.shut(4003);
    await settle();
    if (inListener !== "ok") wrong.push("subscribe from the close listener of a 4003: " + inListener);
    results.subscribeAfterClose = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // close() while getToken() is pending, which then fails, or brings a
  // good token: the client stays closed (it does not go back to
  // "disconnected" and schedule a reconnect), opens no socket with the
  // late token and emits nothing.
  {
    const wrong = [];
    for (const [name, settleToken] of [["fails", (_, reject) => reject(new Error("offline"))], ["brings a token", (resolve) => resolve("late")]]) {
      sockets.length = 0;
      let answer;
      const c = newClient({ getToken: () => new Promise((resolve, reject) => { answer = () => settleToken(resolve, reject); }) });
      await settle(); // connect() waits for the token
      c.close();
      const events = [];
      for (const ev of ["state", "error", "close", "welcome"]) c.on(ev, () => events.push(ev));
      answer();
      await settle();
      if (c.state !== "closed" || sockets.length !== 0 || events.length || c.token === "late") {
        wrong.push(name + ": state " + c.state + " after close(), " + sockets.length + " sockets, events [" + events + "], token " + c.token);
      }
    }
    results.closeDuringGetToken = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // A getToken() that never settles (a token endpoint that never
  // answers) is given up after connectTimeout, as a dial without its
  // welcome is: an "error" event, "disconnected", and getToken() asked
  // again after the backoff; the late answer of the call given up is
  // ignored. close() while it is awaited closes at once and leaves no
  // timer behind.
  {
    const wrong = [];
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    sockets.length = 0;
    let calls = 0, late;
    const errors = [], states = [];
    FakeWS.dialed = (ws) => queueMicrotask(() => { ws.open(); ws.recv({ type: "welcome", connection_id: "c1", instance: "i" }); });
    const c = newClient({ connectTimeout: 60, getToken: () => ++calls === 1 ? new Promise((r) => { late = r; }) : Promise.resolve("t" + calls) });
    c.on("error", (e) => errors.push(String(e?.message ?? e)));
    c.on("state", (s) => states.push(s));
    await wait(300);
    FakeWS.dialed = null;
    if (c.state !== "connected" || sockets.length !== 1 || !sockets[0].protocols.includes("token.t2") || calls !== 2) {
      wrong.push("hanging getToken: state " + c.state + ", " + sockets.length + " dials with " + JSON.stringify(sockets.map((ws) => ws.protocols)) + ", " + calls + " getToken calls (want connected, 1 dial with t2, 2 calls)");
    }
    if (errors.length !== 1 || !errors[0].includes("connectTimeout") || states.join(" ") !== "connecting disconnected connecting connected") {
      wrong.push("hanging getToken: errors [" + errors + "], states " + states.join(" "));
    }
    late?.("late");
    await settle();
    if (sockets.length !== 1 || c.token !== "t2") wrong.push("the late token: " + sockets.length + " dials, token " + c.token);
    c.close();
    const c2 = newClient({ connectTimeout: 60, getToken: () => new Promise(() => {}) });
    const errors2 = [];
    c2.on("error", (e) => errors2.push(String(e?.message ?? e)));
    await settle();
    c2.close();
    await wait(150);
    if (c2.state !== "closed" || sockets.length !== 1 || errors2.length) wrong.push("close() awaiting getToken: state " + c2.state + ", " + (sockets.length - 1) + " dials, errors [" + errors2 + "]");
    results.getTokenTimeout = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // A URL whose query would fight the client is refused by the
  // constructor: channels= (the server would subscribe them with no ref on
  // every connect, without resume, and the client would drop their
  // messages and see its own subscribe() refused already_subscribed),
  // token= beside token or getToken (the URL's would be used, not a fresh
  // one), user= beside user (replaced), a repeated token= or user= (400 on
  // every dial). What does not conflict is dialled as given.
  {
    const base = "ws://127.0.0.1:1/ws";
    const refused = [
      ["?channels=a,b", {}, "subscribe()"],
      ["?channels=", {}, "subscribe()"],
      ["?channels=a&channels=b", { user: "ada" }, "subscribe()"],
      ["?token=old", { token: "t" }, "token"],
      ["?token=old", { getToken: async () => "t" }, "token"],
      ["?token=a&token=b", {}, "token"],
      ["?user=bob", { user: "ada" }, "user"],
      ["?user=ada", { user: "ada" }, "user"],
      ["?user=a&user=b", {}, "user"],
      // A user the egress refuses (400 invalid_user) on every dial, which
      // the browser could only retry for ever (Go: a final RefusedError).
      ["", { user: "ada lovelace" }, "user"],
      ["", { user: ".." }, "user"],
      // A pair Go's query parser (the egress's) drops: refused with 400.
      ["?user=a;b", {}, "user parameter is malformed"],
      ["?user=%zz", {}, "user parameter is malformed"],
      ["?x=1&token=a;b", {}, "token parameter is malformed"],
      ["?x=1;channels=a", {}, "channels parameter is malformed"],
      ["?us%65r=%", {}, "user parameter is malformed"],
    ];
    const wrong = [];
    sockets.length = 0;
    for (const [q, opts, word] of refused) {
      try {
        const c = new WsRelay(base + q, { WebSocket: FakeWS, ...opts });
        c.close();
        wrong.push(q + " accepted");
      } catch (e) {
        if (!(e instanceof Error) || !e.message.includes(word)) wrong.push(q + ": " + e);
      }
    }
    // The error does not quote a password or a token the URL holds.
    for (const url of ["ftp://127.0.0.1/ws", "ws://[bad/ws", "ftp://ada:s3cret@127.0.0.1/ws?token=s3cret"]) {
      try { new WsRelay(url, { WebSocket: FakeWS }).close(); wrong.push(url + " accepted"); } catch (e) { if (!(e instanceof TypeError) || e.message.includes("s3cret")) wrong.push(url + ": " + e); }
    }
    await settle();
    if (sockets.length) wrong.push(sockets.length + " sockets opened");
    const accepted = [
      [base + "?user=bob", {}, base + "?user=bob"],
      [base + "?x=1", { user: "ada" }, base + "?x=1&user=ada"],
      [base + "?token=tok", {}, base + "?token=tok"],
      // An empty token= is no token (docs/protocol.md): the server takes
      // the options' token, from the subprotocol.
      [base + "?token=", { token: "t" }, base + "?token="],
      [base + "?token=", { getToken: async () => "t" }, base + "?token="],
      [base + "?z=1;2&y=%", {}, base + "?z=1;2&y=%"],
      [base + "?z=1;2&y=%", { user: "a@b" }, base + "?z=1;2&y=%&user=a%40b"],
      [base + "?", { user: "ada" }, base + "?user=ada"],
      [base + "?user=bob", { token: "t" }, base + "?user=bob"],
      ["/ws?user=bob", {}, "ws://" + location.host + "/ws?user=bob"],
    ];
    for (const [url, opts, want] of accepted) {
      sockets.length = 0;
      let c;
      try { c = new WsRelay(url, { WebSocket: FakeWS, ...opts }); } catch (e) { wrong.push(url + ": " + e); continue; }
      await settle();
      if (sockets[0]?.url !== want) wrong.push(url + " dialled " + sockets[0]?.url + ", want " + want);
      c.close();
    }
    results.urlQuery = wrong.length === 0 ? "ok" : wrong.join("; ");
  }
  // A URL with a fragment (a hash-routed page's address turned into the
  // socket's, or a bare "#"), which the browser's WebSocket refuses with
  // a SyntaxError on every dial: the fragment is not sent in a request
  // anyway, and the client dials without it. Against this page's egress,
  // with the browser's own WebSocket.
  {
    const wrong = [];
    for (const url of ["ws://" + location.host + "/ws#/chat", "/ws?x=1#"]) {
      const errors = [];
      const c = new WsRelay(url, { user: "frag", minBackoff: 10, maxBackoff: 20 });
      c.on("error", (e) => errors.push(String(e)));
      await until(() => c.state === "connected", 5000);
      if (c.state !== "connected" || errors.length) wrong.push(url + ": state " + c.state + ", errors [" + errors.slice(0, 2) + "]");
      c.close();
    }
    results.urlFragment = wrong.length === 0 ? "ok" : wrong.join("; ");
  }
  // A server that repeats itself or goes backwards: a message whose id
  // is not after the last one delivered (the same id, an older one, the
  // same id without its "-seq") is dropped, and so is one for a channel
  // never subscribed or already unsubscribed (not taken for a targeted
  // message either); the rest are delivered once, in order.
  {
    const [c, ws] = await welcomed();
    const got = [], targeted = [];
    c.on("message", (m) => targeted.push(m.channel));
    const s = c.subscribe("a", { onMessage: (m) => got.push(m.id) });
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: ws.sent.at(-1).ref });
    for (const id of ["3-0", "3-0", "2-5", "3", "1-0", "0-0", "4-0", "4-0"]) ws.recv({ type: "message", channel: "a", id, ts: 1, data: 0 });
    ws.recv({ type: "message", channel: "never", id: "9-0", ts: 1, data: 0 });
    s.unsubscribe();
    ws.recv({ type: "message", channel: "a", id: "5-0", ts: 1, data: 0 });
    results.hostileMessages = got.join(" ") === "3-0 4-0" && s.lastId === "4-0" && targeted.length === 0
      ? "ok" : "got [" + got + "], last id " + s.lastId + ", targeted [" + targeted + "]";
    c.close();
  }

  // A server that answers a subscribe twice, answers one never made, or
  // answers with a position that is not an id or without "recovered":
  // one subscribe has one answer, so a repeat changes nothing (a second
  // answer saying "not recovered" from an older position would otherwise
  // move the subscription back, and the repeated replay would be
  // delivered twice); an answer nobody asked for is ignored; a position
  // that is not an id leaves the subscription where it was; no
  // "recovered" is a resume that recovered (an older server's answer).
  {
    const [c, ws] = await welcomed();
    const wrong = [];
    const got = [], gaps = [], answers = [];
    c.on("gap", (g) => gaps.push(g.channel));
    const s = c.subscribe("a", { after: "1-0", onMessage: (m) => got.push(m.id), onSubscribed: (r) => answers.push(r) });
    const ref = ws.sent.at(-1).ref;
    const msg = (channel, id) => ws.recv({ type: "message", channel, id, ts: 1, data: 0 });
    ws.recv({ type: "subscribed", channel: "a", recovered: true, position: "1-0", ref });
    msg("a", "2-0"); msg("a", "3-0");
    ws.recv({ type: "subscribed", channel: "a", recovered: false, position: "1-0", ref });
    ws.recv({ type: "subscribed", channel: "a", recovered: true, position: "1-0", ref });
    msg("a", "2-0"); msg("a", "3-0"); msg("a", "4-0");
    if (got.join(" ") !== "2-0 3-0 4-0" || s.lastId !== "4-0" || answers.join() !== "true" || gaps.length) {
      wrong.push("answered twice: got [" + got + "], last id " + s.lastId + ", onSubscribed [" + answers + "], gaps [" + gaps + "]");
    }
    ws.recv({ type: "subscribed", channel: "b", position: "5-0", ref: 99 });
    ws.recv({ type: "subscribed", channel: "b", position: "5-0" });
    msg("b", "6-0");
    if (got.length !== 3) wrong.push("a channel not asked for: got [" + got + "]");
    const got2 = [], answers2 = [];
    const s2 = c.subscribe("c", { after: "5-0", onMessage: (m) => got2.push(m.id), onSubscribed: (r) => answers2.push(r) });
    ws.recv({ type: "subscribed", channel: "c", position: 7, ref: ws.sent.at(-1).ref });
    msg("c", "5-0"); msg("c", "6-0");
    if (got2.join() !== "6-0" || answers2.join() !== "true") wrong.push("position 7 without recovered: got [" + got2 + "], onSubscribed [" + answers2 + "]");
    const got3 = [];
    const s3 = c.subscribe("d", { onMessage: (m) => got3.push(m.id) });
    ws.recv({ type: "subscribed", channel: "d", position: { id: "8-0" }, ref: ws.sent.at(-1).ref });
    if (s3.lastId !== null) wrong.push("position {id} taken: last id " + s3.lastId);
    msg("d", "8-0");
    if (got3.join() !== "8-0" || s2.lastId !== "6-0") wrong.push("after a position that is not an id: got [" + got3 + "]");
    results.hostileSubscribed = wrong.length === 0 ? "ok" : wrong.join("; ");
    c.close();
  }

  // Frames no wsrelay egress sends (broken JSON, JSON that is not an
  // object, an unknown type, binary frames) are ignored, before the
  // welcome and after, without an exception reaching the page; a second
  // welcome neither resubscribes nor is reported again.
  {
    sockets.length = 0;
    const c = newClient();
    const got = [];
    let welcomes = 0, errors = 0;
    c.on("welcome", () => welcomes++);
    c.on("error", () => errors++);
    const s = c.subscribe("a", { onMessage: (m) => got.push(m.id) });
    await settle();
    const ws = sockets[0];
    ws.open();
    const thrown = [];
    const junk = ["{", "null", "[]", "42", '"welcome"', "", "true", '{"type":null}', '{"type":["welcome"]}',
      '{"type":"presence","channel":"a","id":"9-0"}', new Blob(['{"type":"welcome"}']), new ArrayBuffer(8)];
    const feed = () => {
      for (const d of junk) {
        try { ws.recvRaw(d); } catch (e) { thrown.push(String(d).slice(0, 24) + ": " + e); }
      }
    };
    feed();
    const before = ws.frames.length;
    ws.recv({ type: "welcome", connection_id: "c1", instance: "i", max_frame_bytes: 65536 });
    ws.recv({ type: "welcome", connection_id: "c2", instance: "i", max_frame_bytes: 256 });
    feed();
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: s.ref });
    ws.recvRaw(new Blob([JSON.stringify({ type: "message", channel: "a", id: "2-0", ts: 1, data: 0 })]));
    ws.recv({ type: "message", channel: "a", id: "3-0", ts: 1, data: 0 });
    const subs = ws.sent.filter((f) => f.type === "subscribe").length;
    results.hostileFrames = thrown.length === 0 && before === 0 && subs === 1 && welcomes === 1 && errors === 0 && got.join() === "3-0" && c.state === "connected"
      ? "ok" : "thrown [" + thrown + "], " + before + " frames before the welcome, " + subs + " subscribes, " + welcomes + " welcomes, " + errors + " errors, got [" + got + "], state " + c.state;
    c.close();
  }

  // max_frame_bytes that is no size (0, negative, not a number) gets one
  // subscribe a frame, as an older server; a huge one is held to 64 KiB;
  // a small one packs only what fits (166: two 83-byte subscribes fit
  // only without the newline between them). Each subscription is sent once.
  {
    const wrong = [];
    for (const max of [0, -1, -65536, "65536", null, true, { n: 1 }, 1.5, 100, 166, 1e9, 1e300]) {
      sockets.length = 0;
      const c = newClient();
      const subs = [0, 1, 2, 3, 4].map((i) => c.subscribe("x".repeat(40) + "-" + i, {}));
      await settle();
      const ws = sockets[0];
      ws.open();
      try { ws.recv({ type: "welcome", connection_id: "c1", instance: "i", max_frame_bytes: max }); } catch (e) { wrong.push(JSON.stringify(max) + ": " + e); }
      const sent = ws.sent.map((f) => f.ref).join();
      const packed = ws.frames.filter((f) => f.includes("\n"));
      const size = typeof max === "number" && max >= 1 ? Math.min(max, 65536) : 0;
      if (sent !== subs.map((x) => x.ref).join()) wrong.push(JSON.stringify(max) + ": sent refs " + sent);
      if (packed.some((f) => f.length > size)) wrong.push(JSON.stringify(max) + ": frames of " + ws.frames.map((f) => f.length) + " bytes");
      if (c.state !== "connected") wrong.push(JSON.stringify(max) + ": state " + c.state);
      c.close();
    }
    // Subscribes of more than 64 KiB in all: a welcome allowing larger
    // frames still gets them in frames of at most 64 KiB.
    for (const max of [1e9, 4 * 65536]) {
      sockets.length = 0;
      const c = newClient();
      const subs = Array.from({ length: 800 }, (_, i) => c.subscribe("y".repeat(120) + "-" + i, {}));
      await settle();
      const ws = sockets[0];
      ws.open();
      ws.recv({ type: "welcome", connection_id: "c1", instance: "i", max_frame_bytes: max });
      if (ws.sent.map((f) => f.ref).join() !== subs.map((x) => x.ref).join()) wrong.push(max + " with 800 subscriptions: not each sent once, in order");
      if (ws.frames.length < 2 || ws.frames.some((f) => f.length > 65536)) wrong.push(max + " with 800 subscriptions: frames of " + ws.frames.map((f) => f.length) + " bytes");
      c.close();
    }
    results.maxFrameBytes = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // Every close code of protocol.md's table, and codes it does not list:
  // 1002, 1007, 1008, 1009 and 4003 end the client after one dial; any
  // other is retried, with a backoff that grows over short connections
  // and starts over after a planned rotation (1001, 4000, 4001); only
  // 4004 asks getToken again (each connection was welcomed).
  {
    const wrong = [];
    const final = [1002, 1007, 1008, 1009, 4003];
    for (const code of [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015, 3000, 4000, 4001, 4002, 4003, 4004, 4005, 4999]) {
      let tokens = 0;
      sockets.length = 0;
      const c = newClient({ stableAfter: 60000, getToken: async () => "t" + ++tokens });
      const closes = [];
      c.on("close", (e) => closes.push(e.code));
      await settle();
      for (let i = 0; i < 3 && sockets.length === i + 1; i++) {
        sockets[i].open();
        sockets[i].recv({ type: "welcome", connection_id: "c" + i, instance: "i" });
        sockets[i].shut(code);
        await settle();
      }
      if (final.includes(code)) {
        if (sockets.length !== 1 || c.state !== "closed" || closes.join() !== String(code)) wrong.push(code + ": " + sockets.length + " dials, state " + c.state + ", closes [" + closes + "]");
      } else {
        const attempt = [1001, 4000, 4001].includes(code) ? 1 : 3;
        const asked = code === 4004 ? 4 : 1;
        if (sockets.length !== 4 || c.attempt !== attempt || tokens !== asked || closes.length !== 3) {
          wrong.push(code + ": " + sockets.length + " dials (want 4), backoff attempt " + c.attempt + " (want " + attempt + "), " + tokens + " getToken calls (want " + asked + ")");
        }
      }
      c.close();
    }
    results.closeCodes = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // A server that refuses every connection (closed before its welcome)
  // is dialled with the documented backoff, not in a loop: with the
  // jitter at its top, the waits are min·2ⁿ capped at max.
  {
    const random = Math.random;
    Math.random = () => 1;
    sockets.length = 0;
    FakeWS.dialed = (ws) => setTimeout(() => ws.shut(1006), 0);
    const c = newClient({ minBackoff: 20, maxBackoff: 80 });
    await new Promise((r) => setTimeout(r, 400));
    c.close();
    FakeWS.dialed = null;
    Math.random = random;
    const gaps = sockets.slice(1).map((ws, i) => Math.round(ws.at - sockets[i].at));
    const short = gaps.filter((g, i) => g < Math.min(80, 20 * 2 ** i) - 2);
    results.noStorm = sockets.length >= 4 && sockets.length <= 7 && short.length === 0
      ? "ok" : sockets.length + " dials in 400 ms, " + gaps.join(" ") + " ms apart (want 20 40 80 80 …)";
  }

  // An application's listener or handler that throws: the exception is
  // logged, not thrown into the socket's event (the page's uncaught
  // errors); the other listeners and the client's state go on, and the
  // message it threw on counts as delivered (a resume starts after it).
  {
    const [c, ws] = await welcomed();
    const logged = [];
    const consoleError = console.error;
    console.error = (e) => logged.push(e?.message ?? String(e));
    const escaped = [];
    const feed = (f) => { try { ws.recv(f); } catch (e) { escaped.push(f.type + ": " + e.message); } };
    const got = [], gaps = [];
    c.on("gap", () => { throw new Error("gap listener"); });
    c.on("gap", (g) => gaps.push(g.channel));
    c.on("state", () => { throw new Error("state listener"); });
    c.subscribe("a", {
      after: "1-0",
      onSubscribed: () => { throw new Error("onSubscribed"); },
      onMessage: (m) => { got.push(m.id); if (m.id === "2-0") throw new Error("onMessage"); },
    });
    feed({ type: "subscribed", channel: "a", recovered: false, position: "1-0", ref: ws.sent.at(-1).ref });
    feed({ type: "message", channel: "a", id: "2-0", ts: 1, data: 0 });
    feed({ type: "message", channel: "a", id: "3-0", ts: 1, data: 0 });
    c.subscribe("b", { onError: () => { throw new Error("onError"); } });
    feed({ type: "error", code: "forbidden", message: "no", ref: ws.sent.at(-1).ref });
    ws.shut(1006);
    await settle();
    const ws2 = sockets.at(-1);
    ws2.open();
    ws2.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    console.error = consoleError;
    const resume = ws2.sent.find((f) => f.channel === "a");
    const want = "gap listener,onSubscribed,onMessage,onError";
    results.throwingListeners = escaped.length === 0 && got.join(" ") === "2-0 3-0" && gaps.join() === "a" && resume?.after === "3-0" && c.state === "connected" &&
      logged.filter((m) => m !== "state listener").join() === want
      ? "ok" : "escaped [" + escaped + "], got [" + got + "], gaps [" + gaps + "], resumed after " + resume?.after + ", state " + c.state + ", logged [" + logged + "]";
    c.close();
  }

  // A listener that moves the state on from inside an event (close() or
  // drop() from a "state" listener, close() from any other): the
  // listeners after it are not handed the state it left (they heard the
  // newer one already, and would take the stale one for the latest), the
  // rest of that step emits nothing for the socket it left (no welcome
  // after a drop() at "connected"), and after close() no listener of the
  // event being delivered is called any more.
  {
    const wrong = [];
    let [c, ws] = await welcomed();
    const first = [], second = [];
    c.on("state", (s) => { first.push(s); if (s === "disconnected") c.close(); });
    c.on("state", (s) => second.push(s));
    ws.shut(1006);
    await settle();
    if (first.join() !== "disconnected,closed" || second.join() !== "closed" || c.state !== "closed" || sockets.length !== 1) {
      wrong.push("close() at disconnected: first heard [" + first + "], second [" + second + "], state " + c.state + ", " + sockets.length + " dials");
    }

    sockets.length = 0;
    c = newClient();
    const heard = [];
    let welcomes = 0;
    c.on("state", (s) => { if (s === "connected" && sockets.length === 1) c.drop(); });
    c.on("state", (s) => heard.push(s));
    c.on("welcome", () => welcomes++);
    await settle();
    sockets[0].open();
    sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i" });
    if (heard.join() !== "connecting,disconnected" || welcomes !== 0 || c.state !== "disconnected") {
      wrong.push("drop() at connected: the next listener heard [" + heard + "], " + welcomes + " welcomes, state " + c.state);
    }
    c.close();

    for (const name of ["error", "close", "gap"]) {
      [c, ws] = await welcomed();
      let after = 0;
      c.on(name, () => c.close());
      c.on(name, () => after++);
      c.subscribe("a", { after: "5-0" });
      if (name === "error") ws.recv({ type: "error", code: "rate_limited", message: "m" });
      if (name === "close") ws.shut(1006);
      if (name === "gap") ws.recv({ type: "subscribed", channel: "a", recovered: false, position: "9-0", ref: ws.sent.at(-1).ref });
      if (after !== 0 || c.state !== "closed") wrong.push("close() from a " + name + " listener: " + after + " listeners called after it, state " + c.state);
    }
    results.stateReentrancy = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // drop() from a listener of any event, not only "state", ends that
  // event's delivery and the rest of its step: the listeners after it
  // heard "disconnected" already, so a welcome listener after one that
  // drops hears no welcome of the socket dropped, and a gap listener's
  // drop() leaves no onSubscribed for it (the reconnect's answer counts).
  {
    const wrong = [];
    sockets.length = 0;
    let c = newClient();
    const heard = [];
    c.on("welcome", () => { if (sockets.length === 1) c.drop(); });
    c.on("welcome", () => heard.push("welcome at " + c.state));
    await settle();
    sockets[0].open();
    sockets[0].recv({ type: "welcome", connection_id: "c1", instance: "i" });
    if (heard.length || c.state !== "disconnected") wrong.push("drop() from a welcome listener: the next one heard [" + heard + "], state " + c.state);
    c.close();
    let ws;
    [c, ws] = await welcomed();
    const answers = [];
    c.subscribe("a", { after: "5-0", onSubscribed: (r) => answers.push(r + " at " + c.state) });
    c.on("gap", () => { if (sockets.length === 1) c.drop(); });
    ws.recv({ type: "subscribed", channel: "a", recovered: false, position: "9-0", ref: ws.sent.at(-1).ref });
    if (answers.length || c.state !== "disconnected") wrong.push("drop() from a gap listener: onSubscribed [" + answers + "], state " + c.state);
    c.close();
    results.dropFromListener = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // What a socket no longer the client's delivers is ignored: a welcome
  // late on a socket dropped before its welcome (here, by a WebSocket
  // that still calls the handler it was given once the client let go of
  // it) neither connects the client nor is reported, and the socket
  // dialled since is welcomed as usual.
  {
    const wrong = [];
    sockets.length = 0;
    const c = newClient();
    let welcomes = 0;
    c.on("welcome", () => welcomes++);
    c.subscribe("a", {});
    await settle();
    const old = sockets[0];
    old.open();
    const deliver = old.onmessage;
    c.drop(); // gave up on it before its welcome
    await settle();
    const ws = sockets.at(-1);
    ws.open();
    deliver({ data: JSON.stringify({ type: "welcome", connection_id: "old", instance: "i" }) });
    if (c.state !== "connecting" || welcomes !== 0 || ws.frames.length || old.frames.length) {
      wrong.push("a welcome on the old socket: state " + c.state + ", " + welcomes + " welcomes, " + ws.frames.length + " frames on the new socket, " + old.frames.length + " on the old");
    }
    ws.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    const subs = ws.sent.filter((f) => f.type === "subscribe").length;
    if (c.state !== "connected" || welcomes !== 1 || subs !== 1) wrong.push("then its own welcome: state " + c.state + ", " + welcomes + " welcomes, " + subs + " subscribes");
    results.staleWelcome = wrong.length === 0 ? "ok" : wrong.join("; ");
    c.close();
  }

  // A gap listener that unsubscribes the channel (or unsubscribes and
  // subscribes it again) ends that subscription there: its onSubscribed
  // is not called for an answer it no longer waits for.
  {
    const wrong = [];
    const [c, ws] = await welcomed();
    let subscribed = 0;
    const s = c.subscribe("a", { after: "5-0", onSubscribed: () => subscribed++ });
    const off = c.on("gap", () => s.unsubscribe());
    ws.recv({ type: "subscribed", channel: "a", recovered: false, position: "9-0", ref: ws.sent.at(-1).ref });
    if (subscribed !== 0 || ws.sent.at(-1).type !== "unsubscribe") wrong.push("unsubscribe() from a gap listener: onSubscribed called " + subscribed + " times, last sent " + ws.sent.at(-1).type);
    off();
    let old = 0, fresh = 0;
    const s2 = c.subscribe("b", { after: "5-0", onSubscribed: () => old++ });
    c.on("gap", (g) => { if (g.channel === "b" && c.subs.get("b") === s2) { s2.unsubscribe(); c.subscribe("b", { onSubscribed: () => fresh++ }); } });
    ws.recv({ type: "subscribed", channel: "b", recovered: false, position: "9-0", ref: s2.ref });
    if (old !== 0 || fresh !== 0) wrong.push("unsubscribe() and subscribe() again from a gap listener: the old onSubscribed called " + old + " times, the new one " + fresh);
    results.gapUnsubscribe = wrong.length === 0 ? "ok" : wrong.join("; ");
    c.close();
  }

  // A token the WebSocket constructor refuses (it goes as the
  // "token.<token>" subprotocol, which takes only an HTTP token's
  // characters: a space, a comma, a non-ASCII letter throw a SyntaxError
  // in the browser). From getToken, the next attempt asks getToken again
  // instead of dialling with it for ever; as a static token, which could
  // never be sent, the constructor refuses it with a TypeError, as it
  // refuses a user the egress would refuse.
  {
    const wrong = [];
    // The browser's own WebSocket, as an application's page has it:
    // dialled at this egress, which refuses the tokens (not JWTs).
    const dials = [];
    class BrowserWS extends WebSocket {
      constructor(url, protocols) { dials.push(protocols); super(url, protocols); }
    }
    const url = "ws://" + location.host + "/ws";
    const given = ["bad token", "good.token"];
    let calls = 0;
    const c = new WsRelay(url, { WebSocket: BrowserWS, minBackoff: 1, maxBackoff: 2, getToken: async () => given[Math.min(calls++, given.length - 1)] });
    const errors = [];
    c.on("error", (e) => errors.push(e?.name));
    for (let i = 0; i < 100 && !dials.some((p) => p?.includes("token.good.token")); i++) await settle();
    c.close();
    if (calls < 2 || !dials.some((p) => p?.includes("token.good.token")) || !errors.length) {
      wrong.push("getToken giving a token that cannot be sent: " + calls + " getToken calls, dials " + JSON.stringify(dials.slice(0, 3)) + ", errors [" + errors.slice(0, 3) + "]");
    }
    // A WebSocket constructor that throws for any other reason: the next
    // attempt asks getToken again too.
    sockets.length = 0;
    let tokens = 0, thrown = 0;
    FakeWS.dialed = () => { if (!thrown++) throw new DOMException("refused", "SyntaxError"); };
    const c2 = newClient({ getToken: async () => "t" + ++tokens });
    for (let i = 0; i < 20 && sockets.length < 2; i++) await settle();
    FakeWS.dialed = null;
    const last = sockets.at(-1)?.protocols.find((p) => p.startsWith("token."));
    if (last !== "token.t2" || tokens !== 2) wrong.push("after the constructor threw: " + tokens + " getToken calls, next dial with " + last);
    c2.close();
    // A URL the browser blocks for this page (a ws:// one from an https://
    // page: Chromium and Firefox throw a SecurityError) would throw at
    // every dial, for ever: the client stops, closed, after the first.
    sockets.length = 0;
    let blocked = 0;
    FakeWS.dialed = () => { blocked++; throw new DOMException("insecure", "SecurityError"); };
    const c3 = newClient();
    const errors3 = [], states3 = [];
    c3.on("error", (e) => errors3.push(e?.name));
    c3.on("state", (st) => states3.push(st));
    for (let i = 0; i < 20; i++) await settle();
    FakeWS.dialed = null;
    if (blocked !== 1 || c3.state !== "closed" || errors3.join() !== "SecurityError") {
      wrong.push("a dial the browser blocks: " + blocked + " dials, state " + c3.state + " (" + states3.join() + "), errors [" + errors3 + "]");
    }
    let refused3 = "";
    try { c3.subscribe("a"); } catch (e) { refused3 = e.name; }
    if (!refused3) wrong.push("a subscribe() after a dial the browser blocks was taken");
    c3.close();
    // A static token that cannot be a subprotocol: refused at once.
    sockets.length = 0;
    for (const token of ["a b", "a,b", "t\u00f6k", "a\nb", "(x)", 42]) {
      try { new WsRelay(url, { WebSocket: FakeWS, token }).close(); wrong.push("token " + JSON.stringify(token) + " accepted"); }
      catch (e) { if (!(e instanceof TypeError) || !e.message.includes("token")) wrong.push("token " + JSON.stringify(token) + ": " + e); }
    }
    for (const token of ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2ln-_x", "key_1~!#$%&'*+^\x60|", ""]) {
      try { new WsRelay(url, { WebSocket: FakeWS, token }).close(); } catch (e) { wrong.push("token " + JSON.stringify(token) + " refused: " + e); }
    }
    await settle();
    if (sockets.length) wrong.push(sockets.length + " sockets dialled");
    results.badToken = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // Listeners added or removed while an event is delivered, as
  // EventTarget and Node's EventEmitter have it: one added hears the next
  // event, not this one, so a one-shot listener that re-arms itself
  // (off(), then on() again) is called once per event, not again and
  // again for the same one (a loop that hung the page); one removed by an earlier
  // listener is not called.
  {
    const wrong = [];
    const [c, ws] = await welcomed();
    let calls = 0;
    const arm = () => { const off = c.on("message", () => { off(); if (++calls < 50) arm(); }); };
    arm();
    let removedCalled = 0;
    let offLater = null;
    c.on("message", () => offLater?.());
    offLater = c.on("message", () => removedCalled++);
    ws.recv({ type: "message", target: "user", data: 1 });
    if (calls !== 1) wrong.push("a re-arming message listener called " + calls + " times for one message");
    if (removedCalled) wrong.push("a listener removed by an earlier one was called");
    ws.recv({ type: "message", target: "user", data: 2 });
    if (calls !== 2) wrong.push("the re-armed listener: " + calls + " calls after two messages, want 2");
    let states = 0;
    const armState = () => { const off = c.on("state", () => { off(); if (++states < 50) armState(); }); };
    armState();
    c.drop();
    if (states !== 1) wrong.push("a re-arming state listener called " + states + " times for one state");
    c.close();
    results.listenerChanges = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The silence probe times the silence by a monotonic clock: the wall
  // clock set back (NTP, a user, a laptop's clock corrected on wake) must
  // not hold off the probe, nor the drop of a socket that does not
  // answer it, for as long as the step.
  {
    const wrong = [];
    const realNow = Date.now;
    try {
      const [c, ws] = await welcomed({ activityTimeout: 100, pongTimeout: 100 });
      Date.now = () => realNow() - 3600000;
      await until(() => sockets.length > 1, 2000);
      const pings = ws.sent.filter((f) => f.type === "ping").length;
      if (pings !== 1 || sockets.length !== 2) wrong.push("clock set back an hour: " + pings + " pings, " + sockets.length + " sockets 2 s into a silence (activityTimeout and pongTimeout 100 ms)");
      c.close();
    } finally {
      Date.now = realNow;
    }
    results.clockStep = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The answer to a subscribe made before an unsubscribe of the channel
  // (the ref it sent, echoed) does not make the next subscription of it
  // live: the earlier subscription's live messages, still on the wire
  // before its "unsubscribed", would otherwise be delivered and move the
  // new subscription past the replay its own answer starts.
  {
    const [c, ws] = await welcomed();
    const first = c.subscribe("a", {});
    const ref1 = ws.sent.at(-1).ref;
    first.unsubscribe();
    const got = [], answers = [];
    const s = c.subscribe("a", { after: "2-0", onMessage: (m) => got.push(m.id), onSubscribed: (r) => answers.push(r) });
    const ref2 = ws.sent.at(-1).ref;
    ws.recv({ type: "subscribed", channel: "a", position: "5-0", ref: ref1 });
    ws.recv({ type: "message", channel: "a", id: "6-0", ts: 1, data: 6 }); // the first subscription's, live
    ws.recv({ type: "unsubscribed", channel: "a" });
    ws.recv({ type: "subscribed", channel: "a", recovered: true, position: "2-0", ref: ref2 });
    for (const id of ["3-0", "4-0", "5-0", "6-0"]) ws.recv({ type: "message", channel: "a", id, ts: 1, data: 0 });
    results.staleSubscribed = got.join(" ") === "3-0 4-0 5-0 6-0" && answers.join() === "true" && s.lastId === "6-0"
      ? "ok" : "got [" + got + "], onSubscribed [" + answers + "], last id " + s.lastId;
    c.close();
  }

  // Each connection's subscribe has its own answer: a resume that was not
  // recovered is reported (a gap event, onSubscribed(false)) and goes on
  // from the position it gives, however the previous connection's
  // subscription ended.
  {
    const [c, ws] = await welcomed();
    const got = [], answers = [], gaps = [];
    c.on("gap", (g) => gaps.push(g.channel));
    const s = c.subscribe("a", { onMessage: (m) => got.push(m.id), onSubscribed: (r) => answers.push(r) });
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: s.ref });
    ws.recv({ type: "message", channel: "a", id: "2-0", ts: 1, data: 2 });
    ws.shut(1006);
    await until(() => sockets.length > 1, 2000);
    const ws2 = sockets.at(-1);
    ws2.open();
    ws2.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    const resume = ws2.sent.find((f) => f.type === "subscribe");
    ws2.recv({ type: "subscribed", channel: "a", recovered: false, position: "9-0", ref: resume?.ref });
    ws2.recv({ type: "message", channel: "a", id: "8-0", ts: 1, data: 8 }); // before the position given
    ws2.recv({ type: "message", channel: "a", id: "10-0", ts: 1, data: 10 });
    results.resumeAnswered = resume?.after === "2-0" && answers.join() === "true,false" && gaps.join() === "a" && got.join(" ") === "2-0 10-0" && s.lastId === "10-0"
      ? "ok" : "resumed after " + resume?.after + ", onSubscribed [" + answers + "], gaps [" + gaps + "], got [" + got + "], last id " + s.lastId;
    c.close();
  }

  // The reconnect backoff, timed by the waits the client asks for (the
  // jitter pinned at its top): min·2ⁿ capped at max, growing over dials
  // refused before their welcome, whatever the close code (a draining
  // egress refuses new connections with 1001, a planned code that resets
  // the backoff only for a connection that was welcomed).
  {
    const wrong = [];
    const random = Math.random, realSetTimeout = globalThis.setTimeout;
    for (const code of [1006, 1001, 4000]) {
      const waits = [];
      let c;
      Math.random = () => 1;
      globalThis.setTimeout = function (fn, ms, ...rest) {
        if (new Error().stack.includes(".schedule")) waits.push(ms);
        return realSetTimeout.call(this, fn, ms, ...rest);
      };
      sockets.length = 0;
      FakeWS.dialed = (ws) => realSetTimeout(() => { ws.open(); ws.shut(code); }, 0);
      try {
        c = newClient({ minBackoff: 2, maxBackoff: 10, stableAfter: 1 });
        await until(() => waits.length >= 6, 5000);
      } finally {
        c?.close();
        FakeWS.dialed = null;
        globalThis.setTimeout = realSetTimeout;
        Math.random = random;
      }
      if (waits.slice(0, 6).join() !== "2,4,8,10,10,10") wrong.push(code + " before the welcome: waits " + waits.slice(0, 6) + " ms, want 2,4,8,10,10,10");
    }
    results.backoffBounds = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // "online" while waiting to reconnect dials at once and ends that wait:
  // its timer does not dial again later, replacing the connection made.
  {
    const random = Math.random;
    Math.random = () => 1;
    let c, ws;
    try { [c, ws] = await welcomed({ minBackoff: 150, maxBackoff: 150 }); } finally { Math.random = random; }
    ws.shut(1006);
    globalThis.dispatchEvent(new Event("online"));
    const ws2 = sockets.at(-1);
    ws2.open();
    ws2.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    await until(() => sockets.length > 2, 1000);
    results.onlineEndsWait = sockets.length === 2 && c.ws === ws2 && c.state === "connected"
      ? "ok" : sockets.length + " dials (want 2), state " + c.state + (c.ws === ws2 ? "" : ", the socket made on online replaced");
    c.close();
  }

  // A subscribe the server could not make (error unavailable: Redis out
  // of reach) is retried by a reconnect: the subscription's onError hears
  // it, the client closes the socket (1000), and the next connection
  // resumes every channel. An unavailable error of no subscription
  // closes nothing.
  {
    const wrong = [];
    const [c, ws] = await welcomed();
    const closed = [];
    ws.close = (code) => { closed.push(code); ws.readyState = 3; };
    const errs = [];
    const a = c.subscribe("a", {});
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: a.ref });
    ws.recv({ type: "message", channel: "a", id: "2-0", ts: 1, data: 2 });
    ws.recv({ type: "error", code: "unavailable", message: "m" });
    if (closed.length) wrong.push("an unavailable error of no subscription closed the socket");
    const b = c.subscribe("b", { onError: (e) => errs.push(e.code) });
    ws.recv({ type: "error", code: "unavailable", message: "m", ref: b.ref });
    if (closed.join() !== "1000" || errs.join() !== "unavailable") wrong.push("unavailable: closes [" + closed + "], onError [" + errs + "]");
    ws.shut(1000);
    await until(() => sockets.length > 1, 2000);
    const ws2 = sockets.at(-1);
    ws2.open();
    ws2.recv({ type: "welcome", connection_id: "c2", instance: "i" });
    const resumed = ws2.sent.filter((f) => f.type === "subscribe").map((f) => f.channel + (f.after ? "@" + f.after : "")).join(" ");
    if (sockets.length !== 2 || resumed !== "a@2-0 b") wrong.push(sockets.length + " dials, then subscribed [" + resumed + "]");
    c.close();
    // The late unavailable of a subscription already unsubscribed closes
    // nothing either: it reaches the client's "error" listeners, not the
    // handler of a subscription the application gave up.
    const [c3, ws3] = await welcomed();
    const closed3 = [], errs3 = [];
    ws3.close = (code) => { closed3.push(code); ws3.readyState = 3; };
    c3.on("error", (e) => errs3.push("client " + e.code));
    const gone = c3.subscribe("g", { onError: (e) => errs3.push("subscription " + e.code) });
    gone.unsubscribe();
    ws3.recv({ type: "error", code: "unavailable", message: "m", ref: gone.ref });
    if (closed3.length || errs3.join() !== "client unavailable") wrong.push("unavailable for a subscription unsubscribed: closes [" + closed3 + "], errors [" + errs3 + "]");
    c3.close();
    // A server that never answers the close: the socket is cut after
    // 5 s (as the Go client's closeWait), not left to the browser.
    const [c4, ws4] = await welcomed();
    const closed4 = [], states4 = [];
    ws4.close = (code) => { closed4.push(code); ws4.readyState = 2; };
    c4.on("state", (s, d) => states4.push(s + (d?.reason ? " (" + d.reason + ")" : "")));
    const u = c4.subscribe("u", { onError: () => {} });
    ws4.recv({ type: "error", code: "unavailable", message: "m", ref: u.ref });
    await new Promise((r) => setTimeout(r, 1000));
    if (sockets.length !== 1) wrong.push("unanswered close: cut within 1 s");
    await until(() => sockets.length > 1, 8000);
    if (sockets.length !== 2 || states4[0] !== "disconnected (close not answered)") wrong.push("unanswered close: " + sockets.length + " dials, states [" + states4 + "], closes [" + closed4 + "]");
    c4.close();
    results.subscribeUnavailable = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The 5 s wait for an unanswered close is one per socket, however many
  // unavailables come, and ends with the client's close() or the socket's
  // end: a closed client holds no timer (Node would wait for it).
  {
    const wrong = [];
    const realSetTimeout = globalThis.setTimeout, realClearTimeout = globalThis.clearTimeout;
    const waits = new Set(), cleared = new Set();
    globalThis.setTimeout = function (fn, ms, ...rest) {
      const id = realSetTimeout.call(this, fn, ms, ...rest);
      if (ms === 5000) waits.add(id);
      return id;
    };
    globalThis.clearTimeout = function (id) { if (waits.has(id)) cleared.add(id); return realClearTimeout.call(this, id); };
    try {
      for (const end of ["close", "shut"]) {
        waits.clear(); cleared.clear();
        const [c, ws] = await welcomed();
        ws.close = () => { ws.readyState = 2; };
        const u = c.subscribe("u", { onError: () => {} });
        for (let i = 0; i < 3; i++) ws.recv({ type: "error", code: "unavailable", message: "m", ref: u.ref });
        if (waits.size !== 1) wrong.push(end + ": " + waits.size + " waits for 3 unavailables, want 1");
        if (end === "close") c.close(); else ws.shut(1006);
        if (cleared.size !== waits.size) wrong.push(end + ": " + cleared.size + " of " + waits.size + " waits cleared");
        c.close();
      }
    } finally {
      globalThis.setTimeout = realSetTimeout;
      globalThis.clearTimeout = realClearTimeout;
    }
    results.closeClearsTimers = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The probe waits for the silence the docs give: activityTimeout, and
  // at least idle_timeout_ms + 5 s when the welcome has it (the server's
  // 4000 must come first), timed from the last frame. Read off the delay
  // the client asks its silence timer for, so no test waits that long.
  {
    const wrong = [];
    const realSetTimeout = globalThis.setTimeout;
    for (const [opts, idle, want] of [[{ activityTimeout: 20 }, 100, 5100], [{ activityTimeout: 8000 }, 100, 8000], [{ activityTimeout: 8000 }, undefined, 8000]]) {
      const delays = [];
      let c, ws;
      globalThis.setTimeout = function (fn, ms, ...rest) {
        if (new Error().stack.includes(".watch")) delays.push(ms);
        return realSetTimeout.call(this, fn, ms, ...rest);
      };
      try {
        sockets.length = 0;
        c = newClient(opts);
        await settle();
        ws = sockets[0];
        ws.open();
        delays.length = 0;
        ws.recv({ type: "welcome", connection_id: "c1", instance: "i", idle_timeout_ms: idle });
      } finally {
        globalThis.setTimeout = realSetTimeout;
      }
      const d = delays.at(-1);
      if (!(d > want - 1000 && d <= want)) wrong.push(JSON.stringify(opts) + ", idle_timeout_ms " + idle + ": the probe after " + d + " ms of silence, want " + want);
      c.close();
    }
    results.probeDelay = wrong.length === 0 ? "ok" : wrong.join("; ");
  }

  // The silence is timed from the last frame, not from the dial: a
  // connection that keeps receiving is never probed.
  {
    const wait = (ms) => new Promise((r) => setTimeout(r, ms));
    const [c, ws] = await welcomed({ activityTimeout: 800, pongTimeout: 5000 });
    const s = c.subscribe("a", {});
    ws.recv({ type: "subscribed", channel: "a", position: "1-0", ref: s.ref });
    for (let i = 2, by = performance.now() + 1600; performance.now() < by; i++) {
      ws.recv({ type: "message", channel: "a", id: i + "-0", ts: 1, data: i });
      await wait(50);
    }
    const pings = ws.sent.filter((f) => f.type === "ping").length;
    results.busyNotProbed = pings === 0 ? "ok" : pings + " pings on a connection that received a frame every 50 ms (activityTimeout 800)";
    c.close();
  }

  // drop() of the browser's own socket: one close, one reconnect. The
  // socket it let go of still reports its close, which must not count
  // as a second loss (a second reconnect would replace the connection
  // just made, leaving it open).
  {
    const c = new WsRelay("ws://" + location.host + "/ws", { user: "dropper", minBackoff: 10, maxBackoff: 20 });
    const closes = [];
    let welcomes = 0;
    c.on("close", (e) => closes.push(e.code + " " + e.reason));
    c.on("welcome", () => welcomes++);
    await until(() => c.state === "connected", 5000);
    c.drop();
    await until(() => welcomes >= 2, 5000);
    await new Promise((r) => setTimeout(r, 500));
    results.dropRealSocket = welcomes === 2 && closes.join() === "1006 dropped" && c.state === "connected"
      ? "ok" : welcomes + " welcomes, closes [" + closes + "], state " + c.state;
    c.close();
  }

  // publish(): safe retries against a scripted fetch. Every attempt of a
  // call sends the same Idempotency-Key and body; what a retry cannot
  // change is final at once; Retry-After is waited; getToken after a 401.
  {
    const { publish, PublishError } = await import("/client.js");
    const wrong = [];
    const reply = (status, body, headers = {}) => new Response(body == null ? "" : JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
    const scripted = (...steps) => {
      const calls = [];
      const f = async (url, init) => {
        calls.push({ url, init, at: performance.now() });
        const step = steps[Math.min(calls.length, steps.length) - 1];
        if (step === "network") throw new TypeError("Failed to fetch");
        return step();
      };
      return [f, calls];
    };
    const ok = () => reply(202, { id: "7-0", channel: "room" }, { "Idempotent-Replayed": "true" });
    const fail = (status, code, headers) => () => reply(status, { error: { code, message: "m" } }, headers);

    let [f, calls] = scripted(fail(503, "unavailable"), "network", fail(409, "idempotency_in_progress"), ok);
    let res = await publish("http://ingress.test/", "room", { text: "hi" }, { fetch: f, event: "chat", token: "t1", minBackoff: 1, maxBackoff: 2 });
    const keys = new Set(calls.map((c) => c.init.headers["Idempotency-Key"]));
    const bodies = new Set(calls.map((c) => c.init.body));
    if (res.id !== "7-0" || !res.replayed || calls.length !== 4) wrong.push("retries: " + JSON.stringify(res) + " after " + calls.length + " calls");
    if (keys.size !== 1 || [...keys][0].length < 16 || bodies.size !== 1) wrong.push("keys " + [...keys] + ", bodies " + [...bodies]);
    if (calls[0].url !== "http://ingress.test/v1/channels/room/messages" || calls[0].init.headers.Authorization !== "Bearer t1" ||
        JSON.parse(calls[0].init.body).event !== "chat") wrong.push("request " + calls[0].url + " " + JSON.stringify(calls[0].init.headers));

    for (const [status, code, headers] of [[400, "invalid_json"], [403, "forbidden"], [413, "payload_too_large"], [422, "idempotency_key_reused"], [500, "internal"], [429, "rate_limited"], [401, "invalid_token"],
      // Neither delay-seconds nor an HTTP date (Date.parse takes each for
      // a date in 2001): no Retry-After, as in Go, so the 429 is final.
      [429, "rate_limited", { "Retry-After": "-1" }], [429, "rate_limited", { "Retry-After": "1.5" }],
      [429, "rate_limited", { "Retry-After": "Mon 5" }], [429, "rate_limited", { "Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT trailing" }]]) {
      [f, calls] = scripted(fail(status, code, headers), ok);
      try {
        await publish("", "room", 1, { fetch: f, minBackoff: 1 });
        wrong.push(status + " retried");
      } catch (e) {
        if (!(e instanceof PublishError) || e.status !== status || e.code !== code || calls.length !== 1) wrong.push(status + ": " + e + " after " + calls.length + " calls");
      }
    }

    [f, calls] = scripted(fail(429, "rate_limited", { "Retry-After": "1" }), ok);
    res = await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 });
    if (calls.length !== 2 || calls[1].at - calls[0].at < 990) wrong.push("Retry-After: the retry came " + (calls[1]?.at - calls[0].at) + " ms later");
    [f, calls] = scripted(fail(429, "rate_limited", { "Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT" }), ok);
    try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 }); } catch (e) { wrong.push("Retry-After a past date: " + e); }
    if (calls.length !== 2) wrong.push("Retry-After a past date: " + calls.length + " calls");
    // The obsolete forms Go's http.ParseTime also takes: RFC 850 and
    // asctime (no zone: GMT), here a few seconds ahead.
    for (const form of ["rfc850", "asctime"]) {
      const [day, dd, mon, yyyy, clock] = new Date(Date.now() + 3000).toUTCString().replace(",", "").split(" ");
      const full = { Sun: "Sunday", Mon: "Monday", Tue: "Tuesday", Wed: "Wednesday", Thu: "Thursday", Fri: "Friday", Sat: "Saturday" }[day];
      const date = form === "rfc850" ? full + ", " + dd + "-" + mon + "-" + yyyy.slice(2) + " " + clock + " GMT"
        : day + " " + mon + " " + String(Number(dd)).padStart(2, " ") + " " + clock + " " + yyyy;
      [f, calls] = scripted(fail(429, "rate_limited", { "Retry-After": date }), ok);
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 }); } catch (e) { wrong.push("Retry-After " + date + ": " + e); }
      if (calls.length !== 2 || calls[1].at - calls[0].at < 1500) wrong.push("Retry-After " + date + ": retried after " + (calls[1]?.at - calls[0].at) + " ms");
    }

    let tokens = 0;
    [f, calls] = scripted(fail(401, "token_expired"), ok);
    await publish("", "room", 1, { fetch: f, getToken: async () => "fresh" + ++tokens, minBackoff: 1 });
    if (calls.length !== 2 || calls[0].init.headers.Authorization !== "Bearer fresh1" || calls[1].init.headers.Authorization !== "Bearer fresh2") wrong.push("getToken after 401: " + calls.map((c) => c.init.headers.Authorization));
    // An empty token is no token: getToken is asked before the first
    // attempt, as WsRelay asks it, not after a 401 for nothing.
    [f, calls] = scripted(ok);
    await publish("", "room", 1, { fetch: f, token: "", getToken: async () => "given" });
    if (calls.length !== 1 || calls[0].init.headers.Authorization !== "Bearer given") wrong.push("empty token with getToken: " + calls.map((c) => c.init.headers.Authorization));

    // A getToken that fails after a 401 ends the call with the 401 (its
    // error as cause); no attempt with the refused token follows. An
    // earlier attempt that got no answer leaves the outcome unknown.
    for (const [name, steps, unknown] of [["", [fail(401, "token_expired"), ok], false], [" after no answer", ["network", fail(401, "token_expired"), ok], true]]) {
      let asked = 0;
      [f, calls] = scripted(...steps);
      try {
        await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, getToken: async () => { if (asked++) throw new TypeError("Failed to fetch"); return "t"; } });
        wrong.push("getToken failing after 401" + name + ": resolved");
      } catch (e) {
        if (!(e instanceof PublishError) || e.status !== 401 || e.outcomeUnknown !== unknown || e.cause?.message !== "Failed to fetch" || calls.length !== steps.length - 1) {
          wrong.push("getToken failing after 401" + name + ": " + e + " (outcomeUnknown " + e.outcomeUnknown + ", cause " + e.cause + ") after " + calls.length + " calls");
        }
      }
    }
    // A token that cannot go in a header (fetch would refuse each attempt
    // with a TypeError, as if the network had failed) is refused before
    // any request, as Go's publisher.New refuses it.
    for (const o of [{ token: "a b" }, { token: "t\u00f6k" }, { getToken: async () => "a\nb" }, { token: 42 }]) {
      [f, calls] = scripted(ok);
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, ...o }); wrong.push("token " + JSON.stringify(o) + ": resolved"); }
      catch (e) { if (!(e instanceof TypeError) || calls.length !== 0) wrong.push("token " + JSON.stringify(o) + ": " + e + " after " + calls.length + " calls"); }
    }

    [f, calls] = scripted(fail(503, "unavailable"));
    try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, maxAttempts: 3 }); wrong.push("503 for ever: resolved"); }
    catch (e) { if (e.status !== 503 || !e.outcomeUnknown || calls.length !== 3) wrong.push("503 for ever: " + e + " (outcomeUnknown " + e.outcomeUnknown + ") after " + calls.length + " calls"); }

    // outcomeUnknown, as Go's ErrOutcomeUnknown: set once an attempt may
    // have written the message, whatever later ones answered. No answer
    // at all is a PublishError too ("network", fetch's error as cause),
    // so that a TypeError always means bad input.
    for (const [name, steps, status, code, unknown] of [
      ["network for ever", ["network"], 0, "network", true],
      ["network, then 429 without Retry-After", ["network", fail(429, "rate_limited")], 429, "rate_limited", true],
      ["409 in progress, then 400", [fail(409, "idempotency_in_progress"), fail(400, "invalid_json")], 400, "invalid_json", true],
      ["2xx without an id", [() => reply(200, { ok: true })], 200, "", true],
      ["400", [fail(400, "invalid_json")], 400, "invalid_json", false],
      ["429 twice, then 403", [fail(429, "rate_limited", { "Retry-After": "0" }), fail(429, "rate_limited", { "Retry-After": "0" }), fail(403, "forbidden")], 403, "forbidden", false],
    ]) {
      [f, calls] = scripted(...steps);
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, maxAttempts: 3 }); wrong.push(name + ": resolved"); }
      catch (e) {
        if (!(e instanceof PublishError) || e.status !== status || e.code !== code || e.outcomeUnknown !== unknown) {
          wrong.push(name + ": " + e + " (" + e?.name + ", outcomeUnknown " + e?.outcomeUnknown + ")");
        } else if (code === "network" && !(e.cause instanceof TypeError && e.cause.message === "Failed to fetch")) {
          wrong.push(name + ": cause " + e.cause);
        }
      }
    }

    const ac = new AbortController();
    [f, calls] = scripted(fail(503, "unavailable", { "Retry-After": "30" }), ok);
    const t0 = performance.now();
    setTimeout(() => ac.abort(new Error("gave up")), 50);
    try { await publish("", "room", 1, { fetch: f, signal: ac.signal }); wrong.push("abort: resolved"); }
    catch (e) { if (e.message !== "gave up" || performance.now() - t0 > 5000) wrong.push("abort: " + e + " after " + (performance.now() - t0) + " ms"); }

    [f, calls] = scripted(ok);
    for (const [ch, data, opts] of [["a/b", 1, {}], [".a", 1, {}], ["room", null, {}], ["room", undefined, {}], ["room", 1, { event: 'a"b' }], ["room", 1, { idempotencyKey: "" }], ["room", 1, { idempotencyKey: " k" }]]) {
      try { await publish("", ch, data, { fetch: f, ...opts }); wrong.push(ch + " " + data + " " + JSON.stringify(opts) + " accepted"); }
      catch (e) { if (!(e instanceof TypeError)) wrong.push(ch + ": " + e); }
    }
    if (calls.length) wrong.push(calls.length + " requests for bad input");
    [f, calls] = scripted(ok);
    await publish("", "room", 1, { fetch: f, idempotencyKey: "order-42" });
    if (calls[0].init.headers["Idempotency-Key"] !== "order-42" || "Authorization" in calls[0].init.headers) wrong.push("own key: " + JSON.stringify(calls[0].init.headers));

    // Data that is falsy but not null is a message (the ingress takes any
    // JSON but null); data that JSON makes null or drops is refused before
    // any request, as Go's publisher refuses Data that marshals to null.
    for (const data of [0, false, ""]) {
      [f, calls] = scripted(ok);
      try { await publish("", "room", data, { fetch: f }); if (calls.length !== 1 || calls[0].init.body !== JSON.stringify({ data })) wrong.push("data " + JSON.stringify(data) + ": sent " + calls.map((c) => c.init.body)); }
      catch (e) { wrong.push("data " + JSON.stringify(data) + ": " + e); }
    }
    [f, calls] = scripted(ok);
    for (const data of [NaN, () => 1, { toJSON: () => null }]) {
      try { await publish("", "room", data, { fetch: f }); wrong.push("data " + String(data) + " accepted"); }
      catch (e) { if (!(e instanceof TypeError)) wrong.push("data " + String(data) + ": " + e); }
    }
    if (calls.length) wrong.push(calls.length + " requests for data that is null in JSON: " + calls.map((c) => c.init.body));

    // A 202 whose body is cut (the connection lost mid-answer) was
    // written: the call retries with its key and gets the replay, rather
    // than rejecting with a PublishError for a 2xx.
    const cut = (status, headers) => () => new Response(new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode('{"id"')); c.error(new TypeError("network error")); } }), { status, headers });
    [f, calls] = scripted(cut(202), ok);
    try {
      res = await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 });
      if (res.id !== "7-0" || !res.replayed || calls.length !== 2 || calls[0].init.headers["Idempotency-Key"] !== calls[1].init.headers["Idempotency-Key"]) wrong.push("cut 202: " + JSON.stringify(res) + " after " + calls.length + " calls");
    } catch (e) { wrong.push("cut 202: " + e + " after " + calls.length + " calls"); }

    // So is a 2xx whose JSON the body itself ends early (an answer
    // delimited by the connection's close, cut by it: fetch takes it for
    // whole) or that has no body, as Go's publisher retries it; when the
    // attempts run out it is a "network" error, outcome unknown.
    for (const body of ['{"id":"7-0","chan', "", " \n"]) {
      [f, calls] = scripted(() => new Response(body, { status: 202 }), ok);
      try {
        res = await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 });
        if (res.id !== "7-0" || calls.length !== 2 || calls[0].init.headers["Idempotency-Key"] !== calls[1].init.headers["Idempotency-Key"]) wrong.push("202 body " + JSON.stringify(body) + ": " + JSON.stringify(res) + " after " + calls.length + " calls");
      } catch (e) { wrong.push("202 body " + JSON.stringify(body) + ": " + e + " after " + calls.length + " calls"); }
    }
    [f, calls] = scripted(() => new Response("", { status: 200 }));
    try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, maxAttempts: 2 }); wrong.push("200 without a body for ever: resolved"); }
    catch (e) { if (!(e instanceof PublishError) || e.code !== "network" || !e.outcomeUnknown || calls.length !== 2) wrong.push("200 without a body for ever: " + e + " (outcomeUnknown " + e.outcomeUnknown + ") after " + calls.length + " calls"); }

    // An abort while an answer's body is read (fetch rejects that read
    // with the signal's reason) ends the call at once, not after the
    // answer's Retry-After.
    {
      const ac2 = new AbortController();
      const hanging = async (url, init) => {
        calls.push({ url, init });
        return new Response(new ReadableStream({ start(c) { init.signal.addEventListener("abort", () => c.error(init.signal.reason)); } }), { status: 503, headers: { "Retry-After": "5" } });
      };
      calls = [];
      const t1 = performance.now();
      setTimeout(() => ac2.abort(new Error("gave up")), 50);
      try { await publish("", "room", 1, { fetch: hanging, signal: ac2.signal }); wrong.push("abort during body: resolved"); }
      catch (e) { if (e.message !== "gave up" || performance.now() - t1 > 2000) wrong.push("abort during body: " + e + " after " + Math.round(performance.now() - t1) + " ms"); }
    }
    // An abort during getToken after a 401 ends the call before the wait.
    {
      const ac3 = new AbortController();
      [f, calls] = scripted(fail(401, "token_expired", { "Retry-After": "5" }), ok);
      let asked = 0;
      const t1 = performance.now();
      try { await publish("", "room", 1, { fetch: f, signal: ac3.signal, getToken: async () => { if (asked++) ac3.abort(new Error("left the page")); return "t"; } }); wrong.push("abort during getToken: resolved"); }
      catch (e) { if (e.message !== "left the page" || performance.now() - t1 > 2000 || calls.length !== 1) wrong.push("abort during getToken: " + e + " after " + Math.round(performance.now() - t1) + " ms, " + calls.length + " calls"); }
    }
    // A getToken that never settles (a token endpoint that never
    // answers), first or after a 401: an abort ends the call at once with
    // the signal's reason, and timeout bounds the wait as it bounds an
    // attempt. Timed out first, it ends the call as getToken's own error
    // would, before any request; after a 401, with the 401 (the timeout
    // as cause). An aborted signal asks no token at all.
    {
      const within = (p) => Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error("no end within 1 s")), 1000))]);
      const never = () => new Promise(() => {});
      for (const [name, steps, asked] of [["first", [ok], 0], ["after a 401", [fail(401, "token_expired"), ok], 1]]) {
        let n = 0;
        const getToken = () => n++ < asked ? Promise.resolve("t") : never();
        const ac = new AbortController();
        [f, calls] = scripted(...steps);
        setTimeout(() => ac.abort(new Error("left the page")), 50);
        try { await within(publish("", "room", 1, { fetch: f, signal: ac.signal, getToken, minBackoff: 1, maxBackoff: 2 })); wrong.push("abort during a hanging getToken " + name + ": resolved"); }
        catch (e) { if (e.message !== "left the page" || calls.length !== asked) wrong.push("abort during a hanging getToken " + name + ": " + e + " after " + calls.length + " calls"); }

        n = 0;
        [f, calls] = scripted(...steps);
        try { await within(publish("", "room", 1, { fetch: f, getToken, timeout: 100, minBackoff: 1, maxBackoff: 2 })); wrong.push("hanging getToken " + name + ": resolved"); }
        catch (e) {
          const timedOut = (x) => x instanceof Error && !(x instanceof TypeError) && !(x instanceof PublishError) && /getToken has not settled within timeout \(100 ms\)/.test(x.message);
          const good = asked ? e instanceof PublishError && e.status === 401 && !e.outcomeUnknown && timedOut(e.cause) : timedOut(e);
          if (!good || calls.length !== asked) wrong.push("hanging getToken " + name + ": " + e + " (cause " + e?.cause + ") after " + calls.length + " calls");
        }
      }
      let asked = 0;
      [f, calls] = scripted(ok);
      try { await within(publish("", "room", 1, { fetch: f, signal: AbortSignal.abort(new Error("gone")), getToken: async () => { asked++; return "t"; } })); wrong.push("aborted before: resolved"); }
      catch (e) { if (e.message !== "gone" || asked || calls.length) wrong.push("aborted before: " + e + " after " + asked + " getToken calls, " + calls.length + " requests"); }
    }

    // An attempt without an answer (a path that died with the request
    // out: the headers, or the body, never come) is given up after
    // timeout, as Go's HTTPClient.Timeout ends one, and retried with the
    // key; the outcome is unknown if the attempts run out so.
    {
      const calls = [];
      const stalled = async (url, init) => {
        calls.push(init);
        const stall = (reject) => init.signal?.addEventListener("abort", () => reject(init.signal.reason));
        if (calls.length === 1) return new Promise((_, reject) => stall(reject));
        if (calls.length === 2) return new Response(new ReadableStream({ start(c) { stall((e) => c.error(e)); } }), { status: 202 });
        return ok();
      };
      const within = (p) => Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error("no end within 1 s")), 1000))]);
      const t1 = performance.now();
      try {
        const r = await within(publish("", "room", 1, { fetch: stalled, timeout: 100, minBackoff: 1, maxBackoff: 2 }));
        const keys = new Set(calls.map((c) => c.headers["Idempotency-Key"]));
        if (r.id !== "7-0" || calls.length !== 3 || keys.size !== 1) wrong.push("stalled attempts: " + JSON.stringify(r) + " after " + calls.length + " calls, " + Math.round(performance.now() - t1) + " ms");
      } catch (e) { wrong.push("stalled attempts: " + e + " after " + calls.length + " calls"); }
      calls.length = 0;
      try { await within(publish("", "room", 1, { fetch: stalled, timeout: 50, maxAttempts: 2, minBackoff: 1, maxBackoff: 2 })); wrong.push("stalled for ever: resolved"); }
      catch (e) { if (!(e instanceof PublishError) || e.code !== "network" || !e.outcomeUnknown || calls.length !== 2) wrong.push("stalled for ever: " + e + " (outcomeUnknown " + e.outcomeUnknown + ") after " + calls.length + " calls"); }
      for (const timeout of ["5", -1, NaN]) {
        calls.length = 0;
        try { await within(publish("", "room", 1, { fetch: stalled, timeout })); wrong.push("timeout " + timeout + ": resolved"); }
        catch (e) { if (!(e instanceof TypeError) || calls.length !== 0) wrong.push("timeout " + timeout + ": " + e + " after " + calls.length + " calls"); }
      }
    }

    // maxAttempts is a count: 0 means the default (4), as in Go; one that
    // is not a whole number ≥ 1 is refused instead of retrying for ever.
    [f, calls] = scripted(...Array(10).fill(fail(503, "unavailable")), fail(400, "stop"));
    try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, maxAttempts: 0 }); wrong.push("maxAttempts 0: resolved"); }
    catch (e) { if (e.status !== 503 || calls.length !== 4) wrong.push("maxAttempts 0: " + e + " after " + calls.length + " calls"); }
    for (const maxAttempts of [NaN, Infinity, -1, 1.5, "3"]) {
      [f, calls] = scripted(...Array(10).fill(fail(503, "unavailable")), fail(400, "stop"));
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, maxAttempts }); wrong.push("maxAttempts " + maxAttempts + ": resolved"); }
      catch (e) { if (!(e instanceof TypeError) || calls.length !== 0) wrong.push("maxAttempts " + maxAttempts + ": " + e + " after " + calls.length + " calls"); }
    }
    // A backoff that is not a number of ms from 0 up, or a from that is
    // not a user id, is refused before any request (a 0 ms backoff would
    // retry in a tight loop; the ingress refuses the from with 400).
    for (const [name, o] of [["minBackoff -1", { minBackoff: -1 }], ["maxBackoff '5'", { maxBackoff: "5" }], ["minBackoff NaN", { minBackoff: NaN }], ["from", { from: "bad user" }], ["from ..", { from: ".." }]]) {
      [f, calls] = scripted(fail(400, "stop"));
      try { await publish("", "room", 1, { fetch: f, ...o }); wrong.push(name + ": resolved"); }
      catch (e) { if (!(e instanceof TypeError) || calls.length !== 0) wrong.push(name + ": " + e + " after " + calls.length + " calls"); }
    }
    // A backoff longer than a browser timer can hold (2³¹−1 ms, 24.8
    // days) is not wrapped round into an immediate retry. (The jitter is
    // pinned near its top, so that the wait is over 24.8 days.)
    {
      [f, calls] = scripted(fail(503, "unavailable"), ok);
      const ac = new AbortController();
      const random = Math.random;
      Math.random = () => 0.99;
      const day = 86400e3;
      const p = publish("", "room", 1, { fetch: f, signal: ac.signal, minBackoff: 30 * day, maxBackoff: 30 * day }).catch((e) => e);
      await new Promise((r) => setTimeout(r, 200));
      Math.random = random;
      if (calls.length !== 1) wrong.push("a 30-day backoff: " + calls.length + " calls within 200 ms");
      ac.abort(new Error("done"));
      await p;
    }
    // A 30-day timeout does not give up an attempt, or getToken(), at
    // once: both answer after 50–100 ms here, in time.
    {
      const calls = [];
      const slow = async (url, init) => { calls.push(init); await new Promise((r) => setTimeout(r, 100)); init.signal.throwIfAborted(); return ok(); };
      const getToken = () => new Promise((r) => setTimeout(() => r("t"), 50));
      try {
        const r = await publish("", "room", 1, { fetch: slow, getToken, timeout: 30 * 86400e3, minBackoff: 1, maxBackoff: 2 });
        if (r.id !== "7-0" || calls.length !== 1) wrong.push("a 30-day timeout: " + JSON.stringify(r) + " after " + calls.length + " calls");
      } catch (e) { wrong.push("a 30-day timeout: " + e + " after " + calls.length + " calls"); }
    }
    // A redirect (an http:// URL behind an https:// redirect, say) is not
    // followed: a 303 would have turned the publish into a GET of the
    // history, a 307 sent it elsewhere. Final at once.
    {
      const calls = [];
      const redirecting = async (url, init) => {
        calls.push(init);
        if (init.redirect === "manual") return { type: "opaqueredirect", status: 0, ok: false, headers: new Headers(), text: async () => "" };
        return reply(200, { messages: [] }); // followed as a GET
      };
      try { await publish("", "room", 1, { fetch: redirecting, minBackoff: 1 }); wrong.push("redirect: resolved"); }
      catch (e) { if (!(e instanceof PublishError) || e.code !== "redirect" || calls.length !== 1) wrong.push("redirect: " + e + " after " + calls.length + " calls"); }
    }
    // 502 and 504 (a gateway's answers) are retried as 503 is; a 5xx
    // leaves the outcome unknown, a final 500 included.
    for (const status of [502, 504]) {
      [f, calls] = scripted(fail(status, "gateway"), ok);
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 }); if (calls.length !== 2) wrong.push(status + ": " + calls.length + " calls"); }
      catch (e) { wrong.push(status + " not retried: " + e + " after " + calls.length + " calls"); }
    }
    [f, calls] = scripted(fail(500, "internal"), ok);
    try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2 }); wrong.push("500: resolved"); }
    catch (e) { if (e.status !== 500 || !e.outcomeUnknown || calls.length !== 1) wrong.push("500: " + e + " (outcomeUnknown " + e.outcomeUnknown + ") after " + calls.length + " calls"); }
    // A Retry-After beyond 60 s is held to 60 s, a date past to 0.
    for (const [v, want] of [["3600", 60000], [new Date(Date.now() + 3600e3).toUTCString(), 60000], ["Sun, 06 Nov 1994 08:49:37 GMT", 0]]) {
      [f, calls] = scripted(fail(503, "unavailable", { "Retry-After": v }));
      try { await publish("", "room", 1, { fetch: f, maxAttempts: 1 }); wrong.push("Retry-After " + v + ": resolved"); }
      catch (e) { if (e.retryAfter !== want) wrong.push("Retry-After " + v + ": retryAfter " + e.retryAfter + " ms, want " + want); }
    }
    // A token from getToken after a 401 that cannot go in a header ends
    // the call with the 401 (a TypeError as cause), as a failing getToken.
    {
      let asked = 0;
      [f, calls] = scripted(fail(401, "token_expired"), ok);
      try { await publish("", "room", 1, { fetch: f, minBackoff: 1, maxBackoff: 2, getToken: async () => asked++ ? "a b" : "t" }); wrong.push("unsendable token after 401: resolved"); }
      catch (e) { if (!(e instanceof PublishError) || e.status !== 401 || !(e.cause instanceof TypeError) || calls.length !== 1) wrong.push("unsendable token after 401: " + e + " (cause " + e.cause + ") after " + calls.length + " calls"); }
    }
    // An abort while the last attempt's body is read rejects with the
    // signal's reason too, not as a network error.
    {
      const ac4 = new AbortController();
      const hanging = async (url, init) => new Response(new ReadableStream({ start(c) { init.signal.addEventListener("abort", () => c.error(init.signal.reason)); } }), { status: 503 });
      setTimeout(() => ac4.abort(new Error("gave up")), 50);
      try { await publish("", "room", 1, { fetch: hanging, signal: ac4.signal, maxAttempts: 1 }); wrong.push("abort during the last body: resolved"); }
      catch (e) { if (e.message !== "gave up") wrong.push("abort during the last body: " + e); }
    }
    results.publish = wrong.length === 0 ? "ok" : wrong.join("; ");
  }
  return results;
})()`

// TestBrowserClientJS runs clientJSCases in headless Chromium, the client
// loaded from a real egress as an application would load it.
func TestBrowserClientJS(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	eg := start(t, "egress", e)
	tab := newBrowser(t)
	runIn(t, tab, "open the demo page", chromedp.Navigate(eg.URL+"/"))
	// The cases run one after the other: 15 s in all beside a load of 3
	// (about 19 s since the cases of the JS mutation review, 5 s more
	// since the unanswered close's),
	// 7 of them the publish case's real Retry-After waits (1 s, then two
	// HTTP dates 2–3 s ahead). It ran in a budget of 20 s. This one is
	// for a case that never ends, not a measure of speed.
	began := time.Now()
	results := evalWithin(t, tab, "client cases", 2*time.Minute, chromedp.Evaluate[map[string]string](clientJSCases, chromedp.EvalAwaitPromise))
	t.Logf("the client cases took %v", time.Since(began).Round(time.Millisecond))
	for _, name := range []string{"resubscribe", "subscribeBeforeWelcome", "resubscribeBatched", "resubscribeOlderServer", "resubscribeSmallFrames", "final1007", "tokenAfterRefusal", "dropBeforeWelcome", "nothingAfterClose", "unrecoveredPosition", "validation", "emptyAfter", "closeFromListener", "closeMidDispatch", "timeOptions", "silenceProbe", "connectTimeout", "expiredStaticToken", "networkEvents", "longTimers", "unsubscribeRefused", "subscribeAfterClose", "closeDuringGetToken", "getTokenTimeout", "urlQuery", "hostileMessages", "hostileSubscribed", "hostileFrames", "maxFrameBytes", "closeCodes", "noStorm", "throwingListeners", "stateReentrancy", "dropFromListener", "staleWelcome", "gapUnsubscribe", "badToken", "listenerChanges", "clockStep", "urlFragment", "staleSubscribed", "resumeAnswered", "backoffBounds", "onlineEndsWait", "subscribeUnavailable", "closeClearsTimers", "probeDelay", "busyNotProbed", "dropRealSocket", "publish", "stableFromWelcome"} {
		if got, ok := results[name]; !ok || got != "ok" {
			t.Errorf("%s: %q", name, got)
		}
	}
}
