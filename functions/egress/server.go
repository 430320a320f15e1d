package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/origin"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// Server is the egress: the WebSocket endpoint, the hub, and the loops
// that keep the registry fresh and sockets alive.
type Server struct {
	cfg      Config
	log      *slog.Logger
	rdb      redis.UniversalClient
	hub      *hub
	reg      *registry.Registry
	regPut   *registry.Batcher // new connections' records (openConn), in shared pipelines
	metrics  *metrics
	instance string
	upgrader websocket.Upgrader
	mux      *http.ServeMux
	sec      *security // token checks (auth.go)
	ready    *redisconn.Readiness
	// regFail logs failed registry writes once per outage, not once per
	// socket that subscribes or ends meanwhile.
	regFail *logging.Episode
	// regOOM is regFail for writes Redis refused because it is at its
	// maxmemory: an episode of its own, at error level, since it lasts
	// until memory is freed or an operator acts. Only a write that may
	// grow memory (a put, a join, a refresh) ends it: removals succeed
	// out of memory too.
	regOOM *logging.Episode
	// regLost logs the probe finding the instance's registry records gone
	// from Redis (recordsLost) once while it keeps finding them gone: a
	// Redis that evicts them takes them again after every rewrite.
	regLost *logging.Episode

	refreshBatch int // connections per registry refresh pipeline

	// epoch is when the server was made; clock counts from it, on the
	// monotonic clock.
	epoch time.Time

	// stalled is the time, in ns, the process did not run, summed over
	// the stalls sweepConns found (noteSweep); conn.regStalled is its
	// value at the connection's last registry write.
	stalled atomic.Int64
	// sweptAt is when sweepConns last ran, on s.clock: a sweep that comes
	// much later than its period finds a process that did not run
	// meanwhile, and a refresh that runs before the sweep after a stall
	// counts it too (pendingStall).
	sweptAt atomic.Int64
	// stallMu makes a stall's move from pendingStall into stalled one
	// step for stallAt: read between the two, it was counted twice, or
	// not at all.
	stallMu sync.Mutex

	// lingerMax bounds how long a socket's close waits for its client
	// (conn.linger); the default is lingerMax.
	lingerMax time.Duration

	open     atomic.Int64
	draining atomic.Bool
	drainMu  sync.Mutex     // orders wg.Add (new sockets) before drain's Wait
	wg       sync.WaitGroup // connection handlers
}

// NewServer builds an egress bound to rdb; Run starts its loops.
func NewServer(cfg Config, log *slog.Logger, rdb redis.UniversalClient) *Server {
	ks := keys.Scheme{Prefix: cfg.Redis.KeyPrefix}
	instance := cfg.InstanceID
	if instance == "" {
		instance = randomID(9)
	}
	s := &Server{
		epoch:    time.Now(),
		cfg:      cfg,
		log:      log.With("instance", instance),
		rdb:      rdb,
		reg:      registry.New(rdb, ks, cfg.RegistryTTL),
		ready:    redisconn.NewReadiness(rdb, 500*time.Millisecond),
		instance: instance,

		refreshBatch: 256,
		lingerMax:    lingerMax,
	}
	// A reconnect storm's handshakes share pipelines instead of queueing
	// one each for the pool: as the ingress's publishes, 4 at once, each
	// of up to 256 records (a refresh's batch) within REDIS_TIMEOUT.
	s.regPut = registry.NewBatcher(s.reg, cfg.Redis.Timeout, 4, 256)
	s.sec = newSecurity(cfg, s.log)
	s.regFail = &logging.Episode{Log: s.log, Msg: "registry write failed", Back: "registry writes back",
		Then: "sends to this instance's connections may be refused (new sockets are closed with 1013) or reach ended ones until Redis answers; records left behind expire within REGISTRY_TTL; logged again every 30s while it lasts and once when writes succeed again"}
	s.regOOM = &logging.Episode{Log: s.log, Msg: "redis out of memory", Back: "redis accepts writes again", Error: true,
		Then: "Redis is at its maxmemory and refuses writes: new sockets are closed with 1013, open ones stay and keep receiving, but their registry records are not refreshed and expire within REGISTRY_TTL (sends to them find nobody until a refresh after memory is freed writes them back); free memory or raise maxmemory (docs/deployment.md); logged again every 30s while it lasts and once when a registry write succeeds again"}
	s.regLost = &logging.Episode{Log: s.log, Msg: "registry records missing in redis, rewriting them", Back: "registry records kept in redis again", Quiet: recordsLostQuiet,
		Then: "Redis lost them while it answered (FLUSHALL, a restart without persistence) or evicts them (maxmemory with a policy other than noeviction: use noeviction, docs/deployment.md); each time the probe finds them gone they are written again at once, and sends to this instance's connections may find nobody until then; logged again every 30s while losses go on and once when none has come for 5m"}
	s.hub = newHub(s.log, rdb, ks, instance, cfg.SendQueue)
	s.hub.readTimeout = 2 * cfg.Redis.Timeout
	rdb.AddHook(redisHook{h: s.hub})
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		// The readiness pings go to each master's own client, outside
		// the cluster client's hooks (redisconn.MasterPing).
		cc.OnNewNode(func(n *redis.Client) { n.AddHook(redisHook{h: s.hub, node: true}) })
	}
	redisconn.AddLoginHook(rdb, s.hub.loginRefused.OK)
	s.metrics = newMetrics(s.hub)
	s.upgrader = websocket.Upgrader{
		// The upgrader's reader is never used after the handshake (the
		// frameReader reads the socket): the smallest it allocates.
		ReadBufferSize:   1,
		WriteBufferSize:  1024,
		WriteBufferPool:  &sync.Pool{},
		HandshakeTimeout: 10 * time.Second,
		CheckOrigin:      s.checkOrigin,
		Error: func(w http.ResponseWriter, r *http.Request, status int, reason error) {
			code := "bad_handshake" // not a WebSocket upgrade request
			switch status {
			case http.StatusForbidden:
				code = "origin_not_allowed" // gorilla's only 403: CheckOrigin refused
			case http.StatusMethodNotAllowed:
				// A HEAD with the upgrade headers (the mux sends every
				// other method elsewhere): HEAD /ws is answered as
				// documented, and a HEAD cannot upgrade, which is a bad
				// handshake, not a 405 (that would owe an Allow
				// naming HEAD).
				status = http.StatusBadRequest
			}
			// RFC 6455 §4.4: a client of another version is told the
			// one the server speaks (gorilla's default answer does
			// this; a custom Error must).
			w.Header().Set("Sec-WebSocket-Version", "13")
			s.refuseUpgrade(w, status, code, reason.Error())
		},
	}
	s.mux = http.NewServeMux()
	s.routes()
	return s
}

