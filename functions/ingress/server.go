package main

import (
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// Server is the ingress HTTP surface.
type Server struct {
	cfg   Config
	log   *slog.Logger
	rdb   redis.UniversalClient
	keys  keys.Scheme
	store *stream.Store
	// batcher coalesces concurrent publishes into shared pipelines.
	batcher *stream.Batcher
	reg     *registry.Registry
	h       http.Handler
	// claims frees the Idempotency-Key claims of failed requests.
	claims *releaser

	metrics *metrics
	sec     *security // credentials and rate limits (auth.go)
	ready   *redisconn.Readiness

	// redisDown and unreplicated log the requests answered 503 because
	// Redis failed, or its replicas did not confirm an append, once per
	// outage rather than once per request (logging.Episode).
	redisDown, unreplicated *logging.Episode
	// redisOOM logs the requests answered 503 because Redis is at its
	// maxmemory and refuses writes: an episode of its own, at error
	// level, since it lasts until memory is freed or an operator acts.
	redisOOM *logging.Episode
	// redisRefused logs the requests answered 500 because Redis refused
	// a command to the functions' ACL user, once while it goes on.
	redisRefused *logging.Episode
	// refusals are the commands Redis refused and has not carried out
	// since: only then does redisRefused end (redisUp).
	refusals refusals
	// redisLogin logs the requests answered 503 because Redis refused
	// the functions' login (wrong password, no password, a user unknown
	// or disabled): an episode of its own, at error level, since every
	// retry gets the same answer until an operator fixes REDIS_URL or
	// the user. Only a login Redis accepts ends it (AddLoginHook): it
	// goes on serving the connections logged in before.
	redisLogin *logging.Episode
	// slotMoving logs the requests answered 503 because a Redis Cluster
	// slot their appends need is being moved (resharding): Redis answers,
	// so neither an outage (redisDown) nor a fault to fix; it ends at an
	// append that succeeds.
	slotMoving *logging.Episode
	// undecodable logs history pages that left out entries no ingress
	// wrote, once while reads keep finding them: a line per entry and
	// read would let any reader of such a channel fill the log.
	undecodable *logging.Episode
	// unsaved logs the Idempotency-Key replies that could not be stored
	// after their publish was written (answered 202 all the same): an
	// episode of its own, not redisDown's, which counts requests answered
	// 503 and ends at any command Redis carries out; this one ends only
	// when a reply is stored again.
	unsaved *logging.Episode
}

func init() { gin.SetMode(gin.ReleaseMode) }

// Close stops the server's background work (claims.go), once no request
// runs: the Redis client can be closed after it.
func (s *Server) Close() { s.claims.Close() }

// episodes are the server's outage logs (logging.Episode), each once.
func (s *Server) episodes() []*logging.Episode {
	return []*logging.Episode{s.redisDown, s.unreplicated, s.redisOOM, s.redisRefused, s.redisLogin, s.slotMoving, s.undecodable, s.unsaved}
}

// quiesce ends what logs in the background once no request runs, so that
// serve's "stopped" is the last line: the claims' releases (Close, whose
// last batch may log the keys it freed) and the outage logs, whose end
// pending its Quiet is logged now rather than from a timer after
// "stopped", or never (the process exits first). Close may follow.
func (s *Server) quiesce() {
	s.Close()
	for _, e := range s.episodes() {
		e.Stop()
	}
}

// NewServer wires the ingress routes to rdb.
func NewServer(cfg Config, log *slog.Logger, rdb redis.UniversalClient, ks keys.Scheme) *Server {
	store := stream.NewStore(rdb)
	store.WaitForReplicas(cfg.PublishWaitReplicas, cfg.PublishWaitTimeout)
	// A pipeline's deadline: REDIS_TIMEOUT, and with the replica wait on,
	// one PUBLISH_WAIT_TIMEOUT more. Appends that find Redis's script
	// cache empty (after a restart or a failover) run again in a second
	// pipeline, with a second WAIT, and WAITs that no replica confirms
	// each run to PUBLISH_WAIT_TIMEOUT: within one REDIS_TIMEOUT, their
	// 503 said "Redis cannot be reached" instead of "not confirmed".
	pipelineTimeout := cfg.Redis.Timeout
	if cfg.PublishWaitReplicas > 0 {
		pipelineTimeout += cfg.PublishWaitTimeout
	}
	s := &Server{
		batcher: stream.NewBatcher(store, pipelineTimeout, 4, 256),
		cfg:     cfg,
		log:     log,
		rdb:     rdb,
		keys:    ks,
		store:   store,
		reg:     registry.New(rdb, ks, cfg.RegistryTTL),
		ready:   redisconn.NewReadiness(rdb, 500*time.Millisecond),
		claims:  newReleaser(rdb, cfg.Redis.Timeout, log),

		metrics: newMetrics(),
	}
	s.sec = newSecurity(cfg, log)
	if cfg.PublishRateScope == scopeGlobal {
		s.sec.limits.global = newRedisLimits(rdb, ks)
	}
	s.redisDown = &logging.Episode{Log: log, Msg: "redis unavailable", Back: "redis back",
		Then: "requests that need Redis are answered 503 with Retry-After; logged again every 30s while it lasts and once when Redis answers again; wsrelay_ingress_redis_errors_total counts every failure"}
	s.redisOOM = &logging.Episode{Log: log, Msg: "redis out of memory", Back: "redis accepts writes again", Error: true,
		Then: "Redis is at its maxmemory and refuses writes: publishes, sends and disconnects are answered 503 with Retry-After: 5 and nothing of them is written, reads go on; free memory or raise maxmemory (docs/deployment.md); logged again every 30s while it lasts and once when an append succeeds again"}
	s.redisRefused = &logging.Episode{Log: log, Msg: "redis refused a command", Back: "redis accepts the commands again", Error: true,
		Then: "the Redis user the functions log in as lacks an ACL rule they need (err names it): requests that need it are answered 500 internal (and /readyz 503 if its probe is refused, as every command is without +select for the database of REDIS_URL) until the user is given it (docs/deployment.md, TLS and ACL users); logged again every 30s while it lasts and once when Redis has carried out each command it refused"}
	s.redisLogin = &logging.Episode{Log: log, Msg: "redis refused the login", Back: "redis accepts the login again", Error: true,
		Then: "the user or password the functions log in with (REDIS_URL's, or REDIS_CLUSTER_USERNAME and REDIS_CLUSTER_PASSWORD) is wrong or missing, or that ACL user does not exist or is disabled (err: WRONGPASS for a wrong password or user, NOAUTH or unauthenticated for none): requests that need Redis are answered 503 with Retry-After: 5, and /readyz 503, until an operator fixes the setting or the user (docs/deployment.md, TLS and ACL users); logged again every 30s while it lasts and once when Redis accepts the login again"}
	s.slotMoving = &logging.Episode{Log: log, Msg: "redis cluster slot being moved", Back: "redis cluster slots moved",
		Then: "a resharding is moving the Redis Cluster slot of channels that are published to: their publishes are answered 503 with Retry-After: 1 and nothing of them is written, for as long as the slot's keys take to move (docs/scaling.md); logged again every 30s while it lasts and once when appends succeed again"}
	s.unreplicated = &logging.Episode{Log: log, Msg: "publish not replicated in time", Back: "publishes replicated again",
		Then: "publishes are answered 503 (they may have been written: clients retry with the same Idempotency-Key) until PUBLISH_WAIT_REPLICAS replicas confirm within PUBLISH_WAIT_TIMEOUT; logged again every 30s while it lasts"}
	s.undecodable = &logging.Episode{Log: log, Msg: "undecodable stream entries", Back: "history entries decodable again",
		Then: "history pages leave them out (another application writing under REDIS_KEY_PREFIX, or another release's format); logged again every 30s while reads find them"}
	s.unsaved = &logging.Episode{Log: log, Msg: "idempotency record not saved", Back: "idempotency records saved again",
		Then: "the requests were written and answered as usual, but their Idempotency-Key replies were not stored: a retry with one of those keys runs again and writes nothing twice (docs/api.md, Idempotency-Key); logged again every 30s while it lasts and once when a reply is stored again"}
	rdb.AddHook(redisHook{m: s.metrics, up: s.redisUp, refusals: &s.refusals})
	redisconn.AddLoginHook(rdb, s.redisLogin.OK)
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		// Appends waiting for replicas run on the masters' clients,
		// outside the cluster client's hooks (stream.OnNode).
		cc.OnNewNode(func(n *redis.Client) {
			n.AddHook(redisHook{m: s.metrics, up: s.redisUp, refusals: &s.refusals, node: true})
		})
	}
	r := gin.New()
	r.HandleMethodNotAllowed = true
	r.RedirectTrailingSlash = false
	r.RedirectFixedPath = false
	// Metrics outside the recovery, so that a request that panicked is
	// counted (as its 500). The recovery logs through slog only: gin's
	// own writer would add a multi-line, coloured, non-JSON report.
	r.Use(s.metrics.middleware)
	r.Use(gin.CustomRecoveryWithWriter(nil, func(c *gin.Context, v any) {
		s.log.Error("panic", "route", c.FullPath(), "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
		s.writeError(c, errf(500, "internal", "internal error"))
	}))
	s.routes(r)
	s.h = r
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.h.ServeHTTP(w, r) }

func (s *Server) handleHealthz(c *gin.Context) {
	c.JSON(200, gin.H{"status": "ok"})
}

// handleReadyz answers 200 while Redis answers. The result is cached for
// 500 ms so a probe storm does not become a Redis storm. A failed probe
// counts in the episodes the API's requests log (an instance that no
// request reaches while it is not ready would otherwise never say why):
// refused to the functions' ACL user (no +select for REDIS_URL's
// database, or no +ping), a refused command; the login refused (a wrong
// password, none, a user unknown or disabled), a refused login; both
// last until an operator acts, and the body says "refused". Anything
// else (Redis down, a replica, an error reply such as LOADING), Redis
// unavailable: "down". "reason" says which, in the egress's words.
func (s *Server) handleReadyz(c *gin.Context) {
	if err := s.ready.Check(c.Request.Context()); err != nil {
		state := "refused"
		if s.redisFailed(c, err) == s.redisDown {
			state = "down"
		}
		c.Header("Retry-After", "1")
		c.JSON(503, gin.H{"status": "unavailable", "redis": state, "reason": redisconn.Why(err)})
		return
	}
	c.JSON(200, gin.H{"status": "ready"})
}
