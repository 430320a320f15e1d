package main

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"github.com/gin-gonic/gin"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// apiError is an error a client caused or must know about: an HTTP status,
// a snake_case code and a message for a human (docs/api.md lists them).
type apiError struct {
	Status     int
	Code       string
	Message    string
	RetryAfter int // seconds; zero means no Retry-After header
}

func (e *apiError) Error() string { return e.Code + ": " + e.Message }

func errf(status int, code, msg string) *apiError {
	return &apiError{Status: status, Code: code, Message: msg}
}

type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Index   *int   `json:"index,omitempty"`
	} `json:"error"`
}

// indexedError is an apiError about one item of a batch.
type indexedError struct {
	*apiError
	Index int
}

// writeError is the one place that maps errors to HTTP responses. Anything
// that is not an apiError came from Redis (the only thing ingress talks
// to): the client gets 503 with Retry-After and no detail; the log gets
// the detail, once per outage (episode), not once per request.
func (s *Server) writeError(c *gin.Context, err error) {
	var body errorBody
	var ae *apiError
	var ie *indexedError
	switch {
	case errors.As(err, &ie):
		ae = ie.apiError
		idx := ie.Index
		body.Error.Index = &idx
	case errors.As(err, &ae):
	case errors.Is(err, stream.ErrNotReplicated) && !redisconn.Refused(err):
		// A WAIT that Redis refused to the functions' ACL user (no +wait)
		// is no replica being late: it falls to the refusals below.
		s.unreplicated.Fail(err, "route", c.FullPath())
		msg := "not confirmed by enough Redis replicas in time; it may have been written: retry with the same Idempotency-Key"
		if !keyed(c) {
			msg = "not confirmed by enough Redis replicas in time; it may have been written: retry"
		}
		ae = &apiError{Status: http.StatusServiceUnavailable, Code: "unavailable", Message: msg, RetryAfter: 1}
	case redis.HasErrorPrefix(err, "WRONGTYPE"):
		// A key of another type where a stream (or a record) belongs: an
		// operator's write or a key prefix shared with another
		// application. Redis answered, and will answer the same to a
		// retry: not an outage.
		s.log.Error("redis key of the wrong type", "method", c.Request.Method, "route", c.FullPath(), "err", err.Error())
		ae = errf(500, "internal", "internal error")
	case errors.Is(err, registry.ErrCorruptRecord):
		// A connection record no egress wrote: the same kind of fault
		// as a key of the wrong type, and the same answer to a retry.
		s.log.Error("corrupt connection record", "method", c.Request.Method, "route", c.FullPath(), "err", err.Error())
		ae = errf(500, "internal", "internal error")
	case errors.Is(err, context.Canceled):
		// net/http cancels a request's context when its connection ends:
		// the client went away (a publish withdrew its appends: nothing
		// was written). Nothing is answered, not even gin's default 200,
		// which a client that only shut down its sending side would still
		// read as a success: the connection is closed (where it cannot
		// be, as in tests that record responses, the status is 499).
		c.Set(errorCodeKey, "canceled")
		c.Abort()
		c.Status(499)
		hangUp(c)
		return
	case redisconn.SlotMoving(err):
		// Redis answered: a resharding is moving the slot of the
		// channel's keys, and the append script, which names several of
		// them, is refused until the move is over. Not "cannot be
		// reached", and no outage (docs/scaling.md).
		s.slotMoving.Fail(err, "method", c.Request.Method, "route", c.FullPath())
		msg := "the channel's Redis Cluster slot is being moved to another node (resharding): nothing was written; retry" + sameKey(c)
		switch {
		case multiAppend[c.FullPath()] && !keyed(c):
			msg = "a Redis Cluster slot is being moved to another node (resharding): what it refused was not written, but other connections of the request may have been told; retry (telling them again is harmless)"
		case multiAppend[c.FullPath()]:
			msg = "a Redis Cluster slot is being moved to another node (resharding): what it refused was not written, but other messages of the request may have been; retry with the same Idempotency-Key"
		case c.FullPath() == "/v1/connections/:id/messages":
			// No channel: the append is to the inbox of the connection's
			// egress instance.
			msg = "the Redis Cluster slot of the connection's egress instance (its inbox) is being moved to another node (resharding): nothing was written; retry (with the same Idempotency-Key)"
		case c.FullPath() == "/v1/connections/:id":
			msg = "the Redis Cluster slot of the connection's egress instance (its inbox) is being moved to another node (resharding): nothing was written; retry"
		}
		ae = &apiError{Status: http.StatusServiceUnavailable, Code: "unavailable", Message: msg, RetryAfter: 1}
	case redisconn.OutOfMemory(err):
		// Redis answered: it is at its maxmemory and may not evict. Not
		// "cannot be reached", and not over in a second (keys expire,
		// streams are trimmed, or an operator frees memory).
		s.redisOOM.Fail(err, "method", c.Request.Method, "route", c.FullPath())
		msg := "Redis is out of memory and refused the write: nothing was written; retry later" + sameKey(c)
		switch {
		case multiAppend[c.FullPath()] && !keyed(c):
			msg = "Redis is out of memory and refused the write: what it refused was not written, but other connections of the request may have been told; retry later (telling them again is harmless)"
		case multiAppend[c.FullPath()]:
			msg = "Redis is out of memory and refused the write: what it refused was not written, but other messages of the request may have been; retry later with the same Idempotency-Key"
		}
		ae = &apiError{Status: http.StatusServiceUnavailable, Code: "unavailable", Message: msg, RetryAfter: oomRetryAfter}
	default:
		switch s.redisFailed(c, err) {
		case s.redisRefused:
			// Redis answered: the functions' ACL user lacks a rule. A
			// configuration fault, like a key of the wrong type: the
			// same answer to every retry until an operator mends the
			// user.
			ae = errf(500, "internal", "internal error")
		case s.redisLogin:
			// Redis answered: it refuses the functions' login. Not
			// "cannot be reached", and not over in a second: an
			// operator fixes REDIS_URL or the user (a password rotated
			// in Redis before the functions' setting, from the client's
			// side, ends by itself).
			ae = &apiError{Status: http.StatusServiceUnavailable, Code: "unavailable", Message: "Redis refused this service's connection; retry later" + sameKey(c), RetryAfter: loginRetryAfter}
		default:
			ae = &apiError{Status: http.StatusServiceUnavailable, Code: "unavailable", Message: "Redis cannot be reached; retry" + sameKey(c), RetryAfter: 1}
		}
	}
	body.Error.Code = ae.Code
	c.Set(errorCodeKey, ae.Code)
	body.Error.Message = ae.Message
	if ae.RetryAfter > 0 {
		c.Header("Retry-After", strconv.Itoa(ae.RetryAfter))
	}
	c.AbortWithStatusJSON(ae.Status, body)
}