func (s *Server) routes() {
	s.mux.HandleFunc("GET /ws", s.handleWS)
	s.mux.HandleFunc("GET /healthz", s.handleHealthz)
	s.mux.HandleFunc("GET /readyz", s.handleReadyz)
	// The browser client and the demo page are built on their first
	// request, not at start: an instance that only serves sockets never
	// reads them (docs/benchmarks.md, S6).
	clientJS := sync.OnceValue(handleClientJS)
	demo := sync.OnceValue(func() http.Handler { return handleDemo(s.cfg, clientJS()) })
	s.mux.Handle("GET /client.js", lazyHandler(func() http.Handler { return clientJS() }))
	s.mux.Handle("GET /{$}", lazyHandler(demo))
	metrics := s.metrics.handler()
	s.mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		if !s.sec.metrics.Allows(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="metrics"`)
			writeHTTPError(w, http.StatusUnauthorized, "unauthorized", "/metrics needs METRICS_TOKEN as a bearer token")
			return
		}
		metrics(w, r)
	})
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// Every endpoint is GET (HEAD too): another method on one of
		// them lands here, and is a 405, as on the ingress.
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			get := r.Clone(r.Context())
			get.Method = http.MethodGet
			if _, pattern := s.mux.Handler(get); pattern != "/" {
				w.Header().Set("Allow", "GET, HEAD")
				writeHTTPError(w, http.StatusMethodNotAllowed, "method_not_allowed", "method not allowed on this endpoint")
				return
			}
		}
		writeHTTPError(w, http.StatusNotFound, "not_found", "no such endpoint; see docs/protocol.md")
	})
}

// ServeHTTP serves the routes. Every answer but /client.js's and the demo
// page's (which set their own caching, revalidated by ETag) is live:
// health, readiness, metrics, a refused upgrade. No-store keeps them out
// of caches, a browser's or a shared one (a CDN, a proxy), as the
// ingress's answers are: without it a GET's 200 is cacheable by
// heuristic (RFC 9111 §4.2.2), and a cache in front of the egress could
// answer a probe with a stale /readyz or a scrape with an old /metrics.
//
// A path not in clean form (//ws, /./ws, /x/../ws, /ws/) is 404 whatever
// the method, as on the ingress: ServeMux would answer it with a 307 to
// the cleaned path, in HTML, which a WebSocket client does not follow (a
// base URL with a trailing slash, EGRESS_URL + "/ws", is the usual way to
// get one) and would only ever see as "bad handshake".
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header()["Cache-Control"] = cacheNoStore
	if p := r.URL.Path; path.Clean(p) != p {
		writeHTTPError(w, http.StatusNotFound, "not_found", "no such endpoint (the path is not in clean form); see docs/protocol.md")
		return
	}
	s.mux.ServeHTTP(w, r)
}

// cacheNoStore is the Cache-Control of live answers, shared rather than
// allocated per request. Never written to: a handler that caches sets a
// header of its own (Header.Set replaces the slice).
var cacheNoStore = []string{"no-store"}

func writeHTTPError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	body.Error.Code, body.Error.Message = code, msg
	_ = json.NewEncoder(w).Encode(body)
}

func randomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// Run runs the hub and the maintenance loops until ctx is done, then
// drains: every socket is closed with 1001 and its record removed.
func (s *Server) Run(ctx context.Context) {
	var loops sync.WaitGroup
	hctx, stopHub := context.WithCancel(context.WithoutCancel(ctx))
	loops.Add(1)
	go func() { defer loops.Done(); s.hub.run(hctx) }()
	loops.Add(1)
	go func() { defer loops.Done(); s.maintain(hctx) }()
	loops.Add(1)
	go func() { defer loops.Done(); s.sweep(hctx) }()
	<-ctx.Done()
	s.drain()
	stopHub()
	loops.Wait()
}

// drain closes every socket with 1001 and waits (up to ShutdownGrace from
// its start) for their handlers to remove their registry records. The
// closes are spread over drainSpread, so that the clients, which
// reconnect within half a second of their close, do not all land on
// the other instances at once (a reconnect storm: docs/scaling.md);
// sockets not closed yet get their messages meanwhile. Sockets whose
// client has not answered by the end of the grace are cut, and their
// handlers get up to REDIS_TIMEOUT plus a second more to remove their
// records, so that none of them uses the Redis client after run has
// closed it.
func (s *Server) drain() {
	s.drainMu.Lock()
	s.draining.Store(true)
	s.drainMu.Unlock()
	start := time.Now()
	conns := s.hub.snapshotConns()
	spread := drainSpread(len(conns), s.cfg.DrainRate, s.cfg.ShutdownGrace)
	s.log.Info("draining", "connections", len(conns), "spread", spread.String())
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	s.closeSpread(conns, start, spread, done)
	select {
	case <-done:
		return
	case <-time.After(time.Until(start.Add(s.cfg.ShutdownGrace))):
	}
	left := s.hub.snapshotConns()
	s.log.Warn("drain grace period over: cutting the sockets left", "left", len(left))
	for _, c := range left {
		_ = c.nc.Close()
	}
	select {
	case <-done:
	case <-time.After(s.cfg.Redis.Timeout + time.Second):
		s.log.Warn("connections still ending after the drain", "left", s.open.Load())
	}
}

// drainSpread is how long the drain takes to close n sockets: one every
// 1/rate of a second, and all of them within half of grace, which
// leaves the other half for the last ones' clients to answer their
// close. rate 0: all at once.
func drainSpread(n, rate int, grace time.Duration) time.Duration {
	if rate <= 0 || n <= 1 {
		return 0
	}
	return min(time.Duration(float64(n-1)/float64(rate)*float64(time.Second)), grace/2)
}

// closeSpread closes conns with 1001, the i-th of n at start +
// spread×i/(n-1), a batch every drainTick: a tick that comes late
// closes what is due by then, so the whole takes spread. It ends
// sooner when done is (every socket has ended). Closed here, one after
// the other: closeWith does not wait for the socket (the writer sends
// the close frame), so no goroutine is started for it that nothing
// would wait for.
func (s *Server) closeSpread(conns []*conn, start time.Time, spread time.Duration, done <-chan struct{}) {
	n := len(conns)
	for i := 0; i < n; {
		due := n
		if spread > 0 {
			due = min(n, 1+int(float64(n-1)*float64(time.Since(start))/float64(spread)))
		}
		for ; i < due; i++ {
			conns[i].closeWith(protocol.CloseGoingAway, "server shutting down: reconnect and resume", true)
		}
		if i == n {
			return
		}
		select {
		case <-done:
			return
		case <-time.After(drainTick):
		}
	}
}

// drainTick is how often a spread drain closes the sockets due.
const drainTick = 10 * time.Millisecond

// sweep runs the sockets' shared timers: pings, missed pongs, idle and
// lifetime closes and token expiry. One loop for all connections instead
// of timers per connection. It never waits for Redis: maintain, which
// does, can be held up for as long as Redis is unreachable (each dial
// of a re-subscription waits REDIS_TIMEOUT), and sockets that got no
// ping meanwhile would all be dropped for a missed pong when it ended.
func (s *Server) sweep(ctx context.Context) {
	tick := time.NewTicker(sweepEvery(s.cfg))
	defer tick.Stop()
	// A stall before the first tick counts too: on SCF an instance may
	// be frozen right after it starts, with its one socket open.
	s.sweptAt.Store(s.clock())
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			// Not the tick's time: after a stall the tick waiting in the
			// channel may be one from before it (noteSweep).
			s.sweepConns(time.Now())
		}
	}
}

// sweepEvery is the sweep's period: a second, or less where a timer
// needs it finer. Pings go out every PING_INTERVAL give or take half of
// it; a connection's lifetime is drawn to end at least a period before
// MAX_LIFETIME (lifetimeOf), which takes a period of at most a twentieth
// of it, so that the close, made at the first sweep past the lifetime,
// is never later than MAX_LIFETIME (docs/protocol.md); idle closes come
// within a period after IDLE_TIMEOUT.
func sweepEvery(cfg Config) time.Duration {
	d := min(time.Second, cfg.PingInterval/2)
	if cfg.MaxLifetime > 0 {
		d = min(d, cfg.MaxLifetime/20)
	}
	return d
}

// maintain runs the instance's Redis upkeep: the registry refresh, the
// read-path probe and unsubscribing idle channels.
func (s *Server) maintain(ctx context.Context) {
	tick := time.NewTicker(min(time.Second, s.cfg.ProbeInterval/2))
	defer tick.Stop()
	refreshEvery := s.cfg.RegistryTTL / 3
	lastRefresh, lastProbe, lastResub := time.Now(), time.Time{}, time.Time{}
	// silentSince, when not zero, is the last probe seen before the read
	// path was found silent: the silence is logged when it is found and
	// when the probe after it comes back, with the resubscribes it took,
	// not at each of them.
	var silentSince int64
	var resubscribes int
	// probeErr is the last probe's error (nil: Redis took it), which
	// the silence is logged with: at INFO a failed probe is not told
	// otherwise, and the two silences want different fixes.
	var probeErr error
	var refreshing atomic.Bool
	var refreshes sync.WaitGroup
	defer refreshes.Wait()
	s.hub.lastRecv.Store(monoNow())
	// stallSeen is the time the process did not run (stallAt) that the
	// read path's silence has been credited with (creditMono on
	// lastRecv, as creditStall does for each client's pings).
	stallSeen := s.stallAt(s.clock())
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			if now.Sub(lastProbe) >= s.cfg.ProbeInterval {
				lastProbe = now
				pctx, cancel := context.WithTimeout(ctx, s.cfg.Redis.Timeout)
				probeErr = s.hub.probe(pctx)
				if probeErr != nil && !loginFailed(s.hub.loginRefused, probeErr, "op", "probe") {
					s.log.Debug("probe failed", "err", probeErr.Error())
				}
				switch lost, known := s.recordsLost(pctx); {
				case lost:
					s.hub.refreshDue.Store(true)
					s.regLost.Fail(errRecordsLost)
				case known:
					s.regLost.OK()
				}
				cancel()
				// The read path is dead while the connection looks open:
				// replace it (the receive loop then catches up), and give
				// the new one as long before replacing it again. lastRecv
				// stays what it was: /readyz says 503 until a probe comes
				// back, not 200 after every resubscribe.
				silent := 4 * s.cfg.ProbeInterval
				last := s.hub.lastRecv.Load()
				if silentSince != 0 && last != silentSince {
					s.log.Info("redis read path back", "silent_for", time.Duration(last-silentSince).Round(time.Millisecond).String(), "resubscribes", resubscribes)
					silentSince, resubscribes = 0, 0
				}
				// A process that did not run (on SCF, an instance frozen
				// between invocations) sent no probe meanwhile, so none
				// came back: that time is no silence of the read path,
				// as it is no client's for the pings (creditStall).
				// Without it the first check after a freeze longer than
				// 4 PROBE_INTERVALs found the read path silent whenever
				// it ran before the probe just sent came back, and
				// resubscribed every channel. Not while a silence is
				// being logged: its end is a probe coming back (last
				// moving), not a credit.
				if st := s.stallAt(s.clock()); st > stallSeen {
					if silentSince == 0 {
						creditMono(&s.hub.lastRecv, time.Duration(st-stallSeen), monoNow())
					}
					stallSeen = st
				}
				if quiet := s.hub.readSilence(time.Now()); quiet > silent && time.Since(lastResub) > silent {
					if silentSince == 0 {
						silentSince = last
						why := "Redis takes the probes, but they do not come back on the Pub/Sub connection"
						if probeErr != nil {
							why = probeErr.Error() // the last probe's
						}
						s.log.Warn("redis read path silent, resubscribing", "silent_for", quiet.Round(time.Second).String(), "err", why,
							"then", "every channel is subscribed again (again every 4 PROBE_INTERVALs while it lasts, not logged) and caught up from its stream once Redis answers; /readyz answers 503 meanwhile; logged once more when a probe comes back (redis read path back)")
					}
					resubscribes++
					s.hub.resubscribe(ctx)
					lastResub = time.Now()
				}
			}
			// The refresh runs beside the loop, one at a time: on a large
			// instance it takes many round trips, which must not hold up
			// the probes. Sooner when Redis may have lost the records
			// (refreshDue).
			// A due refresh that fails is due again: Redis confirms
			// subscriptions before it takes writes (a Redis loading its
			// snapshot answers -LOADING to them), and nothing else would
			// ask for it before the next scheduled one.
			if (now.Sub(lastRefresh) >= refreshEvery || s.hub.refreshDue.Load()) && refreshing.CompareAndSwap(false, true) {
				lastRefresh = now
				due := s.hub.refreshDue.Swap(false)
				refreshes.Go(func() {
					defer refreshing.Store(false)
					if err := s.refreshRegistry(ctx); err != nil && due && ctx.Err() == nil {
						s.hub.refreshDue.Store(true)
					}
				})
			}
			s.hub.sweepIdle(ctx, now)
		}
	}
}

// recordsLost reports whether the record of the instance's oldest
// connection is missing from Redis: Redis lost its data while the
// Pub/Sub connection stayed up (FLUSHALL, eviction), which nothing else
// notices (a Redis that restarted confirms the subscriptions again and
// sets refreshDue), and sends to the instance's users would find nobody
// until the next scheduled refresh. The oldest connection's registration
// is long done (one younger than REDIS_TIMEOUT may still be writing its
// record); one EXISTS per probe. known says whether it could tell: not
// while the oldest connection is that young, or Redis does not answer;
// without connections nothing is missing. Connections the server is
// closing are left out: their records are removed as the close begins
// (unlist).
func (s *Server) recordsLost(ctx context.Context) (lost, known bool) {
	var oldest *conn
	now := s.clock()
	for _, c := range s.hub.snapshotConns() {
		if c.closeStarted.Load() {
			continue
		}
		if s.lapsed(c, now) { // not lost by Redis: the refresh closes it (closeLapsed)
			continue
		}
		if oldest == nil || c.openedAt.Before(oldest.openedAt) {
			oldest = c
		}
	}
	if oldest == nil {
		return false, true
	}
	if time.Since(oldest.openedAt) < s.cfg.Redis.Timeout+time.Second {
		return false, false
	}
	n, err := s.rdb.Exists(ctx, s.hub.keys.Conn(oldest.id)).Result()
	if oldest.closeStarted.Load() { // closing, or ended, meanwhile: its record is removed
		return false, false
	}
	return err == nil && n == 0, err == nil
}

// errRecordsLost is the error of the regLost episode.
var errRecordsLost = errors.New("the registry record of this instance's oldest connection is gone from redis")

// recordsLostQuiet is how long no probe may find the records missing
// before regLost ends: evictions come and go with Redis's memory
// pressure, and a Quiet of EpisodeQuiet (5 s, a probe's interval) would
// end the episode at the first probe after each rewrite and begin a new
// one at the next eviction, two lines for each instead of one.
const recordsLostQuiet = 5 * time.Minute

// sweepConns closes the connections whose time is up and pings the
// others. The closes run here, in the sweep, which owns them: closeWith
// does not wait for a slow socket (the connection's writer sends the
// close frame, bounded by WRITE_TIMEOUT, and its handler waits for the
// writer), so a goroutine per close would only be one that nothing waits
// for.
func (s *Server) sweepConns(now time.Time) {
	stalled := s.noteSweep(now)
	for _, c := range s.hub.snapshotConns() {
		if c.closeStarted.Load() {
			continue
		}
		if stalled > 0 {
			creditStall(c, stalled, now)
		}
		// An expired token first: told 4004, the client fetches a fresh
		// token before it reconnects, where after a lifetime or idle
		// close due in the same sweep it would dial with the expired one
		// and be refused 401 first.
		if c.expired(now) && c.closeExpired() {
			continue
		}
		if c.lifetime > 0 && now.Sub(c.openedAt) >= c.lifetime {
			c.closeWith(protocol.CloseLifetime, "maximum lifetime reached: reconnect and resume", true)
			continue
		}
		// Frames going out to the client are data either way, and a
		// ping would wait behind them: a connection being written to is
		// neither idle nor silent, nor due a ping (conn.write).
		busy := c.busyWrite()
		if !busy && s.cfg.IdleTimeout > 0 && time.Duration(mono(now)-c.lastData.Load()) >= s.cfg.IdleTimeout {
			c.closeWith(protocol.CloseIdleTimeout, "idle timeout: reconnect and resume", true)
			continue
		}
		if busy {
			continue
		}
		if !c.handling.Load() && time.Duration(mono(now)-c.lastRead.Load()) >= 2*s.cfg.PingInterval {
			c.closeWith(1006, "missed pong", true)
			continue
		}
		if time.Duration(mono(now)-c.lastPing.Load()) >= s.cfg.PingInterval {
			c.lastPing.Store(mono(now))
			c.ping()
		}
	}
}

// noteSweep records a sweep at now and returns how long the process did
// not run before it (pendingStall: a platform that froze the instance,
// SIGSTOP, a VM stall; or a machine so loaded that the sweep did not get
// its turn), which it adds to s.stalled.
func (s *Server) noteSweep(now time.Time) time.Duration {
	at := int64(now.Sub(s.epoch))
	s.stallMu.Lock()
	defer s.stallMu.Unlock()
	late := s.pendingStall(at)
	s.stalled.Add(late)
	s.sweptAt.Store(at)
	return time.Duration(late)
}

// creditStall moves c's last read forward by the time the process did
// not run (noteSweep), never past now: no ping went out meanwhile, so the
// client had none to answer, and what it sent is still unread in the
// socket. Without it every socket of an instance that was frozen for
// 2×PING_INTERVAL was dropped as "missed pong" by the first sweep after
// it, clients that had done nothing wrong, all reconnecting at once.
func creditStall(c *conn, stalled time.Duration, now time.Time) {
	creditMono(&c.lastRead, stalled, mono(now))
}

// creditMono moves t, a reading of the monotonic clock (mono), forward
// by d, never past now, nor back if it moved on meanwhile.
func creditMono(t *atomic.Int64, d time.Duration, now int64) {
	for {
		old := t.Load()
		v := min(old+int64(d), now)
		if v <= old || t.CompareAndSwap(old, v) {
			return
		}
	}
}

// refreshRegistry rewrites every connection's record and memberships
// with a fresh TTL, a batch at a time. Each connection's regMu is held
// from its copy to the write's reply, so that a channel it leaves (or
// joins) meanwhile is written after the refresh, not undone by it. A
// connection whose own registry write is under way is refreshed last,
// once that write is done: waiting for it in its turn would hold up the
// refresh of every other connection while Redis is slow, and skipping it
// would let the memberships of a connection that keeps subscribing
// expire (its own writes renew its record and the channel they touch,
// not its user's set). Each batch has a deadline of its own: one for the
// whole refresh would fail the later batches of a large instance however
// healthy Redis is.
//
// It returns the first write that failed (the batches after it are not
// written).
func (s *Server) refreshRegistry(ctx context.Context) error {
	all := s.hub.snapshotConns()
	if len(all) == 0 && (s.regFail.Active() || s.regOOM.Active()) {
		// Nothing to refresh, and only a registry write ends the outage
		// of registry writes: without one, an instance whose sockets
		// all ended while Redis failed (one socket per instance, on SCF)
		// kept it open until a new socket came, however long Redis had
		// been back.
		cctx, cancel := context.WithTimeout(ctx, s.cfg.Redis.Timeout)
		err := s.reg.Check(cctx, s.instance)
		cancel()
		s.regDone(err, "check", "")
		return err
	}
	all = s.closeLapsed(all)
	conns := make([]*conn, 0, len(all))
	recs := make([]*registry.Record, 0, len(all))
	var busy []*conn
	var late []*conn // lapsed while this refresh ran (a stall between its batches)
	// One refresher for every batch: on a cluster with a master down, it
	// writes to that master no more after its first failure, and the
	// batches go on with the masters that answer, whose records would
	// otherwise expire for as long as the failover lasts (a failed batch
	// stops the refresh only on a single Redis: registry.Refresher.GoOn).
	ref := s.reg.Refresher()
	var firstErr error
	goOn := func(err error) bool {
		if err != nil && firstErr == nil {
			firstErr = err
		}
		return err == nil || ref.GoOn()
	}
	write := func(start int) error {
		began := s.clock()
		before := s.stallAt(began)
		bctx, cancel := context.WithTimeout(ctx, 5*s.cfg.Redis.Timeout)
		err := ref.Write(bctx, recs[start:])
		cancel()
		done := s.clock()
		after := s.stallAt(done)
		// A write the process stopped in the middle of was made before
		// the stall, and its TTL runs from then: it counts from its start.
		at, stalled := done, after
		if after > before {
			at, stalled = began, before
		}
		for _, c := range conns[start:] {
			c.regTry.Store(at)
			c.regStalled.Store(stalled)
			c.regMu.Unlock()
		}
		s.regDone(err, "refresh", "")
		return err
	}
	// take adds c, whose regMu is held, to the batch, unless its record
	// is not written yet (openConn writes it) or the server is closing it
	// (unlist removes it).
	take := func(c *conn) {
		if !c.listed.Load() || c.closeStarted.Load() {
			c.regMu.Unlock()
			return
		}
		if s.lapsed(c, s.clock()) {
			c.regMu.Unlock()
			late = append(late, c)
			return
		}
		conns = append(conns, c)
		recs = append(recs, c.recordCopy())
	}
	batch := s.refreshBatch
	ok := true
	for i := 0; i < len(all) && ok; i += batch {
		start := len(conns)
		for _, c := range all[i:min(i+batch, len(all))] {
			if !c.regMu.TryLock() {
				busy = append(busy, c)
				continue
			}
			take(c)
		}
		ok = goOn(write(start)) // when not, the batches after it are not written
	}
	for i := 0; i < len(busy) && ok; i += batch {
		start := len(conns)
		for _, c := range busy[i:min(i+batch, len(busy))] {
			c.regMu.Lock()
			take(c)
		}
		ok = goOn(write(start))
	}
	err := firstErr
	if len(late) > 0 {
		s.closeLapsed(late)
	}
	if err != nil {
		// Redis failed the refresh, which stops at the failing batch: the
		// records of the rest were due as well. They are not lapsed by a
		// stall of the instance's own (closeLapsed) when they expire.
		now := s.clock()
		stalled := s.stallAt(now)
		for _, c := range all {
			if now > c.regTry.Load() {
				c.regTry.Store(now)
				c.regStalled.Store(stalled)
			}
		}
	}
	// A connection that ended meanwhile may have been removed from the
	// registry before the refresh wrote its record back: remove it again,
	// or sends to it would be accepted (and dropped) for REGISTRY_TTL.
	// Also once ctx has ended: at shutdown, the drain's removals race
	// this refresh, and its context is cancelled as soon as they are
	// done (Run waits for it before the Redis client is closed).
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*s.cfg.Redis.Timeout)
	defer cancel()
	for i, c := range conns {
		select {
		case <-c.done:
			s.regDone(s.reg.Remove(rctx, recs[i]), "remove", c.id)
		default:
		}
	}
	return err
}

// episodes are the outage logs of s and its hub (logging.Episode), each
// once.
func (s *Server) episodes() []*logging.Episode {
	h := s.hub
	return []*logging.Episode{s.regFail, s.regOOM, s.regLost, h.readFail, h.loginRefused, h.badNotify, h.badRoute, h.undecodable, h.pacing.spent}
}

// stopEpisodes stops the outage logs once shutdown is over (the sockets
// drained, the loops ended), so that "stopped" is the last line: an
// outage's end pending its Quiet is logged now, not from a timer after
// it, or never (the process exits first).
func (s *Server) stopEpisodes() {
	for _, e := range s.episodes() {
		e.Stop()
	}
}

// clock is the time since the server was made, in ns, on the monotonic
// clock: what conn.regTry holds.
func (s *Server) clock() int64 { return int64(time.Since(s.epoch)) }

// monoEpoch is where mono counts from: the process's start, near enough.
var monoEpoch = time.Now()

// mono is t, a reading of time.Now, as ns on the monotonic clock: what a
// connection's timers keep (conn.lastData, lastRead, lastPing and
// writeDeadline), so that the sweep and the writer measure how long the
// instance ran, whatever its wall clock did meanwhile. Not s.clock: the
// server of a test is often made without its epoch.
func mono(t time.Time) int64 { return int64(t.Sub(monoEpoch)) }

// monoNow is mono(time.Now()).
func monoNow() int64 { return int64(time.Since(monoEpoch)) }

// readSilence is how long before now (a reading of time.Now) the receive
// loop last saw a probe come back through Pub/Sub, by the time the
// instance ran: by the wall clock, a clock stepped forward had /readyz
// answer 503 and the read path resubscribed ("redis read path silent"),
// and one stepped back hid a dead read path for as long as the step.
func (h *hub) readSilence(now time.Time) time.Duration {
	return time.Duration(mono(now) - h.lastRecv.Load())
}

// lapsed reports whether no write of c's record has ended for longer
// than REGISTRY_TTL (conn.regTry), though it is listed and not closing,
// because the process did not run: Redis has let the record expire, and
// sends and disconnects found nobody there meanwhile. Without the time
// the sweep found the process stalled since that write (Server.stalled),
// the record would not have expired: a Redis outage, which holds up the
// refreshes (maintain waits for Redis) but not the sweep, is not a
// lapse, and the records are written back once Redis answers.
func (s *Server) lapsed(c *conn, now int64) bool {
	if !c.listed.Load() || c.closeStarted.Load() {
		return false
	}
	ttl, since := int64(s.cfg.RegistryTTL), now-c.regTry.Load()
	return since > ttl && since-(s.stallAt(now)-c.regStalled.Load()) <= ttl
}

// stallAt is the time the process did not run up to now (on s.clock):
// what the sweep counted (stalled) and what it has not yet
// (pendingStall).
func (s *Server) stallAt(now int64) int64 {
	s.stallMu.Lock()
	defer s.stallMu.Unlock()
	return s.stalled.Load() + s.pendingStall(now)
}

// pendingStall is the stall the sweep has not counted yet, at now (on
// s.clock): the time past its period since the last sweep, when that is
// more than a period. Both loops wake when the process runs again, and
// the refresh may look before the sweep has; the sweep counts it with
// this too (noteSweep).
func (s *Server) pendingStall(now int64) int64 {
	last := s.sweptAt.Load()
	if last == 0 {
		return 0
	}
	every := int64(sweepEvery(s.cfg))
	if late := now - last - every; late > every {
		return late
	}
	return 0
}

// closeLapsed closes the connections among all whose records lapsed
// (lapsed) and returns the others. A refresh is tried every REGISTRY_TTL
// / 3: only an instance that did not run for about two thirds of
// REGISTRY_TTL, frozen by its platform, stopped or starved of CPU, gets
// here. Writing the records back would let the connections live on
// having missed, unknown to them, every message sent to their user
// meanwhile, and an operator's disconnect that answered none were
// there. Closed 1013, they reconnect and resume their channels, and are
// registered again.
func (s *Server) closeLapsed(all []*conn) []*conn {
	now := s.clock()
	kept := all[:0:0]
	var lapsed []*conn
	var oldest int64
	for _, c := range all {
		if !s.lapsed(c, now) {
			kept = append(kept, c)
			continue
		}
		lapsed = append(lapsed, c)
		oldest = max(oldest, now-c.regTry.Load())
	}
	if len(lapsed) == 0 {
		return all
	}
	s.log.Warn("registry records lapsed, closing their connections", "connections", len(lapsed),
		"not_refreshed_for", time.Duration(oldest).Round(time.Millisecond).String(),
		"then", "the instance did not run for longer than REGISTRY_TTL allows (frozen, stopped, starved of CPU): its records expired, and sends to these connections and their users and disconnects found nobody meanwhile; they are closed 1013 (4004 if their token expired meanwhile) to reconnect and resume")
	for _, c := range lapsed {
		// An expired token first, as in the sweep (sweepConns), which
		// may look after this refresh once the process runs again: told
		// 1013, the client would dial with its expired token and be
		// refused 401, and a browser client without getToken, which
		// stops at a 4004, would retry that for good.
		if c.closeExpired() {
			continue
		}
		c.closeWith(protocol.CloseTryAgainLater, "registration lapsed: reconnect and resume", true)
	}
	return kept
}

// regDone records the outcome of a registry write, op, for connection
// conn ("" for all of them): failures are logged once per outage.
func (s *Server) regDone(err error, op, conn string) {
	if err == nil {
		s.regFail.OK()
		if op != "remove" && op != "leave" {
			s.regOOM.OK()
		}
		return
	}
	attrs := []any{"op", op}
	if conn != "" {
		attrs = append(attrs, "conn", conn)
	}
	if redisconn.OutOfMemory(err) {
		s.regOOM.Fail(err, attrs...)
	} else if !loginFailed(s.hub.loginRefused, err, attrs...) {
		s.regFail.Fail(err, attrs...)
	}
}

func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"status":"ok"}` + "\n"))
}

