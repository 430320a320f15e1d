package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// idemRecord is what an Idempotency-Key remembers.
type idemRecord struct {
	State    string          `json:"state"`           // "pending" or "done"
	Body     string          `json:"body"`            // sha256 of the request body
	Claim    string          `json:"claim,omitempty"` // random: whose claim it is, or whose reply ("done")
	Status   int             `json:"status,omitempty"`
	Response json.RawMessage `json:"response,omitempty"`
}

// badIdempotencyKey returns the 400 for an Idempotency-Key sent more
// than once or not 1–255 printable ASCII characters, or nil (for none).
func badIdempotencyKey(c *gin.Context) error {
	key, sent := c.Request.Header["Idempotency-Key"]
	switch {
	case !sent:
		return nil
	case len(key) != 1:
		return errf(400, "invalid_idempotency_key", "Idempotency-Key must be sent once, not "+strconv.Itoa(len(key))+" times")
	case len(key[0]) == 0 || len(key[0]) > 255 || !printable(key[0]):
		return errf(400, "invalid_idempotency_key", "Idempotency-Key must be 1–255 printable ASCII characters")
	}
	return nil
}

// idempotent runs write at most once per (credential, Idempotency-Key)
// within the configured window, and answers a retry with the original
// response (and the header Idempotent-Replayed: true). A key reused with
// a different body is refused (422); a retry while the first attempt is
// still writing gets 409 with Retry-After. Without the header, write just
// runs. write returns the reply's status and its JSON.
func (s *Server) idempotent(c *gin.Context, who *principal, body []byte, write func() (int, []byte, error)) {
	key, sent := c.Request.Header["Idempotency-Key"]
	if !sent {
		status, resp, err := write()
		if err != nil {
			s.writeError(c, err)
			return
		}
		writeJSON(c, status, resp)
		return
	}
	if err := badIdempotencyKey(c); err != nil {
		s.writeError(c, err)
		return
	}
	ctx := c.Request.Context()
	digest := sha256.Sum256([]byte(who.id + "\x00" + c.Request.Method + " " + c.Request.URL.Path + "\x00" + key[0]))
	rkey := s.keys.Idempotency(hex.EncodeToString(digest[:16]))
	bodySum := sha256.Sum256(body)
	bodyHash := hex.EncodeToString(bodySum[:])

	// Each append of this request carries a once-key derived from the
	// same digest and the body, checked and set inside the append script:
	// a retry after an error whose outcome is unknown (a lost reply)
	// returns the first attempt's ids instead of writing again.
	onceSum := sha256.Sum256(append(digest[:], bodySum[:]...))
	c.Set(onceDigestKey, hex.EncodeToString(onceSum[:16]))

	claimID := rand.Text()
	pending, _ := json.Marshal(idemRecord{State: "pending", Body: bodyHash, Claim: claimID})
	until, ok := s.claim(c, rkey, bodyHash, string(pending))
	if !ok {
		return
	}
	status, resp, err := write()
	if err != nil {
		// Nothing (or, on a lost reply, possibly something) was written;
		// free the key so the client's retry can proceed: the once-keys
		// keep that retry from writing anything twice. If Redis cannot be
		// reached, that goes on once it can (claims.go).
		s.claims.release(ctx, rkey, string(pending), until)
		s.writeError(c, err)
		return
	}
	// The reply names the claim too, so that the save script knows its
	// own reply from another request's (saveScript).
	done, _ := json.Marshal(idemRecord{State: "done", Body: bodyHash, Claim: claimID, Status: status, Response: resp})
	sctx := context.WithoutCancel(ctx)
	save := func() (int, error) {
		return saveScript.Run(sctx, s.rdb, []string{rkey}, pending, done, s.cfg.IdempotencyWindow.Milliseconds()).Int()
	}
	saved, err := save()
	if resendable(sctx, err) {
		// Its reply lost: sent once more, as the claim is (the script
		// knows its own reply there, saveScript).
		saved, err = save()
	}
	if err != nil {
		// The write stands; free the claim, or a retry (its reply lost
		// too) would get 409 until the claim expires. The retry runs
		// again and gets this attempt's ids from the once-keys.
		// Once per outage (an episode), not per request.
		s.unsaved.Fail(err, "route", c.FullPath())
		s.claims.release(ctx, rkey, string(pending), until)
	} else {
		s.unsaved.OK()
		if saved == 0 {
			// This request outlived its claim and another request with
			// the key (its own retry, or another body) claimed it since:
			// the key is that one's now. This reply stands; a retry of
			// it is answered by what the key holds.
			s.log.Warn("idempotency key claimed again before the reply was saved", "route", c.FullPath(), "key", rkey, "claim_ttl", s.pendingTTL().String())
		}
	}
	writeJSON(c, status, resp)
}