// redisFailed records err, a command Redis did not carry out for the
// request c, in the episode of its kind, and returns that episode:
// redisRefused for a command refused to the functions' ACL user,
// redisLogin for their login refused (both last until an operator acts),
// redisDown for anything else (Redis cannot be reached). writeError and
// handleReadyz both ask it, so that the answers to requests and to
// probes tell a refusal from an outage the same way. Out of memory is
// writeError's alone: only writes meet it, and a probe writes nothing.
func (s *Server) redisFailed(c *gin.Context, err error) *logging.Episode {
	ep := s.redisDown
	switch {
	case redisconn.Refused(err):
		ep = s.redisRefused
	case redisconn.LoginRefused(err):
		ep = s.redisLogin
	}
	ep.Fail(err, "method", c.Request.Method, "route", c.FullPath())
	return ep
}

// oomRetryAfter is the Retry-After, in seconds, of a 503 because Redis is
// out of memory. Memory comes back as keys expire and streams are trimmed
// (each stream once per second of its traffic) or when an operator frees
// it, not within a second: a retry every second from every publisher
// would only add refused commands. 5 s is the publisher's (Go and
// JavaScript) longest backoff anyway, so their retries keep their pace.
const oomRetryAfter = 5

// loginRetryAfter is the Retry-After, in seconds, of a 503 because Redis
// refused the functions' login: it lasts until an operator acts, and a
// retry every second from every publisher would only add refused logins
// (a dial each). 5 s, as for Redis out of memory.
const loginRetryAfter = 5

// multiAppend holds the routes whose request makes several appends, each
// written or refused on its own (a batch, one per item; a send to or a
// disconnect of a user, one per connection or instance): out of memory,
// one may be written and the next refused as memory crosses the limit.
var multiAppend = map[string]bool{
	"/v1/messages":                true,
	"/v1/users/:user/messages":    true,
	"/v1/users/:user/connections": true,
}

// keyed reports whether c's route takes an Idempotency-Key: the
// publishes, every POST route (docs/api.md). The reads and the
// disconnects take none (repeating a disconnect is harmless), so a 503
// tells their clients to retry, not to send the same key.
func keyed(c *gin.Context) bool { return c.Request.Method == http.MethodPost }

// sameKey is what a 503's "retry" ends with for request c: "(with the
// same Idempotency-Key)" where its route takes one, nothing elsewhere.
func sameKey(c *gin.Context) string {
	if keyed(c) {
		return " (with the same Idempotency-Key)"
	}
	return ""
}

// hangUp closes c's connection without a response, where the connection
// can be taken over (not in tests that record responses).
func hangUp(c *gin.Context) {
	if u, ok := c.Writer.(interface{ Unwrap() http.ResponseWriter }); ok {
		if _, ok := u.Unwrap().(http.Hijacker); !ok {
			return
		}
	}
	if conn, _, err := c.Writer.Hijack(); err == nil {
		_ = conn.Close()
	}
}
