package main

import (
	"net/http"
	"time"

	"github.com/wsrelay/wsrelay/shared/channel"
)

// identity is who opened a connection.
type identity struct {
	user  string
	allow func(channel string) bool // nil: any channel
	exp   time.Time                 // zero: never expires
	proto string                    // subprotocol to echo, if any
}

type authError struct {
	status    int
	code, msg string
}

func (id *identity) responseHeader() http.Header {
	if id.proto == "" {
		return nil
	}
	return http.Header{"Sec-WebSocket-Protocol": {id.proto}}
}

// authenticate identifies the client of an upgrade request. In anonymous
// mode the optional `user` query parameter names the user.
func (s *Server) authenticate(r *http.Request) (*identity, *authError) {
	user := r.URL.Query().Get("user")
	if user != "" && !channel.ValidUser(user) {
		return nil, &authError{http.StatusBadRequest, "invalid_user", "user must be 1–128 characters [A-Za-z0-9_.:@-]"}
	}
	return &identity{user: user}, nil
}