// saveScript stores a request's reply (ARGV[2], for ARGV[3] ms) at its
// Idempotency-Key KEYS[1] if the key still holds the request's claim
// (ARGV[1]) or nothing, and returns 1; else 0. A claim that expired while
// its request ran may have been taken by a later request, whose claim or
// reply is not this one's to overwrite: with a different body, the later
// request's retry would get 422 for a request that was accepted. A key
// that already holds this very reply (it names the request's claim) is
// this save's own, sent again after its answer was lost: 1, not 0, which
// logged another request's claim that there never was.
var saveScript = redis.NewScript(`local v = redis.call("GET", KEYS[1])
if v == ARGV[2] then return 1 end
if v == ARGV[1] or not v then
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
  return 1
end
return 0`)

// pendingTTL is how long an Idempotency-Key's claim lasts without its
// request finishing: well past what a request can take (its Redis calls,
// each bounded by REDIS_TIMEOUT, and a replica wait), within the window.
func (s *Server) pendingTTL() time.Duration {
	return min(s.cfg.IdempotencyWindow, 10*s.cfg.Redis.Timeout+s.cfg.PublishWaitTimeout+5*time.Second)
}

// claimAttempts bounds how many times a request tries to claim a key
// that is freed each time between its claim and its read of what holds
// the key (claim).
const claimAttempts = 3

// claim takes the Idempotency-Key rkey for this request, whose claim
// record is pending, and returns when the claim expires; or it answers
// the request (the stored reply, 409, 422 or an error) and reports false.
//
// The claim expires soon after any request could have ended, so that a
// claim left behind (its DEL failed with Redis, or the process died)
// answers 409 for seconds, not for the whole window. A retry that
// overlaps a first attempt still running past it writes nothing twice:
// the once-keys see to that. The claim is not this request's to free
// after it expires.
func (s *Server) claim(c *gin.Context, rkey, bodyHash, pending string) (until time.Time, ok bool) {
	ctx := c.Request.Context()
	for attempt := 1; ; attempt++ {
		until = time.Now().Add(s.pendingTTL())
		ok, err := s.rdb.SetNX(ctx, rkey, pending, s.pendingTTL()).Result()
		if resendable(ctx, err) {
			// Its reply lost (later than REDIS_TIMEOUT, or the
			// connection cut): the claim is sent once more, on another
			// connection, where the Redis client would not (it resends
			// only what Redis cannot have run: an append would run
			// twice). Finding the key taken by its own first sending, it
			// goes on as the claim (replay, claimOurs), not 503 and then
			// 409 to the retry until the release below ran.
			ok, err = s.rdb.SetNX(ctx, rkey, pending, s.pendingTTL()).Result()
		}
		if redisconn.OutOfMemory(err) {
			// Redis at its maxmemory refuses the claim whether or not the
			// key is there, and sets nothing. A retry of a request that
			// was answered before is answered from its record, which
			// Redis still reads: a 503 "nothing was written" would have a
			// publisher whose attempts run out during the episode take a
			// message that was accepted for one that was not (and send it
			// again under a new key). Anything else keeps the 503.
			if b, gerr := s.rdb.Get(ctx, rkey).Bytes(); gerr == nil {
				s.answerFrom(c, rkey, b, bodyHash)
				return until, false
			}
			s.writeError(c, err)
			return until, false
		}
		if err != nil {
			// Redis may have set the claim and only its reply been lost
			// (or the request cancelled meanwhile): free it if it is
			// there, or the retry would get 409 until it expires. From
			// the background, so that the 503 does not wait for another
			// Redis call.
			s.claims.later(rkey, pending, until)
			s.writeError(c, err)
			return until, false
		}
		if ok {
			return until, true
		}
		switch s.replay(c, rkey, bodyHash, pending, until, attempt < claimAttempts) {
		case claimOurs:
			return until, true
		case claimAnswered:
			return until, false
		}
		// claimFreed: the key was freed between the SET and the GET (the
		// request holding it failed and released it, or its claim
		// expired): claim it again.
	}
}

// resendable reports whether err, a command's, may be a lost reply that
// a command safe to run twice is sent again for: the connection failed
// (not a Redis error reply, an out-of-memory or a refusal), and the
// request is not cancelled.
func resendable(ctx context.Context, err error) bool {
	return !redisconn.IsReply(err) && ctx.Err() == nil
}

// claimOutcome is what replay found at a key whose claim failed.
type claimOutcome int

const (
	claimAnswered claimOutcome = iota // the request is answered
	claimOurs                         // the claim there is this request's own
	claimFreed                        // nothing is there any more: claim again
)