// handleReadyz is 200 only while Redis answers and the read path (the
// Pub/Sub connection, checked by probes) is alive.
func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	err := s.ready.Check(r.Context())
	silent := s.hub.readSilence(time.Now()) > 3*s.cfg.ProbeInterval
	select {
	case <-s.hub.inbox.ready:
	default:
		silent = true
	}
	if why := notReady(err, silent, s.draining.Load()); why != "" {
		w.Header().Set("Retry-After", "1")
		writeHTTPError(w, http.StatusServiceUnavailable, "unavailable", why)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"status":"ready"}` + "\n"))
}

// notReady says why the egress is not ready, or "" if it is: the probe's
// error err (nil: Redis answered its PING), whether the read path is
// silent (no Pub/Sub message, its own probe's included, for 3 ×
// PROBE_INTERVAL, or the inbox not yet subscribed) and whether it
// drains. The first that applies, in that order of what an operator
// would act on: no secret and no address.
func notReady(err error, silent, draining bool) string {
	switch {
	case draining:
		return "draining: the instance is shutting down"
	case err != nil:
		return redisconn.Why(err)
	case silent:
		return "the Redis subscription (the read path) is not live"
	}
	return ""
}

// checkOrigin allows clients without an Origin header (not browsers), an
// Origin listed in ALLOWED_ORIGINS ("*" allows all), and otherwise only an
// Origin whose host is the request's Host.
func (s *Server) checkOrigin(r *http.Request) bool {
	o := r.Header.Get("Origin")
	if o == "" {
		return true
	}
	return origin.Allowed(s.cfg.AllowedOrigins, o, r.Host)
}