// replay answers a request whose claim on rkey found the key taken: with
// the stored reply, 409 or 422 (claimAnswered). It reports instead,
// answering nothing, that the claim there is this request's own
// (claimOurs): the SET's reply was lost after Redis ran it and it was
// sent again on a new connection (by claim itself after a late reply or
// a cut, or by redisconn's resend of a connection Redis had closed),
// which found the key taken. Without
// that check the request answered 409 "still being processed" for a
// request no longer running, and so did every retry until the claim
// expired (pendingTTL). A key found empty, freed since the SET, is
// claimFreed when again is set (the caller claims it once more), else
// 409. until is when the claim expires.
func (s *Server) replay(c *gin.Context, rkey, bodyHash, mine string, until time.Time, again bool) claimOutcome {
	b, err := s.rdb.Get(c.Request.Context(), rkey).Bytes()
	if err == nil && string(b) == mine {
		return claimOurs
	}
	if errors.Is(err, redis.Nil) {
		if again {
			return claimFreed
		}
		s.writeError(c, &apiError{Status: http.StatusConflict, Code: "idempotency_in_progress", Message: "a request with this Idempotency-Key just finished; retry", RetryAfter: 1})
		return claimAnswered
	}
	if err != nil {
		// What the claim found is unknown: it may be this request's own
		// (a resent claim), which nothing else would free before it
		// expires. Freed only if it is.
		s.claims.later(rkey, mine, until)
		s.writeError(c, err)
		return claimAnswered
	}
	s.answerFrom(c, rkey, b, bodyHash)
	return claimAnswered
}

// answerFrom answers a request with an Idempotency-Key from b, the record
// another request left at its key rkey: the reply it saved (a replay), or why
// this one cannot run (409 while the other runs, 422 for another body).
func (s *Server) answerFrom(c *gin.Context, rkey string, b []byte, bodyHash string) {
	var rec idemRecord
	if json.Unmarshal(b, &rec) != nil {
		// Not written by an ingress (an operator, another application
		// under the prefix): no retry mends it, the operator must.
		s.log.Error("corrupt idempotency record", "route", c.FullPath(), "key", rkey)
		s.writeError(c, errf(500, "internal", "corrupt idempotency record"))
		return
	}
	if rec.Body != bodyHash {
		s.writeError(c, errf(http.StatusUnprocessableEntity, "idempotency_key_reused", "this Idempotency-Key was used with a different request body"))
		return
	}
	if rec.State != "done" {
		s.writeError(c, &apiError{Status: http.StatusConflict, Code: "idempotency_in_progress", Message: "a request with this Idempotency-Key is still being processed; retry", RetryAfter: 1})
		return
	}
	c.Header("Idempotent-Replayed", "true")
	writeJSON(c, rec.Status, rec.Response)
}

const jsonContentType = "application/json; charset=utf-8"

// jsonContentTypes is gin's Content-Type for JSON, shared as gin shares
// it (net/http copies the header before writing it).
var jsonContentTypes = []string{jsonContentType}

// encodeReply encodes a handler's reply with encoding/json, as gin's
// c.JSON does.
func encodeReply(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// writeJSON answers with status and the JSON b, as gin's
// c.Data(status, jsonContentType, b) did (Content-Type unless one is set,
// Content-Length, the body), without its two allocations per reply (the
// render value and the Content-Type's slice). status is one with a body.
func writeJSON(c *gin.Context, status int, b []byte) {
	h := c.Writer.Header()
	if len(h["Content-Type"]) == 0 {
		h["Content-Type"] = jsonContentTypes
	}
	if len(b) > 0 {
		h.Set("Content-Length", strconv.Itoa(len(b)))
	}
	c.Status(status)
	_, _ = c.Writer.Write(b)
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// onceDigestKey holds, in the gin context of a request with an
// Idempotency-Key, the digest its appends' once-keys are built from.
const onceDigestKey = "wsrelay.once"

// appendFor appends for request c: with the request's once-keys when it
// carries an Idempotency-Key.
func (s *Server) appendFor(c *gin.Context, as []stream.Append) ([]string, error) {
	if d := c.GetString(onceDigestKey); d != "" {
		ttl := s.cfg.IdempotencyWindow.Milliseconds()
		// Numbered per stream, not by position in the request: a user
		// send's appends (one per instance) can come back from the
		// registry in another order on a retry.
		nth := make(map[string]int, len(as))
		for i := range as {
			n := nth[as[i].Stream]
			nth[as[i].Stream] = n + 1
			as[i].Once = s.keys.Once(as[i].Stream, d, n)
			as[i].OnceTTLMS = ttl
		}
	}
	return s.appendStreams(c.Request.Context(), as)
}
